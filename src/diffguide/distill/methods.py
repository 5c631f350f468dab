"""The distillation methods behind one interface: consistency distillation (LCM), DMD2, sCM and iCT,
with LADD as an add-on of sCM.

A ``Method`` owns the networks it trains and their optimisers (``modules()``, ``optimisers()``, by
their checkpoint keys), says what one training step optimises (``updates(batch, step)``: a list of
``Update``), and how its student is exported (``student_scheduler()``, ``student_grid()``). The run
loop (``run.py``) does everything else the same way for every method: distributed wrapping,
accumulation, clipping, the EMA, checkpoints, validation and logs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..core.denoiser import NetDenoiser, TrigFlowTime, with_boundary
from ..core.registry import parse_spec
from ..core.schedule import VPSchedule
from ..guidance.cfg import CFG
from .consistency import ConsistencyLoss, PerSampleCFG, draw_scales, student_unet
from .data import drop_captions
from .dmd2 import DMD2Loss, GANHead, conditioning_times
from .ict import ICTLoss
from .ladd import LADD, TokenHead, feature_modules, feature_widths
from .scm import SIGMA_D, AdaptiveWeight, SCMLoss

if TYPE_CHECKING:
    from .config import DistillConfig
    from .data import MicroBatch

ICT_STEPS = 50  # the iCT student's LCMScheduler original_inference_steps (diffusers' default)
EMBED_DIM = 256  # LCM's guidance-scale embedding width
TIMESTEP_SCALING = 10.0  # LCMScheduler's boundary constant, in training and in the student's folder

METHODS: dict[str, type[Method]] = {}  # name -> Method class, filled by @register


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    """The Method registered as ``name``."""
    if name not in METHODS:
        raise ValueError(
            f"unknown distillation method {name!r}; choose one of: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def method_class(config: DistillConfig) -> type[Method]:
    """The Method a config names: the one place its ``method`` field is read."""
    return get(config.method)


def create(config: DistillConfig, teacher) -> Method:
    """The Method a config names, its networks built from ``teacher`` (a GuidedPipeline)."""
    return method_class(config)(config, teacher)


# -- pieces the methods share ----------------------------------------------------------------------


def check_network(net) -> None:
    if not (isinstance(net, torch.nn.Module) and hasattr(type(net), "from_config")):
        raise ValueError(
            f"distillation needs a diffusers network as the teacher, got {type(net).__name__}"
        )


def copy_network(net):
    """A trainable copy of the teacher's network, UNet or transformer (same config and weights)."""
    check_network(net)
    copied = type(net).from_config(net.config)
    copied.load_state_dict(net.state_dict())
    return copied.to(net.device, net.dtype)


