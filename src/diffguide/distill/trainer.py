"""One distillation trainer on accelerate for every method (consistency distillation, DMD2, and
improved consistency training from data, iCT).

Every micro-batch draws its randomness from a generator seeded by (seed, step, micro-batch) and its
examples from a fixed per-epoch permutation, so a run resumed from a checkpoint repeats exactly the
steps it would have taken. Checkpoints are atomic and checksummed (``checkpoint.py``). Several
processes (``torchrun``, ``accelerate launch``): gradients are averaged across them and the
effective batch is batch x processes x grad_accum.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..core.denoiser import NetDenoiser, with_boundary
from ..files import atomic_text, atomic_write, replace_model_files
from . import checkpoint
from .consistency import ConsistencyLoss, student_unet
from .dmd2 import DMD2Loss, GANHead, conditioning_times
from .ict import ICTLoss
from .scm import AdaptiveWeight, SCMLoss

METHODS = ("consistency", "dmd2", "ict", "scm")
ICT_STEPS = 50  # the exported iCT student's LCMScheduler original_inference_steps (diffusers' default)
EMBED_DIM = 256          # LCM's guidance-scale embedding width
TIMESTEP_SCALING = 10.0  # LCMScheduler's boundary constant, used in training and written to the folder


@dataclass
class DistillConfig:
    """Everything a run needs; saved as ``config.json`` beside its checkpoint."""

    out: str
    method: str = "consistency"
    teacher: str = "builtin"
    guidance: str = "cfg"           # the teacher's guidance (DMD2: the real score's)
    student_steps: int = 4
    max_steps: int = 2000
    batch: int = 32
    lr: float = 1e-4
    ema: float = 0.95               # EMA of the student (consistency: the target network); exported
    data: str = "toy"               # "toy" (the built-in world) or a folder of images + metadata.jsonl
    dataset: int = 50000            # toy scenes to draw from
    seed: int = 0
    # consistency distillation
    solver: str = "ddim"
    skip: int = 20
    huber_c: float = 0.001
    scale_min: float = 3.0
    scale_max: float = 13.0
    # DMD2
    fake_ratio: int = 5             # fake-score updates per generator update (two time-scale rule)
    fake_lr: float | None = None    # default: lr
    gan: bool = False               # GAN head on the fake score's bottleneck, against the data
    gan_generator: float = 1e-3
    gan_fake: float = 1e-2
    # iCT (Song & Dhariwal 2023): no teacher; "teacher" is the model whose architecture (and, with
    # init="teacher", weights) the student starts from
    init: str = "teacher"           # "teacher" (fine-tune a diffusion model) or "random" (the paper's)
    ict_s0: int = 10
    ict_s1: int = 1280
    ict_p_mean: float = -1.1
    ict_p_std: float = 2.0
    ict_total: int = 0              # the curriculum's length K in steps (0: max_steps)
    # sCM (Lu & Song 2024): TrigFlow time proposal, tangent warm-up and normalisation, the derivative
    scm_p_mean: float = -0.8
    scm_p_std: float = 1.6
    scm_warmup: int = 10000
    scm_tangent_c: float = 0.1
    scm_derivative: str = "jvp"     # or finite_difference
    scm_prior_weight: bool = False  # weight the loss by 1 / (sigma_d tan t), as SANA-Sprint's code does
    ladd: bool = False              # scm: add LADD, heads on the frozen teacher's features (SANA-Sprint)
    ladd_weight: float = 0.5
    # the loop
    grad_accum: int = 1
    clip: float | None = None       # default: 1 (consistency, as LCM) / 10 (DMD2)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 200
    log_every: int = 20
    validate_every: int = 0         # 0: only at the end
    validate_n: int = 2             # images per toy prompt in validation metrics
    resume: bool = False

    # settings a resumed run must share with its checkpoint (the rest may change, e.g. max_steps)
    # (the effective batch, batch x processes x grad_accum, must match too; its split may change)
    FIXED = ("method", "teacher", "guidance", "student_steps", "data", "dataset", "seed", "solver", "skip", "gan",
             "init", "ict_s0", "ict_s1", "ict_p_mean", "ict_p_std", "ict_total", "scm_p_mean", "scm_p_std",
             "scm_warmup", "scm_tangent_c", "scm_derivative", "scm_prior_weight", "ladd")

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown distillation method {self.method!r}; choose one of: {', '.join(METHODS)}")
        for name in ("student_steps", "max_steps", "batch", "checkpoint_every", "log_every", "grad_accum",
                     "fake_ratio", "dataset", "validate_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.validate_every < 0:
            raise ValueError(f"validate_every must be >= 0, got {self.validate_every!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        for name in ("lr", "fake_lr", "huber_c", "clip"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"scale range must satisfy 0 < min <= max, got {self.scale_min}, {self.scale_max}")
        if self.init not in ("teacher", "random"):
            raise ValueError(f"init must be teacher or random, got {self.init!r}")
        if not 1 <= self.ict_s0 <= self.ict_s1:
            raise ValueError(f"ict_s0 and ict_s1 must satisfy 1 <= s0 <= s1, got {self.ict_s0}, {self.ict_s1}")
        if isinstance(self.ict_total, bool) or not isinstance(self.ict_total, int) or self.ict_total < 0:
            raise ValueError(f"ict_total must be an integer >= 0 (0: max_steps), got {self.ict_total!r}")
        if self.scm_derivative not in ("jvp", "finite_difference"):
            raise ValueError(f"scm_derivative must be jvp or finite_difference, got {self.scm_derivative!r}")
        if not (self.scm_p_std > 0 and self.scm_tangent_c > 0) or self.scm_warmup < 0:
            raise ValueError(f"sCM needs scm_p_std > 0, scm_tangent_c > 0 and scm_warmup >= 0, got "
                             f"{self.scm_p_std!r}, {self.scm_tangent_c!r}, {self.scm_warmup!r}")
        if not self.ict_p_std > 0:
            raise ValueError(f"ict_p_std must be > 0, got {self.ict_p_std!r}")
        if self.ladd and self.method != "scm":
            raise ValueError(f"ladd is an sCM option (SANA-Sprint's hybrid); {self.method} has "
                             f"{'--gan' if self.method == 'dmd2' else 'no adversarial term'}")
        if self.gan and self.method != "dmd2":
            raise ValueError(f"gan is a DMD2 option; {self.method} has "
                             f"{'--ladd' if self.method == 'scm' else 'no adversarial term'}")
        if not self.ladd_weight > 0:
            raise ValueError(f"ladd_weight must be > 0, got {self.ladd_weight!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.data != "toy" and not os.path.isdir(self.data):
            raise ValueError(f"data {self.data!r} is neither 'toy' nor a folder of images")

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- data ------------------------------------------------------------------------------------------

class ToyData:
    """The built-in world's training scenes: 3x32x32 images in [-1, 1] and a caption each."""

    def __init__(self, cfg: DistillConfig):
        from ..toy.data import SceneData

        self.scenes = SceneData(cfg.dataset, cfg.seed, os.path.join(cfg.out, f"scenes_{cfg.seed}_{cfg.dataset}.npz"))
        self.n, self.shape = cfg.dataset, (3, 32, 32)

    def items(self, idx: np.ndarray, epoch: int):
        return self.scenes.batch(idx, epoch, np.zeros(len(idx), dtype=bool))


