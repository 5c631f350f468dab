"""A distillation run's settings (``DistillConfig``), saved as ``config.json`` beside its
checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from .methods import method_class

# the adversarial add-ons, each the option of one method (``Method.adversarial``)
ADVERSARIAL = {"ladd": "an sCM option (SANA-Sprint's hybrid)", "gan": "a DMD2 option"}


@dataclass
class DistillConfig:
    """Everything a run needs; saved as ``config.json`` beside its checkpoint."""

    out: str
    method: str = "consistency"  # a name in methods.METHODS
    teacher: str = "builtin"
    guidance: str = "cfg"  # the teacher's guidance (DMD2: the real score's)
    student_steps: int = 4
    max_steps: int = 2000
    batch: int = 32
    lr: float = 1e-4
    ema: float = 0.95  # EMA of the student (consistency: the target network); exported
    data: str = "toy"  # "toy" (the built-in world) or a folder of images + metadata.jsonl
    dataset: int = 50000  # toy scenes to draw from
    seed: int = 0
    # consistency distillation
    solver: str = "ddim"
    skip: int = 20
    huber_c: float = 0.001
    scale_min: float = 3.0
    scale_max: float = 13.0
    # DMD2
    fake_ratio: int = 5  # fake-score updates per generator update (two time-scale rule)
    fake_lr: float | None = None  # default: lr
    gan: bool = False  # GAN head on the fake score's bottleneck, against the data
    gan_generator: float = 1e-3
    gan_fake: float = 1e-2
    # iCT (Song & Dhariwal 2023): no teacher; "teacher" is the model whose architecture (and, with
    # init="teacher", weights) the student starts from
    init: str = "teacher"  # "teacher" (fine-tune a diffusion model) or "random" (the paper's)
    ict_s0: int = 10
    ict_s1: int = 1280
    ict_p_mean: float = -1.1
    ict_p_std: float = 2.0
    ict_total: int = 0  # the curriculum's length K in steps (0: max_steps)
    ict_caption_dropout: float = 0.1  # empty captions in training, so the student takes CFG
    ict_schedule: str = "ict"  # "ect": ECT's continuous pairs, a start from the teacher's weights
    ict_ect_stage: int = 0  # ECT: steps per stage, each halving the gap t - r (0: K / 8)
    # sCM (Lu & Song 2024; SANA-Sprint's settings, arXiv 2503.09641): the time proposal
    # (SANA-Sprint's log-normal 0.2, 1.6) and the share of draws at the sampler's start, the
    # student's time input, the first steps that fit the student to the guided teacher on that
    # input, the tangent warm-up and normalisation, the derivative, and w(t)'s own learning rate
    scm_p_mean: float = 0.2
    scm_p_std: float = 1.6
    scm_start_share: float = 0.1
    scm_time: str = "index"  # the teacher's own timestep; "dense": sin t / (sin t + cos t)
    scm_fit_steps: int | None = None  # default: 200 with the dense input, 0 with the index
    scm_warmup: int = 10000
    scm_tangent_c: float = 0.1
    scm_derivative: str = "secant"  # over teacher timesteps; or jvp, or finite_difference
    scm_secant_steps: int = 8  # secant: the teacher timesteps either side
    scm_weight_lr: float = 1e-2
    scm_prior_weight: bool = False  # weight the loss by 1 / (sigma_d tan t), as SANA-Sprint's code
    ladd: bool = False  # scm: add LADD, heads on the frozen teacher's features (SANA-Sprint)
    ladd_weight: float = 0.5
    rcm_dmd_weight: float = 1.0  # rcm: the DMD term's weight beside the sCM loss
    # SANA-Sprint's LADD: the student's estimate for the adversarial term from a fresh x_t, this
    # share of its times at t_max (train_largest_timestep; 0: the sCM pass's estimate), and real
    # images under other examples' captions among the heads' fakes (misaligned_pairs_D)
    ladd_start_share: float = 0.5
    ladd_misaligned: bool = True
    # LoRA (LCM-LoRA, Hyper-SD, PCM): rank R adapters on a frozen copy of the teacher's network,
    # exported beside the merged student as a LoRA file the teacher's pipeline loads; 0: the whole
    # network trains
    lora_rank: int = 0
    # the loop
    grad_accum: int = 1
    clip: float | None = None  # default: the method's (Method.default_clip: 1, DMD2 10)
    lr_warmup: int | None = None  # linear warm-up steps; default: the method's (sCM 100, else 0)
    lr_decay: str = "none"  # "cosine": every rate to 0 at max_steps (after the warm-up's ramp)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 200
    log_every: int = 20
    validate_every: int = 0  # 0: only at the end
    validate_n: int = 2  # images per toy prompt in validation metrics
    validate_prompts: int = 0  # the first N of the toy prompts in validation (0: all)
    resume: bool = False

    # settings a resumed run must share with its checkpoint (the rest may change, e.g. max_steps)
    # (the effective batch, batch x processes x grad_accum, must match too; its split may change)
    FIXED = (
        "method",
        "teacher",
        "guidance",
        "student_steps",
        "data",
        "dataset",
        "seed",
        "solver",
        "skip",
        "gan",
        "init",
        "ict_s0",
        "ict_s1",
        "ict_p_mean",
        "ict_p_std",
        "ict_total",
        "ict_caption_dropout",
        "ict_schedule",
        "ict_ect_stage",
        "scm_p_mean",
        "scm_p_std",
        "scm_start_share",
        "scm_time",
        "scm_fit_steps",
        "scm_warmup",
        "scm_tangent_c",
        "scm_derivative",
        "scm_secant_steps",
        "scm_prior_weight",
        "ladd",
        "ladd_start_share",
        "ladd_misaligned",
        "lora_rank",
    )
    # what a checkpoint written before a FIXED setting existed was trained with (its old behaviour)
    FIXED_BEFORE = {
        "lora_rank": 0,
        "scm_time": "index",
        "scm_fit_steps": 0,
        "scm_start_share": 0.0,
        "ict_caption_dropout": 0.0,
        "ict_schedule": "ict",
        "ict_ect_stage": 0,
        "ladd_start_share": 0.0,
        "ladd_misaligned": False,
        "scm_secant_steps": 8,  # no run before it used the secant
    }
    # settings that shape only some methods' runs (by their prefix)
    OWNERS = {"scm_": ("scm", "rcm"), "ladd_": ("scm",), "ict_": ("ict",)}

    def __post_init__(self) -> None:
        # only the dense input needs a fit: with its own timestep the student starts as the teacher
        if self.scm_fit_steps is None:
            self.scm_fit_steps = 200 if self.scm_time == "dense" else 0

    def shapes(self, key: str) -> bool:
        """Whether ``key`` shapes this config's method's run (a resumed run must keep it)."""
        owners = next((m for p, m in self.OWNERS.items() if key.startswith(p)), None)
        return owners is None or self.method in owners

    def check(self) -> None:
        """ValueError naming the first setting out of range (the CLI turns ``name`` into
        ``--name``)."""
        method = method_class(self)  # an unknown name is the first error
        self._check_counts()
        self._check_ranges()
        for flag, owner in ADVERSARIAL.items():
            if getattr(self, flag) and method.adversarial != flag:
                has = f"--{method.adversarial}" if method.adversarial else "no adversarial term"
                raise ValueError(f"{flag} is {owner}; {method.name} has {has}")
        if not self.ladd_weight > 0:
            raise ValueError(f"ladd_weight must be > 0, got {self.ladd_weight!r}")
        if not 0 <= self.ladd_start_share <= 1:
            raise ValueError(f"ladd_start_share must be in [0, 1], got {self.ladd_start_share!r}")
        if self.lr_decay not in ("none", "cosine"):
            raise ValueError(f"lr_decay must be none or cosine, got {self.lr_decay!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(
                f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}"
            )
        if self.data != "toy" and not os.path.isdir(self.data):
            raise ValueError(f"data {self.data!r} is neither 'toy' nor a folder of images")

    def _check_counts(self) -> None:
        for name in (
            "student_steps",
            "max_steps",
            "batch",
            "checkpoint_every",
            "log_every",
            "grad_accum",
            "fake_ratio",
            "dataset",
            "validate_n",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in (
            "validate_every",
            "validate_prompts",
            "scm_fit_steps",
            "lr_warmup",
            "ict_ect_stage",
            "lora_rank",
        ):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")

    def _check_ranges(self) -> None:
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        for name in ("lr", "fake_lr", "huber_c", "clip", "scm_weight_lr", "rcm_dmd_weight"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"scale range must satisfy 0 < min <= max, got {self.scale_min}, {self.scale_max}"
            )
        if self.init not in ("teacher", "random"):
            raise ValueError(f"init must be teacher or random, got {self.init!r}")
        if self.lora_rank and self.init == "random":  # adapters on random weights adapt nothing
            raise ValueError(
                f"lora_rank must be 0 with init=random (LoRA adapts the teacher's weights), "
                f"got {self.lora_rank!r}"
            )
        if not 1 <= self.ict_s0 <= self.ict_s1:
            raise ValueError(
                f"ict_s0 and ict_s1 must satisfy 1 <= s0 <= s1, got {self.ict_s0}, {self.ict_s1}"
            )
        if (
            isinstance(self.ict_total, bool)
            or not isinstance(self.ict_total, int)
            or self.ict_total < 0
        ):
            raise ValueError(
                f"ict_total must be an integer >= 0 (0: max_steps), got {self.ict_total!r}"
            )
        if self.scm_secant_steps < 1:
            raise ValueError(f"scm_secant_steps must be >= 1, got {self.scm_secant_steps!r}")
        if self.scm_derivative not in ("jvp", "finite_difference", "secant"):
            raise ValueError(
                "scm_derivative must be jvp, finite_difference or secant, got "
                f"{self.scm_derivative!r}"
            )
        if not (self.scm_p_std > 0 and self.scm_tangent_c > 0) or self.scm_warmup < 0:
            raise ValueError(
                f"sCM needs scm_p_std > 0, scm_tangent_c > 0 and scm_warmup >= 0, got "
                f"{self.scm_p_std!r}, {self.scm_tangent_c!r}, {self.scm_warmup!r}"
            )
        if self.scm_time not in ("dense", "index"):
            raise ValueError(f"scm_time must be dense or index, got {self.scm_time!r}")
        if not 0 <= self.scm_start_share < 1:
            raise ValueError(f"scm_start_share must be in [0, 1), got {self.scm_start_share!r}")
        if self.ict_schedule not in ("ict", "ect"):
            raise ValueError(f"ict_schedule must be ict or ect, got {self.ict_schedule!r}")
        if not 0 <= self.ict_caption_dropout < 1:
            raise ValueError(
                f"ict_caption_dropout must be in [0, 1), got {self.ict_caption_dropout!r}"
            )
        if not self.ict_p_std > 0:
            raise ValueError(f"ict_p_std must be > 0, got {self.ict_p_std!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