# the layers a LoRA student adapts: those of diffusers' LCM-LoRA script
# (examples/consistency_distillation/train_lcm_distill_lora_sd.py): a UNet's attention projections,
# its transformer blocks' in/out and feed-forward layers, its resnets' convolutions and time
# projections and its resamplers; a transformer has the attention and feed-forward names among them
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def check_lora(net, pipe, component: str) -> None:
    """ValueError (one line) unless peft can adapt ``net`` and ``pipe``'s class saves and loads
    LoRA weights for its ``component``: what a LoRA student needs to be used on its teacher."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError("LoRA students need peft: pip install 'diffguide[lora]'") from None
    if not hasattr(net, "add_adapter"):
        raise ValueError(
            f"--lora-rank: peft cannot adapt the teacher's {type(net).__name__} (diffusers gives "
            f"it no LoRA adapters); distil it whole with --lora-rank 0"
        )
    if component not in getattr(type(pipe), "_lora_loadable_modules", ()):
        raise ValueError(
            f"--lora-rank: {type(pipe).__name__} loads no LoRA weights into its {component}; "
            f"distil it whole with --lora-rank 0"
        )


def lora_student(net, rank: int):
    """A frozen copy of the teacher's network with trainable LoRA adapters of rank ``rank`` (peft,
    as diffusers' LCM-LoRA script; alpha = rank, so the adapters' scale is 1 wherever they are
    loaded). lora_B starts at zero: the student starts as the teacher."""
    from peft import LoraConfig

    student = copy_network(net).requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights="gaussian"
    )
    try:
        student.add_adapter(config)
    except ValueError as e:  # peft's "Target modules ... not found" runs over several lines
        raise ValueError(
            f"--lora-rank: none of LoRA's target layers is in {type(net).__name__} "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    return student


def has_lora(net) -> bool:
    """Whether ``net`` carries LoRA adapters (diffusers' flag on an adapted model)."""
    return bool(getattr(net, "_hf_peft_config_loaded", False))


def trainable(net) -> list:
    """The parameters an optimiser moves: all of a whole student's, a LoRA student's adapters."""
    return [p for p in net.parameters() if p.requires_grad]


def network_state(net) -> dict:
    """A network's checkpoint state: all its tensors, or a LoRA network's adapters alone (its
    frozen base is the teacher's, rebuilt from it on resume; a checkpoint of SDXL's size less)."""
    state = net.state_dict()
    return {k: v for k, v in state.items() if ".lora_" in k} if has_lora(net) else state


def load_network_state(net, state: dict) -> None:
    """Load what ``network_state`` kept: strictly, or for a LoRA network every adapter tensor."""
    if not has_lora(net):
        net.load_state_dict(state)
        return
    missing, unexpected = net.load_state_dict(state, strict=False)
    lost = [k for k in missing if ".lora_" in k]
    if unexpected or lost:
        raise ValueError(
            f"the checkpoint's LoRA adapters do not fit the student: missing {lost[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def merged(net):
    """``net`` as a plain network: a copy with its LoRA adapters merged into the weights (what a
    student folder holds), or ``net`` itself when it has none."""
    if not has_lora(net):
        return net
    out = copy.deepcopy(net)
    out.fuse_lora()
    out.unload_lora()
    return out


def checkpointed(net, cfg: DistillConfig):
    """``net`` with gradient checkpointing where asked for and supported."""
    if cfg.gradient_checkpointing and net._supports_gradient_checkpointing:
        net.enable_gradient_checkpointing()
    return net


def lcm_boundary(schedule) -> float | None:
    """The student's boundary constant: LCM's on a VP teacher. A flow student needs none: its
    x0 = x - s v is x itself at s = 0 (as TrigFlow's f), and its folder keeps the teacher's own
    scheduler."""
    return TIMESTEP_SCALING if isinstance(schedule, VPSchedule) else None


def network_denoiser(teacher, net, boundary: bool = False, time_input=None):
    """``net`` (a teacher-shaped network, possibly wrapped for distributed training) as a denoiser,
    under LCM's boundary when ``boundary`` (and the teacher's schedule has one), seeing
    ``time_input`` (a ``TrigFlowTime``) instead of the teacher's timesteps where given."""
    # hooks (perturbations, the GAN bottleneck) go on the bare network
    module = getattr(net, "module", net)
    d = NetDenoiser(
        functools.partial(teacher.family.forward, net=net),
        teacher.info.schedule,
        teacher.info.kind,
        learned_sigma=teacher.family.learned_sigma(),
        module=module,
        time_input=time_input,
    )
    return with_boundary(d, lcm_boundary(teacher.info.schedule) if boundary else None)


def embed_scale(w: torch.Tensor) -> torch.Tensor:
    """LCM's sinusoidal embedding of the guidance scale (the student's ``timestep_cond``)."""
    from ..pipelines.families import guidance_embedding

    return guidance_embedding(w, EMBED_DIM)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class Update:
    """One optimiser step of a training step. ``loss(j)`` is micro-batch j's (loss, logs); gradients
    reach ``modules`` (their cross-process sync deferred to the last micro-batch), never ``frozen``
    (bare networks a loss reaches through, e.g. a GAN's critic seen from the generator). The
    gradient norm of ``clipped`` (default: all of ``modules``) is clipped."""

    modules: list
    optimiser: Any
    loss: Callable[[int], tuple]
    frozen: tuple = ()
    clipped: list | None = None


# -- the interface ---------------------------------------------------------------------------------


class Method:
    """A distillation method: its student (and any other trained networks), their optimisers, the
    updates of one training step, and the export of its student.

    Life of a Method: built on the teacher (fresh weights seeded by the config), loaded from a
    checkpoint if resuming (``modules()`` / ``optimisers()``: raw objects by checkpoint key), then
    ``bind`` takes the prepared (distributed) versions from the run and builds the losses on
    them."""

    name = ""
    default_lr = 1e-4  # the CLI's --lr when none is given
    default_clip = 1.0  # the gradient-norm clipping when --clip is not given (LCM's)
    default_lr_warmup = 0  # linear learning-rate warm-up steps when --lr-warmup is not given
    weight_decay = 0.0  # the student's AdamW weight decay
    adversarial: str | None = None  # the config flag of its adversarial term, if it has one
    lcm_boundary = True  # on a VP teacher the student has LCM's boundary (sCM: TrigFlow's f)
    scale_input = False  # with CFG: a scale per example, embedded where the student takes one

    def __init__(self, cfg: DistillConfig, teacher):
        self.cfg, self.teacher, self.family = cfg, teacher, teacher.family
        self.accelerator = None  # given by bind
        self.guidance = parse_spec("guidance", cfg.guidance)
        net = self.family.net
        check_network(net)
        if not hasattr(teacher.info.schedule, "index_time"):
            raise ValueError(
                f"{self.name} needs a teacher with training timesteps (a VP or flow-matching "
                f"scheduler); {type(net).__name__} has a {type(teacher.info.schedule).__name__}"
            )
        self.boundary = lcm_boundary(teacher.info.schedule) if self.lcm_boundary else None
        # a scale embedding needs a UNet's time_cond_proj_dim; transformers bake the guidance in,
        # and so does a LoRA student, whose adapters must load onto the teacher's own network
        self.embed = (
            self.scale_input
            and isinstance(self.guidance, CFG)
            and self.family.scale_embedding
            and not cfg.lora_rank
        )
        if cfg.lora_rank:  # refused before any work on a network or pipeline without LoRA
            check_lora(net, teacher.pipe, self.family.component)
        torch.manual_seed(cfg.seed)  # any fresh weights (the GAN heads) depend on the seed only
        self.student = checkpointed(self.initial_student(net), cfg)
        # the student's EMA (consistency: the target network), updated by the run loop; exported
        self.ema = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.build()

    def initial_student(self, net):
        """The student before training: the teacher's copy (LCM's scale input where embedded), or
        with ``lora_rank`` its frozen copy with LoRA adapters."""
        if self.cfg.lora_rank:
            return lora_student(net, self.cfg.lora_rank)
        return student_unet(net, EMBED_DIM) if self.embed else copy_network(net)

    def build(self) -> None:
        """The trained networks beside the student, in the order their fresh weights are drawn, and
        the optimisers."""
        self.optimiser = adamw(trainable(self.student), self.cfg.lr, self.weight_decay)

    def modules(self) -> dict:
        """The trained networks by checkpoint key (the student's EMA is the run's, key "ema")."""
        return {"student": self.student}

    def optimisers(self) -> dict:
        return {"opt": self.optimiser}

    def bind(self, prepared: dict, accelerator) -> None:
        """Take the prepared networks and optimisers (by checkpoint key) and build the losses on
        them: every call goes through the distributed wrappers, which average the gradients."""
        self.accelerator = accelerator
        self.student, self.optimiser = prepared["student"], prepared["opt"]

    def updates(self, batch: list[MicroBatch], step: int) -> list[Update]:
        """The optimiser steps of training step ``step`` on its micro-batches, in order (an update's
        loss may use what an earlier one computed)."""
        raise NotImplementedError

    def student_update(self, loss: Callable[[int], tuple], frozen: tuple = ()) -> Update:
        """The student's step by its optimiser on ``loss``."""
        return Update([self.student], self.optimiser, loss, frozen)

    @classmethod
    def check_resume(cls, cfg: DistillConfig, old: dict, ckpt: str) -> None:
        """Refuse to resume where a setting the method depends on changed (beyond
        DistillConfig.FIXED)."""

    # -- the student's folder (export.py) --

    def original_steps(self, train_steps: int) -> int:
        """The grid the student was trained on, as LCMScheduler's original_inference_steps: by
        default the student's own steps (DMD2's conditioning times 999, 749, ... are LCM's grid
        for them)."""
        return self.cfg.student_steps

    def student_scheduler(self):
        """LCMScheduler for the student's folder: the teacher's noise table, LCM's boundary and the
        student's training grid; None: no boundary, the student keeps the teacher's scheduler."""
        from diffusers import LCMScheduler

        if self.boundary is None:
            return None
        sc = dict(self.teacher.pipe.scheduler.config)
        keep = (
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "prediction_type",
            "rescale_betas_zero_snr",
            "num_train_timesteps",
        )
        steps = self.original_steps(sc.get("num_train_timesteps", 1000))
        return LCMScheduler(
            **{k: sc[k] for k in keep if k in sc},
            timestep_scaling=self.boundary,
            original_inference_steps=steps,
        )

    def student_grid(self) -> dict:
        """The student's sampling grid for ``diffguide.json``: a flow student samples on the LCM
        grid its LCMScheduler would carry (``original_steps``); a VP student's LCMScheduler
        carries it."""
        if self.boundary is not None:
            return {}
        steps = self.original_steps(self.teacher.info.schedule.num_train_timesteps)
        return {"original_steps": steps}


# -- the methods -----------------------------------------------------------------------------------


@register
class Consistency(Method):
    """Consistency distillation (LCM: Luo et al. 2023, Alg. 1): the student at x_{t_{n+k}} matches
    its EMA at one guided teacher solver step x_{t_n} (``consistency.ConsistencyLoss``)."""

    name = "consistency"
    scale_input = True

    def bind(self, prepared, accelerator):
        super().bind(prepared, accelerator)
        cfg, teacher = self.cfg, self.teacher
        self.loss = ConsistencyLoss(
            teacher.net_denoiser,
            network_denoiser(teacher, self.student),
            network_denoiser(teacher, self.ema),
            self.guidance,
            cfg.solver,
            cfg.skip,
            cfg.huber_c,
            (cfg.scale_min, cfg.scale_max),
            embed=embed_scale if self.embed else None,
            timestep_scaling=self.boundary,
        )

    def updates(self, batch, step):
        def loss(j):
            m = batch[j]
            value = self.loss(m.x0, m.pos, m.neg, m.generator)
            return value, {"loss": value.item()}

        return [self.student_update(loss)]

    def original_steps(self, train_steps):
        """LCM's grid: T / k teacher levels, k the solver's skip."""
        return train_steps // self.cfg.skip


@register
class DMD2(Method):
    """DMD2 (Yin et al. 2024): the generator follows the difference of the guided teacher's score
    and a fake score fitted to its samples, updated fake_ratio times as often (two time-scale
    rule); an optional GAN head on the fake score's bottleneck (``--gan``)."""

    name = "dmd2"
    default_lr = 1e-5
    default_clip = 10.0
    weight_decay = 0.01
    adversarial = "gan"

    def build(self):
        super().build()
        cfg, net = self.cfg, self.family.net
        self.fake = checkpointed(copy_network(net), cfg)
        params = list(self.fake.parameters())
        self.head = None
        if cfg.gan:
            self.head = GANHead(self.family.bottleneck_width(net)).to(net.device)
            params += list(self.head.parameters())
        self.fake_optimiser = adamw(params, cfg.fake_lr or cfg.lr, 0.01)

    def modules(self):
        head = {"head": self.head} if self.head is not None else {}
        return {**super().modules(), "fake": self.fake, **head}

    def optimisers(self):
        return {**super().optimisers(), "fake_opt": self.fake_optimiser}

    def bind(self, prepared, accelerator):
        super().bind(prepared, accelerator)
        self.fake, self.fake_optimiser = prepared["fake"], prepared["fake_opt"]
        self.head = prepared.get("head")
        self.critics = [m for m in (self.fake, self.head) if m is not None]
        cfg, teacher = self.cfg, self.teacher
        taus = conditioning_times(cfg.student_steps, teacher.info.schedule.num_train_timesteps)
        bottleneck = None
        if self.head is not None:
            bottleneck = self.family.bottleneck(accelerator.unwrap_model(self.fake))
        self.loss = DMD2Loss(
            teacher.net_denoiser,
            network_denoiser(teacher, self.fake),
            network_denoiser(teacher, self.student, boundary=True),
            self.guidance,
            tuple(taus),
            head=self.head,
            bottleneck=bottleneck,
            gan_generator=cfg.gan_generator,
            gan_fake=cfg.gan_fake,
        )

    def updates(self, batch, step):
        noise = [
            torch.randn(m.x0.shape, generator=m.generator).to(m.x0.device, m.x0.dtype)
            for m in batch
        ]
        samples: list = [None] * len(batch)  # G's x0 per micro-batch, what the fake score fits
        plan = []
        if step % self.cfg.fake_ratio == 0:  # the generator moves on the slow time scale

            def generator_loss(j):
                m = batch[j]
                x, _ = self.loss.sample(noise[j], m.pos, m.generator)
                samples[j] = x.detach()
                return self.loss.generator_loss(x, m.pos, m.neg, m.generator)

            # the GAN term reaches the generator through the critics, not into them
            critics = tuple(self.accelerator.unwrap_model(m) for m in self.critics)
            plan.append(self.student_update(generator_loss, critics))
        else:
            with torch.no_grad(), self.accelerator.autocast():
                samples[:] = [
                    self.loss.sample(noise[j], m.pos, m.generator)[0] for j, m in enumerate(batch)
                ]

        def fake_loss(j):
            m = batch[j]
            real = m.x0 if self.cfg.gan else None
            return self.loss.fake_loss(samples[j], m.pos, m.generator, real=real)

        plan.append(Update(self.critics, self.fake_optimiser, fake_loss))
        return plan


class LADDAddOn:
    """LADD beside a method's own loss (Sauer et al. 2024; SANA-Sprint's sCM + LADD): per-token
    heads on the frozen teacher's feature blocks (``Family.feature_blocks``) with their own
    optimiser and hinge loss. The method adds ``term``'s generator loss to its own and keeps its x0
    estimates for ``update``."""

    def __init__(self, cfg: DistillConfig, teacher):
        self.teacher, net = teacher, teacher.family.net
        widths = feature_widths(net, teacher.family)
        self.misaligned = cfg.ladd_misaligned
        self.heads = torch.nn.ModuleList(TokenHead(w) for w in widths).to(net.device)
        self.optimiser = adamw(self.heads.parameters(), cfg.fake_lr or cfg.lr, 0.0)

    def modules(self) -> dict:
        return {"head": self.heads}

    def optimisers(self) -> dict:
        return {"fake_opt": self.optimiser}

    def bind(self, prepared: dict, accelerator) -> None:
        self.heads, self.optimiser = prepared["head"], prepared["fake_opt"]
        family = self.teacher.family
        self.term = LADD(
            self.teacher.net_denoiser,
            feature_modules(family.net, family),
            self.heads,
            misaligned=self.misaligned,
        )
        # the adversarial term reaches the student through the heads, not into them
        self.frozen = (accelerator.unwrap_model(self.heads),)

    def update(self, batch: list[MicroBatch], fakes: list) -> Update:
        """The heads' step on micro-batch j's kept student estimates ``fakes[j]`` against its
        data (and, with misaligned pairs, its images under each other's captions as fakes)."""

        def loss(j):
            m = batch[j]
            d = self.term.discriminator_loss(fakes[j], m.x0, m.pos, m.generator)
            return d, {"adv_d": d.item()}

        return Update([self.heads], self.optimiser, loss)


@register
class SCM(Method):
    """Continuous-time consistency distillation, sCM (Lu & Song 2024, Alg. 1, sCD) in TrigFlow,
    with a learned weighting w_phi(t) trained beside the student; optional LADD (``--ladd``,
    SANA-Sprint)."""

    name = "scm"
    adversarial = "ladd"
    lcm_boundary = False
    scale_input = True
    default_lr_warmup = 100

    def build(self):
        cfg = self.cfg
        self.weight = AdaptiveWeight().to(self.family.net.device)  # w_phi(t), Sec. 4.3
        # w's optimum (about log D) is far from its start: its own group, at its own rate
        groups = [
            {"params": trainable(self.student)},
            {"params": list(self.weight.parameters()), "lr": cfg.scm_weight_lr},
        ]
        self.optimiser = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=self.weight_decay)
        self.ladd = LADDAddOn(cfg, self.teacher) if cfg.ladd else None

    def modules(self):
        ladd = self.ladd.modules() if self.ladd else {}
        return {**super().modules(), "weight": self.weight, **ladd}

    def optimisers(self):
        return {**super().optimisers(), **(self.ladd.optimisers() if self.ladd else {})}

    def bind(self, prepared, accelerator):
        super().bind(prepared, accelerator)
        self.weight, cfg = prepared["weight"], self.cfg
        if self.ladd:
            self.ladd.bind(prepared, accelerator)
        self.loss = SCMLoss(
            self.teacher.net_denoiser,
            network_denoiser(self.teacher, self.student, time_input=self.time_input()),
            self.weight,
            self.guidance,
            p_mean=cfg.scm_p_mean,
            p_std=cfg.scm_p_std,
            start_share=cfg.scm_start_share,
            fit_steps=cfg.scm_fit_steps,
            tangent_c=cfg.scm_tangent_c,
            warmup=cfg.scm_warmup,
            method=cfg.scm_derivative,
            secant_steps=cfg.scm_secant_steps,
            prior_weight=cfg.scm_prior_weight,
            ladd=self.ladd.term if self.ladd else None,
            ladd_weight=cfg.ladd_weight,
            ladd_start_share=cfg.ladd_start_share,
        )

    def updates(self, batch, step):
        fakes: list = []  # the student's x0 estimates, for the LADD heads' update

        def loss(j):
            m = batch[j]
            guidance, cond = self._scales(m)
            return self.loss(
                m.x0,
                m.pos,
                m.neg,
                step,
                m.generator,
                guidance=guidance,
                student_cond=cond,
                keep=fakes,
            )

        frozen = self.ladd.frozen if self.ladd else ()
        # the student's gradient clipped alone: w's is larger and would take the clip's share
        plan = [Update([self.student, self.weight], self.optimiser, loss, frozen, [self.student])]
        if self.ladd and step >= self.cfg.scm_fit_steps:  # no estimates to judge while fitting
            plan.append(self.ladd.update(batch, fakes))
        return plan

    def time_input(self):
        """The student's time input: SANA-Sprint's dense sin t / (sin t + cos t), or None (the
        teacher's own timesteps)."""
        return TrigFlowTime(SIGMA_D) if self.cfg.scm_time == "dense" else None

    def _scales(self, m: MicroBatch):
        """With CFG: a scale per example for the teacher, embedded into the student as SANA-Sprint
        embeds its guidance (LCM's w-embedding); else the method's guidance as given."""
        if not self.embed:
            return None, None
        w = draw_scales((self.cfg.scale_min, self.cfg.scale_max), m.x0.shape[0], m.generator)
        embedded = embed_scale(w - 1.0).to(self.accelerator.device)
        return PerSampleCFG(w), {**m.pos, "timestep_cond": embedded}

    def student_grid(self):
        """SCMScheduler's TrigFlow times, mapped to the student's schedule, and the student's time
        input where it is not the teacher's."""
        dense = {"time_input": "trigflow"} if self.cfg.scm_time == "dense" else {}
        return {"spacing": "scm", **dense}


@register
class RCM(SCM):
    """rCM, score-regularised continuous-time consistency (Zheng et al. 2025, NVlabs/rcm): sCM plus
    DMD's reverse-divergence term on the student's own few-step samples, against a fake score
    fitted to them. As the authors' training step: sCM alone until the tangent warm-up ends, then
    the student (sCM + DMD) every ``fake_ratio``-th step and the fake score on the others."""

    name = "rcm"
    adversarial = None

    def build(self):
        super().build()
        self.fake = checkpointed(copy_network(self.family.net), self.cfg)
        self.fake_optimiser = adamw(self.fake.parameters(), self.cfg.fake_lr or self.cfg.lr, 0.0)

    def modules(self):
        return {**super().modules(), "fake": self.fake}

    def optimisers(self):
        return {**super().optimisers(), "fake_opt": self.fake_optimiser}

    def bind(self, prepared, accelerator):
        super().bind(prepared, accelerator)
        self.fake, self.fake_optimiser = prepared["fake"], prepared["fake_opt"]
        info = self.teacher.info
        times = tuple(info.timesteps(self.cfg.student_steps, "scm")[: self.cfg.student_steps])
        self.dmd = DMD2Loss(
            self.teacher.net_denoiser,
            network_denoiser(self.teacher, self.fake),
            self.loss.student,  # the student as sCM trains it (its dense time input included)
            self.guidance,
            times=times,
        )

    def updates(self, batch, step):
        start = self.cfg.scm_fit_steps + self.cfg.scm_warmup
        if step < start:
            return super().updates(batch, step)
        if (step - start) % self.cfg.fake_ratio:  # the fake score's steps
            return [Update([self.fake], self.fake_optimiser, self._fake_loss(batch))]
        scm = super().updates(batch, step)[0]

        def loss(j):
            value, logs = scm.loss(j)
            m = batch[j]
            guidance, cond = self._scales(m)
            dmd = dataclasses.replace(self.dmd, guidance=guidance or self.guidance)
            x0, _ = dmd.sample(self._noise(m), cond or m.pos, m.generator)
            dm, dm_logs = dmd.generator_loss(x0, m.pos, m.neg, m.generator)
            return value + self.cfg.rcm_dmd_weight * dm, {**logs, **dm_logs}

        return [dataclasses.replace(scm, loss=loss)]

    def _fake_loss(self, batch):
        def loss(j):
            m = batch[j]
            guidance, cond = self._scales(m)
            with torch.no_grad():
                x0, _ = self.dmd.sample(self._noise(m), cond or m.pos, m.generator)
            return self.dmd.fake_loss(x0, m.pos, m.generator)

        return loss

    @staticmethod
    def _noise(m):
        return torch.randn(m.x0.shape, generator=m.generator).to(m.x0.device, m.x0.dtype)


@register
class ICT(Method):
    """Improved consistency training (Song & Dhariwal 2023): from the data alone, the student pulled
    towards its own stop-gradient output one curriculum level lower (``ict.ICTLoss``)."""

    name = "ict"

    def initial_student(self, net):
        """The teacher's copy, or with init="random" (the paper's) fresh weights in its
        architecture."""
        student = super().initial_student(net)
        if self.cfg.init == "random":
            student = type(student).from_config(student.config).to(net.device, net.dtype)
        return student

    def bind(self, prepared, accelerator):
        super().bind(prepared, accelerator)
        cfg = self.cfg
        self.loss = ICTLoss(
            network_denoiser(self.teacher, self.student),
            cfg.ict_total or cfg.max_steps,
            cfg.ict_s0,
            cfg.ict_s1,
            p_mean=cfg.ict_p_mean,
            p_std=cfg.ict_p_std,
            timestep_scaling=self.boundary,
            schedule=cfg.ict_schedule,
            ect_stage=cfg.ict_ect_stage,
        )

    def updates(self, batch, step):
        def loss(j):
            m = batch[j]
            cond = drop_captions(m.pos, m.neg, self.cfg.ict_caption_dropout, m.generator)
            return self.loss(m.x0, cond, step, m.generator)

        return [self.student_update(loss)]

    @classmethod
    def check_resume(cls, cfg, old, ckpt):
        """The discretisation curriculum is laid out over max_steps unless its length is fixed."""
        if not cfg.ict_total and old.get("max_steps") != cfg.max_steps:
            raise ValueError(
                f"{ckpt} was trained with max_steps={old.get('max_steps')!r}, over "
                f"which iCT's discretisation curriculum is laid out; resume with the "
                f"same --max-steps (or fix the curriculum's length with --ict-total from the start)"
            )

    def original_steps(self, train_steps):
        return ICT_STEPS
