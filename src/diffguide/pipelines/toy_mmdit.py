"""The built-in flow-matching transformer: an SD3-style MMDiT on the toy world.

diffusers' ``SD3Transformer2DModel`` (joint attention over image and text tokens, patch 4 on 32x32
RGB pixels in [-1, 1], 64 image tokens, QK RMS-norm as SD 3.5, started as DiT's adaLN-Zero)
predicting the rectified-flow velocity eps - x0, trained with SD3's logit-normal times (Esser et al.
2024, Sec. 3.1) and no shift. Text as SD3: two CLIP encoders (both started from the built-in UNet's,
with the same tokenizer), their penultimate states side by side and their pooled vectors
concatenated; there is no T5, and no T5 padding either (``max_sequence_length`` 0, kept in the
folder's ``diffguide.json``): diffusers' pipeline would otherwise append 256 zero tokens, which
doubles the cost. Trained by ``toy.training`` as the UNet is (``diffguide train-toy --arch mmdit``)
and saved as a ``StableDiffusion3Pipeline`` folder without VAE.
"""

from __future__ import annotations

import os

import torch

from ..files import save_model
from . import toy_model
from .toy_model import MAX_TOKENS, TEXT_DIM, tokenizer  # noqa: F401 (the training loop's names)

SIZES = {  # "tiny" exists for tests: one block, a few thousand weights
    # patch 4 (64 tokens) at width 160: 5.4M weights for about 0.4x the FLOPs per step of "p2"
    "main": dict(patch_size=4, num_layers=6, num_attention_heads=5, attention_head_dim=32),
    # the first recipe (issue 34's runs to step 6,000: colour-right blobs), PyTorch's default init
    "p2": dict(patch_size=2, num_layers=6, num_attention_heads=4, attention_head_dim=32),
    "tiny": dict(patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8),
}
# sizes started as DiT's adaLN-Zero (Peebles & Xie 2023, Sec. 3.2); not "tiny": its tests need a
# network whose output depends on its input after a few steps
ZERO_INIT = ("main",)
JOINT = 2 * TEXT_DIM  # the two CLIPs' states side by side: no padding to a T5 width
SHIFT = 1.0
MAX_SEQUENCE_LENGTH = 0  # T5 tokens: none (the folder's diffguide.json says so to diffguide)
DEFAULTS = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
DEFAULT_LR = 5e-4
# below this flow level a teacher's target is the data's: its x0 error is divided by s, and the
# built-in UNet's made it 0.44 in mean square from eps - x0 at s = 0.02 against 0.04 at s = 0.1
TEACHER_FROM = 0.1


def text_encoder(vocab_size: int) -> torch.nn.ModuleList:
    """SD3's two CLIP encoders (``text_encoder``, ``text_encoder_2``), each the built-in UNet's
    trained encoder with a new projection for the pooled vector (random when the UNet's is not
    installed)."""
    from transformers import CLIPTextModelWithProjection

    from ..assets import path

    config = toy_model.text_encoder(vocab_size).config
    shipped = path("toy", "text_encoder", "model.safetensors")
    out = torch.nn.ModuleList()
    for _ in range(2):
        enc = CLIPTextModelWithProjection(config)
        if os.path.isfile(shipped) and vocab_size == config.vocab_size:
            from safetensors.torch import load_file

            # the file's keys are the text model's, with or without its prefix (transformers 5 / 4)
            state = {k.removeprefix("text_model."): v for k, v in load_file(shipped).items()}
            enc.text_model.load_state_dict(state)
        out.append(enc)
    return out


def network(size: str = "main"):
    from diffusers import SD3Transformer2DModel

    from ..toy import scenes

    if size not in SIZES:
        raise ValueError(f"unknown MMDiT size {size!r}; choose one of: {', '.join(SIZES)}")
    dims = SIZES[size]
    net = SD3Transformer2DModel(
        sample_size=scenes.SIZE,
        in_channels=3,
        out_channels=3,
        joint_attention_dim=JOINT,
        caption_projection_dim=dims["num_attention_heads"] * dims["attention_head_dim"],
        pooled_projection_dim=2 * TEXT_DIM,
        pos_embed_max_size=scenes.SIZE // dims["patch_size"],
        qk_norm="rms_norm",
        **dims,
    )
    if size in ZERO_INIT:
        adaln_zero(net)
    return net


def adaln_zero(net) -> None:
    """DiT's adaLN-Zero start (Peebles & Xie 2023, Sec. 3.2): every modulation layer and the
    output projection at zero, so each block starts as the identity and the network outputs 0;
    DiT found it well ahead of a random start (their Fig. 5). diffusers' classes are built to load
    weights and start at PyTorch's default init."""
    mods = [net.norm_out.linear, net.proj_out]
    for block in net.transformer_blocks:
        mods += [block.norm1.linear, block.norm1_context.linear]
    for m in mods:
        torch.nn.init.zeros_(m.weight)
        torch.nn.init.zeros_(m.bias)