class FolderData:
    """A folder of images with captions in ``metadata.jsonl`` (lines {"file_name": ..., "text": ...},
    the imagefolder convention), loaded once into memory."""

    def __init__(self, folder: str):
        from PIL import Image

        meta = os.path.join(folder, "metadata.jsonl")
        if not os.path.isfile(meta):
            raise ValueError(f"data folder {folder!r} has no metadata.jsonl (one JSON line per image: "
                             f'{{"file_name": "a.png", "text": "a caption"}})')
        imgs, self.captions = [], []
        with open(meta) as f:
            for k, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    name, text = rec["file_name"], rec["text"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{meta} line {k + 1}: expected {{\"file_name\": ..., \"text\": ...}}") from None
                with Image.open(os.path.join(folder, name)) as im:
                    imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                self.captions.append(str(text))
        if not imgs:
            raise ValueError(f"{meta} lists no images")
        if len({a.shape for a in imgs}) != 1:
            raise ValueError(f"images in {folder!r} differ in size; all must match the teacher's")
        self.images = np.stack(imgs)
        self.n = len(imgs)
        self.shape = (3,) + self.images.shape[1:3]

    def items(self, idx: np.ndarray, epoch: int):
        x = torch.from_numpy(self.images[idx].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        return x.contiguous(), [self.captions[i] for i in idx]


def batches(cfg: DistillConfig, data, family, device, parts: int):
    """(step, part) -> (x0 in the teacher's space, captions). A step's examples are one slice of a
    fixed per-epoch permutation, as large as the effective batch (``parts`` micro-batches of
    ``cfg.batch``: processes x accumulation), so the data a step sees does not depend on how its
    batch is split between processes and accumulation."""
    size = family.default_size
    if data.shape != (3, size, size):
        raise ValueError(f"the data has {data.shape[1]}x{data.shape[2]} images but the teacher makes "
                         f"{size}x{size} ones; use data of the teacher's size")
    total = cfg.batch * parts
    if data.n < total:
        raise ValueError(f"the effective batch {total} (batch {cfg.batch} x {parts}) is larger than the "
                         f"data ({data.n} images)")
    per_epoch = data.n // total

    def get(step: int, part: int):
        epoch, k = divmod(step, per_epoch)
        order = np.random.Generator(np.random.PCG64([cfg.seed, epoch, 2])).permutation(data.n)
        lo = k * total + part * cfg.batch
        images, caps = data.items(order[lo:lo + cfg.batch], epoch)
        with torch.no_grad():
            x0 = family.encode_images(images.to(device))
        return x0, caps
    return get


# -- the run ---------------------------------------------------------------------------------------

def _net(teacher_net):
    """A trainable copy of the teacher's network, UNet or transformer (same config and weights)."""
    if not (isinstance(teacher_net, torch.nn.Module) and hasattr(type(teacher_net), "from_config")):
        raise ValueError(f"distillation needs a diffusers network as the teacher, got {type(teacher_net).__name__}")
    net = type(teacher_net).from_config(teacher_net.config)
    net.load_state_dict(teacher_net.state_dict())
    return net.to(teacher_net.device, teacher_net.dtype)


def _is_unet(net) -> bool:
    return type(net).__name__ == "UNet2DConditionModel"


def _bottleneck(net):
    """Where DMD2's GAN head reads features: a UNet's mid block, a transformer's middle block."""
    if hasattr(net, "mid_block"):
        return net.mid_block
    blocks = net.transformer_blocks
    return blocks[len(blocks) // 2]


def _width(net) -> int:
    """The bottleneck's channels."""
    c = net.config
    return c.block_out_channels[-1] if hasattr(net, "mid_block") else c.num_attention_heads * c.attention_head_dim


def _denoiser(teacher, net, boundary: bool):
    """``net`` (a teacher-shaped UNet, possibly wrapped for distributed training) as a denoiser."""
    module = getattr(net, "module", net)  # hooks (perturbations, the GAN bottleneck) go on the bare UNet
    d = NetDenoiser(functools.partial(teacher.family.forward, net=net), teacher.info.schedule,
                    teacher.info.kind, learned_sigma=teacher.family.learned_sigma(), module=module)
    return with_boundary(d, _scaling(teacher) if boundary else None)


def _scaling(teacher) -> float | None:
    """The student's boundary constant: LCM's on a VP teacher. A flow student needs none: its x0 = x - s v
    is x itself at s = 0 (as TrigFlow's f), and its folder keeps the teacher's own scheduler."""
    return TIMESTEP_SCALING if type(teacher.info.schedule).__name__ == "VPSchedule" else None


def _embeds(cfg: DistillConfig, guidance) -> bool:
    """LCM's scale embedding: only when the teacher's guidance is CFG (its scale is drawn per sample)."""
    return cfg.method in ("consistency", "scm") and type(guidance).__name__ == "CFG"


class Run:
    """The networks, optimisers and losses of one run, with ``state()`` / ``load()`` for checkpoints.

    The trainable networks (student; DMD2's fake score and GAN head) go through
    ``accelerator.prepare`` and the losses call what it returned, so that on several processes every
    backward pass averages the gradients across them."""

    def __init__(self, cfg: DistillConfig, teacher, acc, state: dict | None = None):
        from ..core.registry import parse_spec

        self.cfg, self.teacher, self.acc = cfg, teacher, acc
        self.guidance = parse_spec("guidance", cfg.guidance)
        tnet = teacher.family.net
        _net(tnet)  # checks the teacher's kind
        if not hasattr(teacher.info.schedule, "index_time"):
            raise ValueError(f"{cfg.method} needs a teacher with training timesteps (a VP or flow-matching "
                             f"scheduler); {type(tnet).__name__} has a {type(teacher.info.schedule).__name__}")
        torch.manual_seed(cfg.seed)  # any fresh weights (the GAN head) depend on the seed only
        # a scale embedding needs a UNet's time_cond_proj_dim; transformer students bake the guidance in
        self.embed = _embeds(cfg, self.guidance) and _is_unet(tnet)
        student = student_unet(tnet, EMBED_DIM) if self.embed else _net(tnet)
        if cfg.method == "ict" and cfg.init == "random":
            student = type(student).from_config(student.config).to(tnet.device, tnet.dtype)
        if cfg.gradient_checkpointing and student._supports_gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(student).requires_grad_(False).eval()
        decay = dict(weight_decay=0.0) if cfg.method != "dmd2" else dict(weight_decay=0.01)
        self.weight = AdaptiveWeight().to(tnet.device) if cfg.method == "scm" else None
        params = list(student.parameters()) + (list(self.weight.parameters()) if self.weight is not None else [])
        self.student, self.opt = student, torch.optim.AdamW(params, lr=cfg.lr, **decay)
        self.fake = self.head = self.fake_opt = None
        if cfg.method == "dmd2":
            self.fake = _net(tnet)
            if cfg.gradient_checkpointing and self.fake._supports_gradient_checkpointing:
                self.fake.enable_gradient_checkpointing()
            params = list(self.fake.parameters())
            if cfg.gan:
                self.head = GANHead(_width(tnet)).to(tnet.device)
                params += list(self.head.parameters())
            self.fake_opt = torch.optim.AdamW(params, lr=cfg.fake_lr or cfg.lr, weight_decay=0.01)
        if cfg.ladd:  # heads on the frozen teacher's blocks; the teacher is the discriminator's body
            from .ladd import feature_widths

            self.head = torch.nn.ModuleList(GANHead(w) for w in feature_widths(tnet)).to(tnet.device)
            self.fake_opt = torch.optim.AdamW(self.head.parameters(), lr=cfg.fake_lr or cfg.lr, weight_decay=0.0)
        self.clip = cfg.clip or (10.0 if cfg.method == "dmd2" else 1.0)
        self.step0 = self.load(state) if state is not None else 0
        self._prepare()
        self.loss = self._loss()

    def _prepare(self):
        """Wrap the trainable networks and optimisers (DDP on several processes); load first, as
        DDP starts every process from rank 0's weights."""
        acc = self.acc
        names = [n for n in ("student", "opt", "fake", "fake_opt", "head", "weight") if getattr(self, n) is not None]
        with warnings.catch_warnings():  # torch renamed broadcast_buffers; accelerate passes the old name
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            out = acc.prepare(*(getattr(self, n) for n in names))
        for n, m in zip(names, out if len(names) > 1 else [out]):
            setattr(self, n, m)
        self.ema.to(acc.device)

    def _loss(self):
        """The method's loss on the prepared networks (calls go through the distributed wrappers)."""
        from ..pipelines.pipeline import guidance_embedding

        cfg, teacher, un = self.cfg, self.teacher, self.acc.unwrap_model
        if cfg.method == "consistency":
            embed = (lambda w: guidance_embedding(w, EMBED_DIM)) if self.embed else None
            return ConsistencyLoss(teacher.net_denoiser, _denoiser(teacher, self.student, False),
                                   _denoiser(teacher, self.ema, False), self.guidance, cfg.solver, cfg.skip,
                                   cfg.huber_c, (cfg.scale_min, cfg.scale_max), embed=embed,
                                   timestep_scaling=_scaling(teacher))
        if cfg.method == "scm":
            ladd = None
            if cfg.ladd:
                from .ladd import LADD, feature_modules

                ladd = LADD(teacher.net_denoiser, feature_modules(teacher.family.net), self.head)
            return SCMLoss(teacher.net_denoiser, _denoiser(teacher, self.student, False), self.weight, self.guidance,
                           p_mean=cfg.scm_p_mean, p_std=cfg.scm_p_std, tangent_c=cfg.scm_tangent_c,
                           warmup=cfg.scm_warmup, method=cfg.scm_derivative, prior_weight=cfg.scm_prior_weight,
                           ladd=ladd, ladd_weight=cfg.ladd_weight)
        if cfg.method == "ict":
            return ICTLoss(_denoiser(teacher, self.student, False), cfg.ict_total or cfg.max_steps, cfg.ict_s0, cfg.ict_s1,
                           p_mean=cfg.ict_p_mean, p_std=cfg.ict_p_std, timestep_scaling=_scaling(teacher))
        T = teacher.info.schedule.num_train_timesteps
        return DMD2Loss(teacher.net_denoiser, _denoiser(teacher, self.fake, False),
                        _denoiser(teacher, self.student, True), self.guidance,
                        tuple(conditioning_times(cfg.student_steps, T)), head=self.head,
                        bottleneck=_bottleneck(un(self.fake)) if self.head is not None else None,
                        gan_generator=cfg.gan_generator, gan_fake=cfg.gan_fake)

    def state(self, step: int) -> dict:
        un = self.acc.unwrap_model
        s = {"step": step, "config": asdict(self.cfg), "student": un(self.student).state_dict(),
             "ema": self.ema.state_dict(), "opt": self.opt.state_dict()}
        if self.weight is not None:
            s["weight"] = un(self.weight).state_dict()
        if self.fake is not None:
            s["fake"] = un(self.fake).state_dict()
        if self.fake_opt is not None:
            s["fake_opt"] = self.fake_opt.state_dict()
        if self.head is not None:
            s["head"] = un(self.head).state_dict()
        return s

    def load(self, s: dict) -> int:
        self.student.load_state_dict(s["student"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["opt"])
        if self.weight is not None:
            self.weight.load_state_dict(s["weight"])
        if self.fake is not None:
            self.fake.load_state_dict(s["fake"])
        if self.fake_opt is not None:
            self.fake_opt.load_state_dict(s["fake_opt"])
        if self.head is not None:
            self.head.load_state_dict(s["head"])
        return int(s["step"])

    def _update(self, modules, opt, loss_of, n: int):
        """One optimiser step over ``n`` micro-batches (gradients averaged across processes once, at
        the last); returns the mean logs."""
        opt.zero_grad(set_to_none=True)
        logs: dict = {}
        for j in range(n):
            with contextlib.ExitStack() as stack:
                if j < n - 1:
                    for m in modules:
                        stack.enter_context(self.acc.no_sync(m))
                with self.acc.autocast():
                    loss, lg = loss_of(j)
                self.acc.backward(loss / n)
            for k, v in lg.items():
                logs[k] = logs.get(k, 0.0) + v / n
        self.acc.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], self.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return logs

    def step(self, step: int, get) -> dict:
        """One training step: ``grad_accum`` micro-batches per process, then one optimiser step.
        Micro-batch ``part`` = j x processes + rank has its own data slice and generator, so one
        process with accumulation 2 and two processes without take the same step."""
        cfg, fam, dev = self.cfg, self.teacher.family, self.acc.device
        n, world = cfg.grad_accum, self.acc.num_processes
        micro = []
        for j in range(n):
            part = j * world + self.acc.process_index
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * n * world + part)
            x0, caps = get(step, part)
            with torch.no_grad():
                pos, neg = fam.encode(caps, [""] * len(caps), 1, dev)
                size = fam.default_size  # the data's size (checked in batches()), in pixels
                pos, neg = (fam.extra(c, size, size) if c is not None else c for c in (pos, neg))
                w = self.teacher.embedded_guidance  # the teacher's own guidance input (Flux.1-dev), its default
                if w is not None:
                    pos, neg = (fam.embed_guidance(c, w, len(caps)) for c in (pos, neg))
            micro.append((g, x0, pos, neg))
        if cfg.method == "consistency":
            def loss_of(j):
                g, x0, pos, neg = micro[j]
                loss = self.loss(x0, pos, neg, g)
                return loss, {"loss": loss.item()}
            logs = self._update([self.student], self.opt, loss_of, n)
        elif cfg.method == "scm":
            from ..pipelines.pipeline import frozen

            fakes: list = []

            def loss_of(j):
                g, x0, pos, neg = micro[j]
                guidance, cond = self._scales(pos, g, x0.shape[0])
                return self.loss(x0, pos, neg, step, g, guidance=guidance, student_cond=cond, keep=fakes)
            heads = [self.acc.unwrap_model(self.head)] if self.head is not None else []
            with frozen(*heads):  # the adversarial term reaches the student through the heads, not into them
                logs = self._update([self.student, self.weight], self.opt, loss_of, n)
            if self.head is not None:
                def head_loss(j):
                    g, x0, pos, _ = micro[j]
                    d = self.loss.ladd.discriminator_loss(fakes[j], x0, pos, g)
                    return d, {"adv_d": d.item()}
                logs.update(self._update([self.head], self.fake_opt, head_loss, n))
        elif cfg.method == "ict":
            def loss_of(j):
                g, x0, pos, _ = micro[j]
                return self.loss(x0, pos, step, g)
            logs = self._update([self.student], self.opt, loss_of, n)
        else:
            logs = self._dmd2(step, micro)
        with torch.no_grad():
            for pe, ps in zip(self.ema.parameters(), self.acc.unwrap_model(self.student).parameters()):
                pe.lerp_(ps.detach(), 1 - cfg.ema)
        if world > 1:  # the step's mean over every process's micro-batches
            keys = sorted(logs)
            mean = self.acc.reduce(torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=dev), "mean")
            logs = dict(zip(keys, mean.tolist()))
        return logs

    def _scales(self, pos, g, b):
        """sCM with CFG: a scale per example in [scale_min, scale_max] for the teacher, embedded into
        the student as SANA-Sprint embeds its guidance (LCM's w-embedding); other methods as given."""
        from ..pipelines.pipeline import guidance_embedding
        from .consistency import PerSampleCFG

        if not self.embed:
            return None, None
        lo, hi = self.cfg.scale_min, self.cfg.scale_max
        w = lo + (hi - lo) * torch.rand(b, generator=g, dtype=torch.float64)
        cond = {**pos, "timestep_cond": guidance_embedding(w - 1.0, EMBED_DIM).to(self.acc.device)}
        return PerSampleCFG(w), cond

    def _dmd2(self, step: int, micro) -> dict:
        from ..pipelines.pipeline import frozen

        cfg, logs, un = self.cfg, {}, self.acc.unwrap_model
        samples = []
        for g, x0, pos, neg in micro:
            noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
            samples.append(noise)
        critics = [un(m) for m in (self.fake, self.head) if m is not None]
        if step % cfg.fake_ratio == 0:  # the generator moves on the slow time scale
            gens = [None] * len(micro)

            def gen_loss(j):
                g, x0, pos, neg = micro[j]
                x, _ = self.loss.sample(samples[j], pos, g)
                gens[j] = x.detach()
                return self.loss.generator_loss(x, pos, neg, g)
            with frozen(*critics):  # the GAN term reaches the generator through them, not into them
                logs.update(self._update([self.student], self.opt, gen_loss, len(micro)))
        else:
            with torch.no_grad(), self.acc.autocast():
                gens = [self.loss.sample(samples[j], micro[j][2], micro[j][0])[0] for j in range(len(micro))]

        def fake_loss(j):
            g, x0, pos, _ = micro[j]
            return self.loss.fake_loss(gens[j], pos, g, real=x0 if cfg.gan else None)
        logs.update(self._update([m for m in (self.fake, self.head) if m is not None], self.fake_opt,
                                 fake_loss, len(micro)))
        return logs


def effective_batch(batch: int, processes: int, grad_accum: int) -> str:
    return f"{batch * processes * grad_accum} (batch {batch} x {processes} process{'es' * (processes > 1)} " \
           f"x accumulation {grad_accum})"


def _check_resume(cfg: DistillConfig, state: dict, processes: int, ckpt: str) -> None:
    """Settings that shape the run must match the checkpoint's; the effective batch must too, however
    it is split between processes and accumulation."""
    old = state["config"]
    for k in DistillConfig.FIXED:
        if old.get(k) != getattr(cfg, k):
            raise ValueError(f"{ckpt} was trained with {k}={old.get(k)!r}, not {getattr(cfg, k)!r}; resume "
                             f"with the same setting")
    if cfg.method == "ict" and not cfg.ict_total and old.get("max_steps") != cfg.max_steps:
        raise ValueError(f"{ckpt} was trained with max_steps={old.get('max_steps')!r}, over which iCT's "
                         f"discretisation curriculum is laid out; resume with the same --max-steps (or fix the "
                         f"curriculum's length with --ict-total from the start)")
    was = (old["batch"], state.get("processes", 1), old["grad_accum"])
    if was[0] * was[1] * was[2] != cfg.batch * processes * cfg.grad_accum:
        raise ValueError(f"{ckpt} was trained with an effective batch of {effective_batch(*was)}, but this "
                         f"run has {effective_batch(cfg.batch, processes, cfg.grad_accum)}; resume with the "
                         f"same effective batch (change --batch or --grad-accum to match)")


RUN_FILES = ("config.json", "loss.jsonl", "val.jsonl", "val", "student")  # what a run writes beside checkpoint.pt


def check_out(out: str, overwrite: bool) -> None:
    """The run folder checked before any work: a folder (or a new path) the system takes; a new run
    finds none of a run's files there unless ``overwrite``; a student folder that is not a model
    folder is never written into."""
    from ..files import check_link, check_path, is_model_folder

    # the deepest path a run writes: the student's export, aside and in place
    check_path(os.path.join(out, "student.tmp", "text_encoder_2", "model.safetensors.index.json"), "--out")
    check_link(out, "--out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; give a folder for the run")
    student = os.path.join(out, "student")
    if os.path.isdir(student) and os.listdir(student) and not is_model_folder(student):
        raise ValueError(f"{student!r} holds files and is not a model folder; the student is written there: "
                         f"move them or choose another --out")
    found = [name for name in RUN_FILES if os.path.lexists(os.path.join(out, name))]
    if found and not overwrite:
        raise ValueError(f"{os.path.join(out, found[0])!r} exists (a previous run's); pass --resume to continue "
                         f"that run, --overwrite to replace its files, or choose another --out")


def _tidy(out: str, step: int) -> None:
    """Before resuming at ``step``: remove temporary files a killed save left, and the log lines
    written after the checkpoint (they will be written again)."""
    for name in os.listdir(out):
        if name.startswith(("checkpoint.pt.tmp", "student.tmp", ".checkpoint.pt.")):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for name in ("loss.jsonl", "val.jsonl"):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by the kill
                    continue
                if isinstance(rec, dict) and rec.get("step", step + 1) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        atomic_text(path, "".join(keep))


def train(cfg: DistillConfig, progress: bool = True, overwrite: bool = False) -> str:
    """Distil (or resume with ``cfg.resume``); returns the exported student folder ``cfg.out/student``.
    A new run into a folder that holds a run's files (config, logs, validation, a student) is refused
    unless ``overwrite``, which replaces them by name (``check_out``); a resumed run's files are its own.

    Launched on several processes (``torchrun``, ``accelerate launch``) each process trains on its
    own micro-batches and the gradients are averaged: the effective batch is batch x processes x
    grad_accum. Only the main process writes; the others wait for it."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    from ..pipelines import GuidedPipeline
    from ..pipelines.parallel import check_world, launched, on_cpu

    cfg.check()
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    # no buffer broadcast: processes may run different numbers of no-grad forwards (DMD2's backward
    # simulation), and the UNets have no buffers that training changes
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=launched() and on_cpu(),
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    world = acc.num_processes
    check_world(world)
    state = None
    if os.path.exists(ckpt):
        if not cfg.resume:
            raise ValueError(f"{ckpt} exists; pass --resume to continue it or choose another --out")
        state = checkpoint.load(ckpt)
        _check_resume(cfg, state, world, ckpt)
    check_out(cfg.out, overwrite or state is not None)  # a resumed run's files are its own
    acc.wait_for_everyone()  # every process has read the checkpoint before the main one tidies
    if acc.is_main_process and os.path.isdir(cfg.out):
        _tidy(cfg.out, state["step"] if state is not None else 0)
    teacher = GuidedPipeline.from_pretrained(cfg.teacher, progress=False, device=acc.device)
    for m in teacher.pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    if acc.is_main_process:  # made once the teacher loads: a run that cannot start leaves no empty folder
        os.makedirs(cfg.out, exist_ok=True)
    with acc.main_process_first():  # the main process renders and caches the toy scenes once
        data = ToyData(cfg) if cfg.data == "toy" else FolderData(cfg.data)
    get = batches(cfg, data, teacher.family, acc.device, world * cfg.grad_accum)
    run = Run(cfg, teacher, acc, state)
    step = run.step0
    running: dict = dict(state.get("log_window", {})) if state is not None else {}
    log = None
    if acc.is_main_process:
        _write_json(os.path.join(cfg.out, "config.json"),
                    {**asdict(cfg), "processes": world,
                     "effective_batch": cfg.batch * world * cfg.grad_accum})
        log = open(os.path.join(cfg.out, "loss.jsonl"), "a")
        if progress:
            print(f"distill {cfg.method}: effective batch {effective_batch(cfg.batch, world, cfg.grad_accum)}",
                  file=sys.stderr)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress or not acc.is_main_process,
               desc=f"distill {cfg.method}")
    t0 = time.time()
    while step < cfg.max_steps:
        logs = run.step(step, get)
        step += 1
        for k, v in logs.items():
            running.setdefault(k, []).append(v)
        bar.update(1)
        if acc.is_main_process:
            if step % cfg.log_every == 0:
                rec = {"step": step, **{k: float(np.mean(v)) for k, v in running.items()},
                       "seconds": round(time.time() - t0, 2)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k not in ("step", "seconds")})
                running = {}
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint.save(ckpt, {**run.state(step), "processes": world, "log_window": running})
            if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.max_steps:
                validate(teacher, run.ema, cfg, step)
        if step % cfg.checkpoint_every == 0 or (cfg.validate_every and step % cfg.validate_every == 0):
            acc.wait_for_everyone()
    bar.close()
    folder = os.path.join(cfg.out, "student")
    if acc.is_main_process:
        log.close()
        export(teacher, run.ema, cfg, folder)
        validate(teacher, run.ema, cfg, step)
    acc.wait_for_everyone()
    return folder


def _write_json(path: str, obj) -> None:
    atomic_text(path, json.dumps(obj, indent=1))


# -- the student as a diffusers folder -------------------------------------------------------------

def student_pipe(teacher, net, cfg: DistillConfig):
    """The teacher's pipeline with the student UNet and an LCMScheduler whose grid is the student's:
    LCM's original_inference_steps = T / skip (consistency) or = student steps (DMD2's 999, 749, ...)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    key = "unet" if _is_unet(net) else "transformer"
    if cfg.method == "scm" or _scaling(teacher) is None:
        # no boundary to add (TrigFlow's f, a flow's x - s v): the teacher's pipeline and scheduler
        return type(teacher.pipe)(**{**teacher.pipe.components, key: net.eval()})
    sc = dict(teacher.pipe.scheduler.config)
    T = sc.get("num_train_timesteps", 1000)
    keep = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr", "num_train_timesteps")
    sch = LCMScheduler(**{k: sc[k] for k in keep if k in sc}, timestep_scaling=TIMESTEP_SCALING,
                       original_inference_steps={"consistency": T // cfg.skip, "ict": ICT_STEPS}.get(
                           cfg.method, cfg.student_steps))
    p = teacher.pipe
    if type(p).__name__ != "StableDiffusionPipeline":  # its own pipeline with LCM's scheduler (as PixArt-LCM)
        return type(p)(**{**p.components, key: net.eval(), "scheduler": sch})
    return LatentConsistencyModelPipeline(vae=getattr(p, "vae", None), text_encoder=p.text_encoder,
                                          tokenizer=p.tokenizer, unet=net.eval(), scheduler=sch,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


def export(teacher, net, cfg: DistillConfig, folder: str) -> str:
    """Write the student folder (aside, then renamed) with ``diffguide.json`` giving its default steps."""
    pipe = student_pipe(teacher, net, cfg)
    tmp = folder.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    meta = {"steps": cfg.student_steps, "sampler": "consistency", "guidance": "none", "method": cfg.method,
            "teacher": cfg.teacher, "teacher_guidance": cfg.guidance, **_own_grid(cfg, teacher)}
    if getattr(net.config, "time_cond_proj_dim", None):  # the scale the student is sampled at by default
        meta["guidance_scale"] = default_scale(cfg)
    _write_json(os.path.join(tmp, "diffguide.json"), meta)
    if os.path.isdir(folder):  # the model's files replaced by name; nothing else in the folder touched
        replace_model_files(tmp, folder)
        shutil.rmtree(tmp)  # this run's own temporary folder, empty by now
    else:
        os.replace(tmp, folder)
    return folder


def _own_grid(cfg: DistillConfig, teacher) -> dict:
    """An sCM student samples on SCMScheduler's TrigFlow times mapped to its schedule; a flow student of
    the other methods on the LCM grid its LCMScheduler would carry (``original_steps``)."""
    if cfg.method == "scm":
        return {"spacing": "scm"}
    if _scaling(teacher) is None:
        T = teacher.info.schedule.num_train_timesteps
        return {"original_steps": {"consistency": T // cfg.skip, "ict": ICT_STEPS}.get(cfg.method, cfg.student_steps)}
    return {}


def default_scale(cfg: DistillConfig) -> float:
    """A scale-embedding student's default: the CFG spec's scale when inside the trained range, else
    the middle of the range."""
    from ..core.registry import parse_spec

    w = getattr(parse_spec("guidance", cfg.guidance), "scale", None)
    return float(w) if w is not None and cfg.scale_min <= w <= cfg.scale_max else (cfg.scale_min + cfg.scale_max) / 2


def validate(teacher, net, cfg: DistillConfig, step: int) -> dict | None:
    """Validation at ``step``: a grid of the student's samples (``val/step_N.png``) and, for a toy-world
    teacher, ``diffguide eval`` metrics at the student's steps (appended to ``val.jsonl``)."""
    from ..evaluate import grid, prompt_set
    from ..pipelines import GuidedPipeline
    from ..toy import evaluator, metrics

    was = net.training
    gp = GuidedPipeline.from_pipe(student_pipe(teacher, net, cfg), progress=False)
    gp.set_defaults({"guidance_scale": default_scale(cfg), "sampler": "consistency", **_own_grid(cfg, teacher)})
    try:
        # a class-conditional teacher (DiT) is shown its first classes instead of the toy prompts
        prompts = list(metrics.DEFAULT_PROMPTS) if teacher.family.name != "dit" else list(range(4))
        images, ids, nfe, seconds = prompt_set(gp, prompts, cfg.validate_n, 0, "none", None, cfg.student_steps)
        os.makedirs(os.path.join(cfg.out, "val"), exist_ok=True)
        img = grid([images[ids == k] for k in range(len(prompts))], [str(p) for p in prompts])
        atomic_write(os.path.join(cfg.out, "val", f"step_{step}.png"), lambda f: img.save(f, format="PNG"))
        if data_is_toy(teacher):
            res = metrics.evaluate(images, ids, prompts, evaluator.load())
            res.pop("adherence_by_prompt", None)
            rec = {"step": step, "steps": cfg.student_steps, "nfe_per_image": nfe,
                   "seconds_per_image": round(seconds, 4), **res}
            with open(os.path.join(cfg.out, "val.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            return rec
        return None
    finally:
        net.train(was)


def data_is_toy(teacher) -> bool:
    """Whether the teacher draws the toy world (32x32 pixels, the built-in tokenizer's vocabulary)."""
    fam = teacher.family
    return fam.default_size == 32 and fam.factor == 1 and getattr(teacher.pipe, "vae", None) is None
