"""The built-in text-to-image model: definition, training (accelerate) and export as a diffusers
folder.

A pixel-space ``UNet2DConditionModel`` on 32x32 RGB in [-1, 1], conditioned by a small CLIP text
encoder trained from scratch with it on the toy world's captions (``diffguide.toy.scenes``), with
10% of captions dropped to "" so that classifier-free guidance works. DDPM's linear betas with
v-prediction: near pure noise an eps model must be accurate to about 1/sigma (sigma_max = 157 here)
or samples drift; a short CPU training does not get there, a v model does not need to.
The folder has no VAE; ``GuidedPipeline.from_pretrained`` loads it like any other model.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from ..files import save_model
from ..toy import scenes, training
from ..toy.training import TrainConfig  # noqa: F401 (the command's config)
from ..toy.data import SceneData  # noqa: F401  (the training data; also the distillation trainer's)

SIZES = {  # UNet variants: the companion is about 3x cheaper per evaluation
    "main": dict(block_out_channels=(32, 64, 64)),
    "small": dict(block_out_channels=(8, 16, 32)),
}
TEXT_DIM = 64
MAX_TOKENS = 24
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="v_prediction",
)


def tokenizer():
    """A CLIP BPE tokenizer whose merges spell every caption word as one token (letters otherwise).

    Longer words' merges rank first, so no shorter word's merge splits them."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in sorted(scenes.vocabulary(), key=lambda w: (-len(w), w)):
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        cur = syms[0]
        for nxt in syms[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=TEXT_DIM,
        )
    )


def unet(size: str = "main"):
    """Attention (self and cross) only at 8x8, where it is cheap on a CPU.

    The text also reaches every resolution through the time embedding
    (``addition_embed_type="text"``: an attention-pooled prompt vector added to it), which is how
    the few shape words get to the
    32x32 blocks that draw edges; without it shapes came out as blobs after a few thousand steps."""
    from diffusers import UNet2DConditionModel

    if size not in SIZES:
        raise ValueError(f"unknown toy model size {size!r}; choose one of: {', '.join(SIZES)}")
    return UNet2DConditionModel(
        sample_size=scenes.SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        **SIZES[size],
    )


DEFAULT_LR = TrainConfig.lr
network = unet  # the training loop's name for a toy model's denoiser (toy.training)


def condition(te, ids) -> dict:
    """The UNet's text keywords: the encoder's last hidden state, as StableDiffusionPipeline's."""
    return {"encoder_hidden_states": te(ids)[0]}


def loss(net, x0, cond, g, cfg) -> torch.Tensor:
    """Per-example v-prediction loss at a uniform training index, Min-SNR-weighted."""
    ac = _alphas_cumprod().to(x0.device)
    t = torch.randint(0, len(ac), (x0.shape[0],), generator=g).to(x0.device)
    eps = torch.randn(x0.shape, generator=g).to(x0.device)
    a, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
    out = net(a * x0 + s * eps, t, **cond).sample
    err = (out.float() - (a * eps - s * x0)).pow(2).mean(dim=(1, 2, 3))  # v = a eps - s x0
    if cfg.min_snr > 0:  # in v terms the Min-SNR weight is min(snr, gamma) / (snr + 1)
        snr = ac[t] / (1 - ac[t])
        err = err * snr.clamp(max=cfg.min_snr) / (snr + 1)
    return err


@functools.cache  # the table once, not every training step
def _alphas_cumprod() -> torch.Tensor:
    from ..core.schedule import VPSchedule

    kw = {k: v for k, v in SCHEDULE.items() if k != "prediction_type"}
    return VPSchedule.from_betas(**kw).alphas_cumprod.float()


def scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE)


ARCHES = ("unet", "mmdit")


def arch_module(arch: str):
    """The module that defines a toy architecture: this one (UNet) or ``toy_mmdit``."""
    import sys

    if arch not in ARCHES:
        raise ValueError(f"unknown toy architecture {arch!r}; choose one of: {', '.join(ARCHES)}")
    if arch == "mmdit":
        from . import toy_mmdit

        return toy_mmdit
    return sys.modules[__name__]


def train(cfg: TrainConfig, progress: bool = True) -> str:
    """Train (or resume) the toy model of ``cfg.arch`` and ``cfg.size`` (``toy.training``); the
    exported folder."""
    return training.train(cfg, arch_module(cfg.arch), progress)


def export(net, te, tok, folder: str) -> str:
    """Save as a diffusers StableDiffusionPipeline folder without VAE (written aside, then
    renamed)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=te.cpu().eval(),
        tokenizer=tok,
        unet=net.cpu().eval(),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_model(pipe, folder)


def export_checkpoint(run: str, folder: str | None = None) -> str:
    """Export the EMA weights of a training run's latest checkpoint (training may go on)."""
    state = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)
    arch = arch_module(state["config"].get("arch", "unet"))
    tok = arch.tokenizer()
    te, net = arch.text_encoder(len(tok)), arch.network(state["config"]["size"])
    te.load_state_dict(state["ema_text"])
    net.load_state_dict(state["ema_unet"])
    return arch.export(net, te, tok, folder or os.path.join(run, "model"))


def flops(size: str, batch: int = 1) -> int:
    """Floating-point operations of one UNet evaluation (torch's FLOP counter: matmuls and
    convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = unet(size).eval()
    x, t = torch.randn(batch, 3, scenes.SIZE, scenes.SIZE), torch.full((batch,), 500)
    e = torch.randn(batch, MAX_TOKENS, TEXT_DIM)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        m(x, t, e)
    return counter.get_total_flops()


def cost_ratio(batch: int = 8, repeats: int = 5) -> dict:
    """Seconds per forward of the main and small UNets on this machine, and their ratio."""
    out = {}
    for size in SIZES:
        m = unet(size).eval()
        x, t = torch.randn(batch, 3, scenes.SIZE, scenes.SIZE), torch.full((batch,), 500)
        e = torch.randn(batch, MAX_TOKENS, TEXT_DIM)
        with torch.inference_mode():
            m(x, t, e)
            t0 = time.perf_counter()
            for _ in range(repeats):
                m(x, t, e)
        out[size] = (time.perf_counter() - t0) / repeats
    out["ratio"] = out["main"] / out["small"]
    return out