def condition(te, ids) -> dict:
    """The MMDiT's text keywords as StableDiffusion3Pipeline.encode_prompt builds them without T5:
    each CLIP's penultimate hidden state, concatenated on width; the pooled projections likewise."""
    outs = [enc(ids, output_hidden_states=True) for enc in te]
    return {
        "encoder_hidden_states": torch.cat([o.hidden_states[-2] for o in outs], dim=-1),
        "pooled_projections": torch.cat([o.text_embeds for o in outs], dim=-1),
    }


def loss(net, x0, cond, g, cfg, teacher=None) -> torch.Tensor:
    """Per-example rectified-flow loss: x_s = (1 - s) x0 + s eps, target eps - x0, s logit-normal
    (0, 1) (SD3, Eq. 19); the network sees 1000 s, as FlowMatchEulerDiscreteScheduler's
    timesteps. With a ``teacher`` (``UNetTeacher.given``), s is moved to the nearest of its levels
    and, from s = ``TEACHER_FROM``, the target is the velocity of its x0 estimate,
    (x_s - x0_hat) / s: the same field in expectation, without the draw's own noise."""
    s = torch.sigmoid(torch.randn(x0.shape[0], generator=g)).to(x0.device)
    eps = torch.randn(x0.shape, generator=g).to(x0.device)
    if teacher is not None:
        s = teacher.snap(s)
    sv = s.view(-1, 1, 1, 1)
    xs = (1 - sv) * x0 + sv * eps
    target = eps - x0
    if teacher is not None:
        target = torch.where(sv >= TEACHER_FROM, (xs - teacher(xs, s)) / sv, target)
    out = net(hidden_states=xs, timestep=1000 * s, **cond).sample
    return (out.float() - target).pow(2).mean(dim=(1, 2, 3))


class UNetTeacher:
    """A v-prediction VP UNet folder (the built-in model's layout) as a frozen source of flow
    targets: flow level s is VP level (a, sigma) with s = sigma / (a + sigma), x_vp = (a + sigma)
    x_s; only the UNet's integer training indices are used (between them its time input is
    steep)."""

    def __init__(self, folder: str, device="cpu"):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        from ..core.schedule import VPSchedule
        from .loading import read_json
        from .pipeline import builtin_path

        folder = builtin_path(folder)
        sched = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
        kind = sched.get("_class_name", "")
        # a consistency student's outputs are samples, not E[x0 | x_t]; the table must be the
        # betas' own (no trained betas, no zero-SNR rescale)
        if sched.get("prediction_type") != "v_prediction" or "LCM" in kind or "TCD" in kind:
            raise ValueError(
                f"a teacher must be a v-prediction diffusion UNet; {folder!r} has a {kind or '?'} "
                f"scheduler predicting {sched.get('prediction_type')!r}"
            )
        if sched.get("trained_betas") or sched.get("rescale_betas_zero_snr"):
            raise ValueError(f"{folder!r}: a teacher's schedule must come from its betas alone")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
        if any(k not in sched for k in keys):
            raise ValueError(f"{folder!r}: a teacher's scheduler config needs {', '.join(keys)}")
        kw = {k: sched[k] for k in keys}
        ac = VPSchedule.from_betas(**kw).alphas_cumprod.double()
        self.a, self.sigma = ac.sqrt().float().to(device), (1 - ac).sqrt().float().to(device)
        self.s = self.sigma / (self.a + self.sigma)  # increasing with the index
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device)
        self.text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device)
        for m in (self.unet, self.text):
            m.requires_grad_(False).eval()

    def given(self, ids) -> "UNetTeacher":
        """This teacher for one batch of token ids (encoded once)."""
        with torch.no_grad():
            self.states = self.text(ids)[0]
        return self

    def snap(self, s: torch.Tensor) -> torch.Tensor:
        """Each flow level moved to the nearest teacher level (in s)."""
        i = torch.searchsorted(self.s, s.contiguous()).clamp(1, len(self.s) - 1)
        below = (s - self.s[i - 1]).abs() < (self.s[i] - s).abs()
        return self.s[i - below.long()]

    @torch.no_grad()
    def __call__(self, xs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The teacher's x0 estimate at flow levels ``s`` (each one of ``snap``'s)."""
        i = torch.searchsorted(self.s, s.contiguous()).clamp(max=len(self.s) - 1)
        if not torch.equal(self.s[i], s):
            raise ValueError("the teacher takes only its own levels (UNetTeacher.snap)")
        from ..core.pred import Pred

        a, sg = (v[i].view(-1, 1, 1, 1) for v in (self.a, self.sigma))
        x = (a + sg) * xs
        v = self.unet(x, i, encoder_hidden_states=self.states).sample
        return Pred.from_output("v", v, x, a, sg).x0


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=SHIFT)


def export(net, te, tok, folder: str) -> str:
    """Save as a diffusers StableDiffusion3Pipeline folder without VAE and T5, with its
    ``diffguide.json`` (written aside, then renamed: ``files.save_model``)."""
    from diffusers import StableDiffusion3Pipeline

    from .pipeline import DEFAULTS_FILE

    pipe = StableDiffusion3Pipeline(
        transformer=net.cpu().eval(),
        scheduler=scheduler(),
        vae=None,
        text_encoder=te[0].cpu().eval(),
        tokenizer=tok,
        text_encoder_2=te[1].cpu().eval(),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )

    return save_model(pipe, folder, {DEFAULTS_FILE: DEFAULTS})
