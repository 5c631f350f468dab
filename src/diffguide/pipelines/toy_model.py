"""The built-in text-to-image model: definition, training (accelerate) and export as a diffusers
folder.

A pixel-space ``UNet2DConditionModel`` on 32x32 RGB in [-1, 1], conditioned by a small CLIP text
encoder trained from scratch with it on the toy world's captions (``diffguide.toy.scenes``), with
10%
of captions dropped to "" so that classifier-free guidance works. DDPM's linear betas with
v-prediction: near pure noise an eps model must be accurate to about 1/sigma (sigma_max = 157 here)
or samples drift; a short CPU training does not get there, a v model does not need to.
The folder has no VAE; ``GuidedPipeline.from_pretrained`` loads it like any other model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..files import atomic_write, replace_model_files
from ..toy import scenes
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
    (``addition_embed_type="text"``:
    an attention-pooled prompt vector added to it), which is how the few shape words get to the
    32x32
    blocks that draw edges; without it shapes came out as blobs after a few thousand steps."""
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


def scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE)


@dataclass
class TrainConfig:
    out: str
    size: str = "main"
    steps: int = 20000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_snr: float = 5.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 turns it off
    ema: float = 0.999
    dropout: float = 0.1
    seed: int = 0
    dataset: int = 50000  # distinct scenes, rendered once; captions are redrawn every epoch
    checkpoint_every: int = 500
    log_every: int = 50


def train(cfg: TrainConfig, progress: bool = True) -> str:
    """Train (or resume) a toy model; returns the exported diffusers folder ``cfg.out/model``."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..core.schedule import VPSchedule

    os.makedirs(cfg.out, exist_ok=True)
    acc = Accelerator()
    torch.manual_seed(cfg.seed)
    tok = tokenizer()
    te, net = text_encoder(len(tok)), unet(cfg.size)
    ema_te, ema_net = text_encoder(len(tok)), unet(cfg.size)
    ema_te.load_state_dict(te.state_dict())
    ema_net.load_state_dict(net.state_dict())
    for m in (ema_te, ema_net):
        m.requires_grad_(False).eval()
    params = list(net.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    step = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["config"]["size"] != cfg.size or state["config"]["seed"] != cfg.seed:
            raise ValueError(
                f"{ckpt} was trained with size {state['config']['size']!r}, seed "
                f"{state['config']['seed']}; resume with the same settings"
            )
        for m, k in (
            (net, "unet"),
            (te, "text"),
            (ema_net, "ema_unet"),
            (ema_te, "ema_text"),
            (opt, "opt"),
        ):
            m.load_state_dict(state[k])
        step = state["step"]
    net, te, opt = acc.prepare(net, te, opt)
    ema_net.to(acc.device)
    ema_te.to(acc.device)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)

    data = SceneData(
        cfg.dataset, cfg.seed, os.path.join(cfg.out, f"scenes_{cfg.seed}_{cfg.dataset}.npz")
    )
    ac = VPSchedule.from_betas(
        **{k: v for k, v in SCHEDULE.items() if k != "prediction_type"}
    ).alphas_cumprod
    ac = ac.float().to(acc.device)
    log = open(os.path.join(cfg.out, "loss.jsonl"), "a")
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not progress or not acc.is_main_process,
        desc=f"train-toy {cfg.size}",
    )
    running, t0 = [], time.time()
    while step < cfg.steps:
        # everything random about this step comes from (seed, step): resuming repeats it exactly
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        per_epoch = cfg.dataset // cfg.batch
        epoch, k = divmod(step, per_epoch)
        order = np.random.Generator(np.random.PCG64([cfg.seed, epoch, 1])).permutation(cfg.dataset)
        idx = order[k * cfg.batch : (k + 1) * cfg.batch]
        flip = torch.rand(cfg.batch, generator=g).numpy() < 0.5
        x0, caps = data.batch(idx, epoch, flip)
        drop = torch.rand(cfg.batch, generator=g) < cfg.dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        ids = tok(
            caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids.to(acc.device)
        t = torch.randint(0, len(ac), (cfg.batch,), generator=g).to(acc.device)
        eps = torch.randn(x0.shape, generator=g).to(acc.device)
        x0 = x0.to(acc.device)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        out = net(a * x0 + s * eps, t, encoder_hidden_states=te(ids)[0]).sample
        err = (out.float() - (a * eps - s * x0)).pow(2).mean(dim=(1, 2, 3))  # v = a eps - s x0
        if cfg.min_snr > 0:  # in v terms the Min-SNR weight is min(snr, gamma) / (snr + 1)
            snr = ac[t] / (1 - ac[t])
            err = err * snr.clamp(max=cfg.min_snr) / (snr + 1)
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for ema, live in ((ema_net, net), (ema_te, te)):
                for pe, pl in zip(ema.parameters(), acc.unwrap_model(live).parameters()):
                    pe.lerp_(pl.detach(), 1 - decay)
        step += 1
        running.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 and acc.is_main_process:
            rec = {
                "step": step,
                "loss": float(np.mean(running)),
                "lr": lr,
                "seconds": round(time.time() - t0, 2),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            running = []
        if (step % cfg.checkpoint_every == 0 or step == cfg.steps) and acc.is_main_process:
            state = {
                "unet": acc.unwrap_model(net).state_dict(),
                "text": acc.unwrap_model(te).state_dict(),
                "ema_unet": ema_net.state_dict(),
                "ema_text": ema_te.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "config": asdict(cfg),
            }
            atomic_write(ckpt, lambda f: torch.save(state, f))
    bar.close()
    log.close()
    folder = os.path.join(cfg.out, "model")
    if acc.is_main_process:
        export(ema_net, ema_te, tok, folder)
    return folder


def export(net, te, tok, folder: str) -> str:
    """Save as a diffusers StableDiffusionPipeline folder without VAE (written aside, then
    renamed)."""
    import shutil

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
    tmp = folder.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if os.path.isdir(
        folder
    ):  # the model's files replaced by name; nothing else in the folder touched
        replace_model_files(tmp, folder)
        shutil.rmtree(tmp)  # this export's own temporary folder, empty by now
    else:
        os.replace(tmp, folder)
    return folder


def export_checkpoint(run: str, folder: str | None = None) -> str:
    """Export the EMA weights of a training run's latest checkpoint (training may go on)."""
    state = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)
    tok = tokenizer()
    te, net = text_encoder(len(tok)), unet(state["config"]["size"])
    te.load_state_dict(state["ema_text"])
    net.load_state_dict(state["ema_unet"])
    return export(net, te, tok, folder or os.path.join(run, "model"))


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
