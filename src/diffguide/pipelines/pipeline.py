"""GuidedPipeline: any diffusers model folder or hub id, sampled by any diffguide sampler and
guidance.

Loading is diffusers' own (``DiffusionPipeline.from_pretrained``); the schedule, prediction kind and
default time grid come from the loaded scheduler's config; the network becomes a ``NetDenoiser``
and the loop is ``diffguide.sample``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import versions
from ..core.denoiser import Boundary, NetDenoiser, TrigFlowTime
from ..core.graphs import LoopGraphs
from ..core.guided import Guidance, _rows
from ..core.registry import parse_spec, to_spec
from ..core.sample import Sampler, Step, sample
from ..core.stitch import Stitch, check_same_schedule
from . import conditions, loading, output, sampling
from .families import ENCODE_LOCK, Family, family_of, guidance_embedding  # noqa: F401 (re-exported)
from .output import GuidedOutput, to_pil  # noqa: F401 (re-exported)
from ..core.freeze import frozen  # noqa: F401 (re-exported)
from .request import (
    Request,
    check_generators,
    image_rows,
    image_seeds,
    noise_source,
    normalise_prompts,
    plan,
)  # noqa: F401
from .schedulers import SchedulerInfo, from_scheduler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Stitching:
    """T-Stitch for a GuidedPipeline call: ``small`` (a GuidedPipeline, folder, hub id or
    'builtin-small') runs the first ``fraction`` of the steps; ``reset`` restarts the sampler's
    history at the switch. The small model encodes the prompt with its own text encoder."""

    small: Any
    fraction: float = 0.4
    reset: bool = False

    def __post_init__(self):
        Stitch(self.fraction)  # validates the fraction
        if not isinstance(self.small, GuidedPipeline):
            object.__setattr__(
                self, "small", GuidedPipeline.from_pretrained(self.small, progress=False)
            )

    def check(self, large: "GuidedPipeline") -> None:
        check_companion(large, self.small, "stitch")


def check_companion(large: "GuidedPipeline", small: "GuidedPipeline", what: str) -> None:
    """Refuse a second model (T-Stitch's small one, AutoGuidance's guide) that does not share the
    main one's latent space and schedule."""
    a, b = large.family, small.family
    if (a.channels, a.factor) != (b.channels, b.factor):
        raise ValueError(
            f"cannot {what}: latent spaces differ ({a.channels} channels at 1/{a.factor} "
            f"scale vs {b.channels} at 1/{b.factor})"
        )
    va, vb = getattr(large.pipe, "vae", None), getattr(small.pipe, "vae", None)
    keys = ("latent_channels", "scaling_factor", "shift_factor", "latents_mean", "latents_std")
    if (va is None) != (vb is None) or (
        va is not None and any(va.config.get(k) != vb.config.get(k) for k in keys)
    ):
        raise ValueError(f"cannot {what}: the models' VAEs (latent spaces) differ")
    if a.conditional != b.conditional:
        raise ValueError(f"cannot {what} a conditional model with an unconditional one")
    check_same_schedule(large.denoiser, small.denoiser)


class PromptTruncated(UserWarning):
    """A prompt is longer than the model's text encoder reads (and the family cannot window it)."""


class ConfigNotReproduced(UserWarning):
    """A scheduler config key is set to a value diffguide does not reproduce
    (``scheduler_keys``)."""


BUILTIN = {
    "builtin": "toy",
    "builtin-small": "toy-small",
    "builtin-fast": "toy-fast",
    "builtin-mmdit": "toy-mmdit",
}


DEFAULTS_FILE = "diffguide.json"
DEFAULT_STEPS = (
    25  # every command's and __call__'s default unless a student's folder records its own
)


def read_defaults(folder: str) -> dict:
    """A model folder's ``diffguide.json`` (steps, sampler, guidance a distilled student was made
    for); {} when absent (hub ids, ordinary models). Only known keys of the right type are kept."""
    import json

    path = os.path.join(folder, DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    out = {}
    if isinstance(raw.get("steps"), int) and raw["steps"] >= 1:
        out["steps"] = raw["steps"]
    if isinstance(raw.get("guidance_scale"), (int, float)) and raw["guidance_scale"] > 0:
        out["guidance_scale"] = float(raw["guidance_scale"])
    for k in ("sampler", "guidance", "spacing"):
        if isinstance(raw.get(k), str):
            out[k] = raw[k]
    if isinstance(raw.get("original_steps"), int) and raw["original_steps"] >= 1:
        out["original_steps"] = raw["original_steps"]
    if "max_sequence_length" in raw:  # what the network was trained on: never sampled without it
        n = raw["max_sequence_length"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{path}: max_sequence_length must be an integer >= 0, got {n!r}")
        out["max_sequence_length"] = n
    if "time_input" in raw:  # the network's time is not its scheduler's: never sampled without it
        if raw["time_input"] not in TIME_INPUTS:
            raise ValueError(
                f"{path}: time_input {raw['time_input']!r} is not one diffguide knows "
                f"({', '.join(TIME_INPUTS)})"
            )
        out["time_input"] = raw["time_input"]
    return out


# a student's time input other than its scheduler's timesteps (diffguide.json's "time_input"):
# sCM's dense sin t / (sin t + cos t), as SANA-Sprint (distill/scm.py)
TIME_INPUTS = {"trigflow": TrigFlowTime()}  # sigma_d 0.5, as SCMScheduler's default


def load_vae(path, dtype=None):
    """An AutoencoderKL from a folder (or its ``vae`` subfolder), a hub id or one .safetensors
    file."""
    from diffusers import AutoencoderKL

    path = os.fspath(path)
    kw = {"torch_dtype": as_dtype(dtype)} if dtype is not None else {}
    try:
        if os.path.isfile(path):
            return AutoencoderKL.from_single_file(path, **kw)
        sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else None
        return AutoencoderKL.from_pretrained(path, subfolder=sub, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load VAE {path!r}: {str(e).splitlines()[0]}") from None


def builtin_path(name: str) -> str:
    """'builtin' / 'builtin-small' / 'builtin-fast' (the distilled student) / 'builtin-mmdit'
    (the flow transformer) name the toy models shipped in the package; other names pass."""
    if name not in BUILTIN:
        return name
    from ..assets import path

    folder = path(BUILTIN[name])
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(
            f"the built-in model {name!r} is not installed ({folder} is missing); "
            f"pass a model folder or hub id"
        )
    return folder


def quiet_loading() -> None:
    """No loading progress bars or library warnings (the CLI keeps stderr for one-line errors)."""
    import diffusers
    import huggingface_hub
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(diffusers|transformers|huggingface_hub)\b"
        )
    warnings.filterwarnings(
        "ignore", category=ConfigNotReproduced
    )  # the CLI prints it as one notice


def as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} requested but CUDA is not available here; use cpu"
        )
    return device


class GuidedPipeline:
    """Wraps a loaded diffusers pipeline. Call it like a diffusers pipeline; see ``__call__``."""

    def __init__(self, pipe, progress: bool = True, strict_config: bool = False):
        versions.check()
        self.pipe = pipe
        self.family: Family = family_of(pipe)
        self.info: SchedulerInfo = from_scheduler(pipe.scheduler)
        if self.family.grid is not None:  # the pipeline passes its own sigmas (Flux, Qwen-Image)
            self.info = self.info.passing_sigmas(self.family.grid)
        if self.info.config_notice:
            if strict_config:
                raise ValueError(self.info.config_notice)
            warnings.warn(self.info.config_notice, ConfigNotReproduced, stacklevel=3)
        net = self.family.net
        self.net_denoiser = NetDenoiser(
            self.family.forward,
            self.info.schedule,
            self.info.kind,
            dtype=net.dtype,
            learned_sigma=self.family.learned_sigma(),
            module=net,
            precondition=self.info.precondition,
        )
        self.progress = progress
        # a distilled student's own steps and guidance (its diffguide.json)
        self.defaults: dict = {}
        self.graphs = LoopGraphs()  # captured sampling loops (cuda_graph=True), per settings

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        torch_dtype=None,
        device=None,
        progress: bool = True,
        vae_dtype=None,
        vae=None,
        loras=(),
        strict_config: bool = False,
        **kwargs,
    ) -> "GuidedPipeline":
        """Load with ``diffusers.DiffusionPipeline.from_pretrained`` (a folder or a hub id).
        ``vae_dtype``: the VAE's own dtype (float32 decoding beside a float16 network avoids the
        classic fp16 VAE overflow). ``vae``: another VAE (a module, or a folder, hub id or single
        .safetensors file). ``loras``: (path, scale) pairs loaded with diffusers'
        ``load_lora_weights`` (needs peft: ``pip install 'diffguide[lora]'``). ``strict_config``:
        refuse a
        scheduler config with a key diffguide does not reproduce (by default: one notice)."""
        from diffusers import DiffusionPipeline

        path = builtin_path(os.fspath(path_or_id))
        dtype = as_dtype(torch_dtype)
        dev = check_device(device) if device is not None else None
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise ValueError(
                    f"model folder {path!r} has no model_index.json (save one with "
                    f"diffusers' pipeline.save_pretrained)"
                )
            loading.check_folder(path)  # damage named by file, before diffusers meets it
        elif not _HUB_ID.match(path) or os.path.exists(path) or path.startswith((".", "/", "~")):
            raise ValueError(
                f"model {path!r} is neither a diffusers folder nor a hub id like 'org/name'"
            )
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        if vae is not None:
            kw["vae"] = load_vae(vae, dtype) if isinstance(vae, (str, os.PathLike)) else vae
        # components saved as None (a pixel-space model has no VAE) must be passed as None again
        try:
            index = DiffusionPipeline.load_config(path)
        except OSError as e:
            raise ValueError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from e
        absent = {
            k: None
            for k, v in index.items()
            if not k.startswith("_")
            and isinstance(v, (list, tuple))
            and len(v) == 2
            and v[0] is None
            and k not in kwargs
        }
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            try:
                pipe = DiffusionPipeline.from_pretrained(path, **kw, **absent, **kwargs)
            except OSError as e:  # not found locally nor on the hub, or no network
                raise ValueError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from e
        loading.check_loaded(
            pipe, path, {*kw, *absent, *kwargs}, kwargs.get("variant")
        )  # no random weights
        if dev is not None:
            pipe = pipe.to(dev)
        if vae_dtype is not None and getattr(pipe, "vae", None) is not None:
            pipe.vae.to(as_dtype(vae_dtype))
        out = cls(pipe, progress=progress, strict_config=strict_config)
        if loras:
            out.add_loras(loras)
        out.source = path
        out.set_defaults(read_defaults(path))
        return out

    def set_defaults(self, defaults: dict) -> None:
        """A distilled student's own defaults (its ``diffguide.json``). ``original_steps``: the LCM
        grid a
        flow-teacher student samples on (what an LCMScheduler's original_inference_steps gives a VP
        one)."""
        self.defaults = dict(defaults)
        if "time_input" in defaults:
            self.net_denoiser = dataclasses.replace(
                self.net_denoiser, time_input=TIME_INPUTS[defaults["time_input"]]
            )
        if "max_sequence_length" in defaults:
            if not hasattr(self.family, "max_sequence_length"):
                raise ValueError(
                    f"max_sequence_length is set, but a {self.family.name} model has no text "
                    "window to set"
                )
            self.family.max_sequence_length = defaults["max_sequence_length"]
        if "original_steps" in defaults:
            self.info = dataclasses.replace(
                self.info, grid={"spacing": "lcm", "original_steps": defaults["original_steps"]}
            )

    @classmethod
    def from_pipe(
        cls, pipe, progress: bool = True, strict_config: bool = False
    ) -> "GuidedPipeline":
        """Wrap an already loaded diffusers pipeline (its scheduler decides the default grid)."""
        return cls(pipe, progress=progress, strict_config=strict_config)

    @property
    def device(self) -> torch.device:
        """Where the call's tensors live: the pipeline's execution device (the GPU under
        ``enable_model_cpu_offload``, while the weights wait on the CPU), else the network's."""
        dev = getattr(self.pipe, "_execution_device", None)
        return torch.device(dev) if dev is not None else next(self.family.net.parameters()).device

    def to(self, *args, device=None, dtype=None) -> "GuidedPipeline":
        """Move and/or cast, as diffusers' ``pipe.to``: ``to("cuda")``, ``to(torch.float16)``,
        ``to("cuda", torch.float16)`` or by keyword."""
        for a in args:
            if isinstance(a, torch.dtype) or (isinstance(a, str) and a in DTYPES):
                if dtype is not None:
                    raise ValueError(f"two dtypes given: {dtype} and {a}")
                dtype = a
            elif device is None:
                device = a
            else:
                raise ValueError(f"cannot read {a!r} as a device or dtype")
        self.pipe.to(
            *([check_device(device)] if device is not None else []),
            **({"dtype": as_dtype(dtype)} if dtype is not None else {}),
        )
        self.net_denoiser = dataclasses.replace(self.net_denoiser, dtype=self.family.net.dtype)
        self.graphs.clear()  # their memory pools, on the old device or for the old dtype
        return self

    def save_pretrained(self, folder: str, **kwargs) -> None:
        """diffusers' save_pretrained, plus this model's own defaults (``diffguide.json``) if
        any."""
        import json

        self.pipe.save_pretrained(folder, **kwargs)
        if self.defaults:
            with open(os.path.join(folder, DEFAULTS_FILE), "w") as f:
                json.dump(self.defaults, f, indent=1)

    def __getattr__(self, name: str):
        """diffusers' memory and LoRA switches pass through to the wrapped pipeline:
        enable_model_cpu_offload, enable_sequential_cpu_offload, enable_attention_slicing,
        load_lora_weights, set_adapters, fuse_lora..."""
        if (
            name.startswith(
                (
                    "enable_",
                    "disable_",
                    "load_lora",
                    "set_adapters",
                    "fuse_lora",
                    "unfuse_lora",
                    "unload_lora",
                    "set_progress_bar_config",
                )
            )
            and "pipe" in self.__dict__
        ):
            return getattr(self.pipe, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def add_loras(self, loras) -> None:
        """Load LoRA weights, ``(path, scale)`` pairs, as named adapters applied together."""
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError("LoRA weights need peft: pip install 'diffguide[lora]'") from None
        if not hasattr(self.pipe, "load_lora_weights"):
            raise ValueError(f"{type(self.pipe).__name__} takes no LoRA weights")
        names = []
        for i, (path, scale) in enumerate(loras):
            name = f"lora_{i}"
            try:
                self.pipe.load_lora_weights(path, adapter_name=name)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load LoRA {path!r}: {str(e).splitlines()[0]}") from None
            names.append(name)
        self.pipe.set_adapters(names, adapter_weights=[float(sc) for _, sc in loras])

    def enable_vae_slicing(self):
        """Decode a batch one image at a time (newer diffusers keep the switch on the VAE only)."""
        self._vae_switch("slicing", True)

    def disable_vae_slicing(self):
        self._vae_switch("slicing", False)

    def enable_vae_tiling(self):
        """Decode large images in overlapping tiles."""
        self._vae_switch("tiling", True)

    def disable_vae_tiling(self):
        self._vae_switch("tiling", False)

    def _vae_switch(self, what: str, on: bool) -> None:
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            raise ValueError(f"{type(self.pipe).__name__} has no VAE to switch {what} on")
        getattr(vae, f"{'enable' if on else 'disable'}_{what}")()

    # -- a call ------------------------------------------------------------------------------------

    def resolve(
        self, guidance, guidance_scale, sampler, negative: bool = False
    ) -> tuple[Guidance, Sampler]:
        """Guidance and sampler objects from specs; guidance_scale overrides the method's scale.
        None picks the model's own: a student folder's, else none where guidance is embedded in the
        network (LCM students, Flux.1-dev) or there is no condition (unconditional models), else the
        family's (cfg; none for Flux)."""
        if guidance is None:
            guidance = self.defaults.get("guidance") or (
                "none"
                if self.embedded_guidance is not None or not self.family.conditional
                else self.family.default_guidance_for(negative)
            )
        g = parse_spec("guidance", guidance) if isinstance(guidance, str) else guidance
        if not isinstance(g, Guidance):
            raise ValueError(
                f"guidance must be a spec string or a Guidance object, got {type(g).__name__}"
            )
        if guidance_scale is not None:
            if "scale" not in {f.name for f in dataclasses.fields(g)}:
                hint = (
                    "; this model's own guidance input is set with --embedded-guidance / "
                    "embedded_guidance="
                    if self.embedded_guidance is not None
                    else ""
                )
                raise ValueError(
                    "a guidance scale was given (--scale, guidance_scale) but guidance "
                    f"{to_spec(g)!r} has no scale option{hint}"
                )
            g = dataclasses.replace(g, scale=float(guidance_scale))
        sampler = (
            self.defaults.get("sampler", self.info.sampler) if sampler is None else sampler
        )  # the model's own
        s = parse_spec("sampler", sampler) if isinstance(sampler, str) else sampler
        if not isinstance(s, Sampler):
            raise ValueError(
                f"sampler must be a spec string or a Sampler object, got {type(s).__name__}"
            )
        return g, s

    def size(self, height, width) -> tuple[int, int]:
        fam = self.family
        h = fam.default_hw[0] if height is None else height
        w = fam.default_hw[1] if width is None else width
        for name, v in (("height", h), ("width", w)):
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, np.integer))
                or v < fam.multiple
                or v % fam.multiple
            ):
                raise ValueError(
                    f"{name} {v!r} must be a positive multiple of {fam.multiple} for this "
                    f"model ({type(fam.net).__name__})"
                )
        return int(h), int(w)

    @property
    def denoiser(self):
        """The network as an (x, t, cond) -> Pred denoiser (with a consistency model's boundary)."""
        return self.denoiser_for()

    def denoiser_for(
        self, spacing: str | None = None, round_timesteps: bool | None = None, info=None
    ):
        """The denoiser of a call: the network sees integer times where the scheduler config makes
        diffusers use them (its own sigma grid in multistep schedulers) unless ``round_timesteps``
        is False (k-diffusion's fractional times)."""
        info = self.info if info is None else info  # a call's own (a resolution-dependent shift)
        fn = info.time_fn if spacing is None and round_timesteps is not False else None
        d = self.net_denoiser
        if fn is not d.time_fn or info.schedule is not d.schedule:
            d = dataclasses.replace(d, time_fn=fn, schedule=info.schedule)
        return Boundary(d, timestep_scaling=info.boundary) if info.boundary is not None else d

    @property
    def default_steps(self) -> int:
        return int(self.defaults.get("steps", self.info.steps or DEFAULT_STEPS))

    @property
    def embedded_guidance(self) -> float | None:
        """The default value of the model's embedded guidance input (Flux.1-dev's guidance, an LCM
        student's w: its folder's own, else the family's), or None for a model without one."""
        base = self.family.embedded_default()
        return None if base is None else float(self.defaults.get("guidance_scale", base))

    def plan(
        self,
        prompt: str | Sequence = "",
        negative_prompt=None,
        guidance=None,
        guidance_scale: float | None = None,
        sampler=None,
        steps: int | None = None,
        spacing: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator=None,
        output_type: str = "pil",
        callback: Callable[[Step, torch.Tensor], None] | None = None,
        progress: bool | None = None,
        max_batch: int | None = None,
        threshold="scheduler",
        stitch: Stitching | None = None,
        noise_optimizer=None,
        check_finite: bool = True,
        round_timesteps: bool | None = None,
        **diffusers_names,
    ) -> Request:
        """Check and resolve a call's arguments once, before any work: a frozen ``Request`` that
        ``run``
        reads. ``__call__`` is ``run(plan(...))``; the command line plans, then runs each batch.

        prompt: text, a list of texts, or class labels (int or name) for class-conditional models.
        guidance / sampler: registry specs (``"cfg:scale=7.5,rescale=0.7"``) or objects.
        steps None: the model's own (a distilled student's folder records it; else 25).
        seed: one int (image i gets seed + i), a list of per-image seeds, or None (random); each
        image has its own generator, so an image does not depend on its batch. ``generator`` (a
        torch.Generator or a list, as in diffusers) is the alternative. spacing None: the grid the
        loaded scheduler would use. callback(step, x) runs after every step. threshold: x0 clipping,
        by default what the scheduler config asks for (clip_sample, thresholding); None for none.
        stitch: a ``Stitching`` (T-Stitch: a small model for the first steps).
        noise_optimizer: a spec (``"initno"``, ``"reno:iterations=20"``) or a ``diffguide.noise``
        optimiser that prepares the initial noise before sampling; its extra network evaluations
        and seconds are reported in ``noise`` and ``timings["noise"]``.
        check_finite: raise ``diffguide.NonFiniteError`` (a ValueError) naming the step, the
        guidance
        and the likely fix when sampling or decoding produces NaN or inf, instead of returning a
        black or NaN image; False returns whatever came out.
        round_timesteps: None shows the network the times diffusers would (integers on a multistep
        scheduler's own Karras, exponential or beta grid); False always the exact fractional times
        (k-diffusion).

        diffusers' names work as they do there: ``num_inference_steps`` (= steps), ``latents``
        (initial noise before scaling; later noise still comes from the seeds), ``prompt_embeds`` /
        ``negative_prompt_embeds`` (and SDXL's pooled ones), ``callback_on_step_end(pipe, i, t,
        {"latents": x})`` (a returned "latents" replaces x), ``eta`` (for samplers that take one),
        ``guidance_rescale`` (CFG rescale of the raw network output, as diffusers), ``clip_skip``,
        ``cross_attention_kwargs`` (UNets; its "scale" is the LoRA scale of the text encoder too)
        and ``return_dict=False`` (a tuple: images, NSFW flags).
        embedded_guidance: the value of the model's own guidance input (Flux.1-dev's guidance, an
        LCM
        student's w), default the model's; ``guidance``/``guidance_scale`` stay the diffguide method
        and its scale, so "true CFG" on Flux is guidance="cfg:scale=4" with a negative prompt.
        image / strength: image-to-image (SDEdit): the image (PIL, array or tensor in [0, 1]; one
        for
        every output, one per prompt or one per output) is encoded, noised to the level ``strength``
        selects on the sampler's grid (1: pure noise; default the family's img2img pipeline's) and
        sampled from there, as diffusers' img2img pipelines do; its size is the default size.
        cuda_graph: capture the whole sampling loop (every step's branch batching, network, guidance
        and sampler update) in one CUDA graph on the first call with given settings and shapes, and
        replay
        it on later calls (``core.graphs``; the per-run buffers are the graph's, made once). The
        first call runs eagerly and captures; the images are those of an eager run, noise and seeds
        included. No progress bar (the steps run as one launch). A loop that cannot be captured
        (AG, ICG,
        DPM++ SDE) runs eagerly with a notice. Captures are kept in ``self.graphs`` (the four most
        recent); changing the network other than by its weights' storage, dtype or LoRA scales needs
        ``self.graphs.clear()``. guide_model: the weaker model AutoGuidance
        (``guidance="autoguidance"``) guides away from
        (a GuidedPipeline, folder, hub id or 'builtin-small'); it must share this model's latent
        space and schedule, and encodes the prompts with its own text encoder.
        parallel: one image's work shared by the processes of an initialised torch.distributed
        group, every process running the same call and ending with the whole images
        (``pipelines.parallel_layout``): "branches" splits each forward's rows, "sequence" each
        row's tokens (diffusers' Ulysses context parallelism: Flux.1, Qwen-Image, Wan), and
        "branches=2,sequence=2" both on 4 processes. No step cache, CUDA graph, or (with
        sequence) noise optimiser, gradient or perturbation guidance.
        """
        return plan(
            self,
            prompt,
            negative_prompt,
            guidance,
            guidance_scale,
            sampler,
            steps,
            spacing,
            height,
            width,
            num_images_per_prompt,
            seed,
            generator,
            output_type,
            callback,
            progress,
            max_batch,
            threshold,
            stitch,
            noise_optimizer,
            check_finite,
            round_timesteps,
            **diffusers_names,
        )

    def __call__(
        self, prompt: str | Sequence = "", negative_prompt=None, *args, process_state=None, **kwargs
    ):
        """Generate images: ``plan`` (every argument, documented there), then ``run``.

        process_state: accelerate's ``PartialState`` (or an ``Accelerator``) of a run launched on
        several processes: the call's images (prompt-major, each with its own seed or generator)
        are shared between the processes in contiguous parts and this process makes only its own
        part, in one batch; ``indices`` and ``seeds`` say which images it holds.
        """
        if process_state is not None:
            if kwargs.get("parallel"):  # images to processes, or each image's work to them all
                raise ValueError(
                    "process_state shares a call's images between processes and parallel shares "
                    "each image's work between them: give one"
                )
            if args or kwargs.get("latents") is not None or kwargs.get("prompt_embeds") is not None:
                raise ValueError(
                    "with process_state, give prompts and seeds (not latents or prompt_embeds), by "
                    "keyword: each process makes its own images from them"
                )
            return self._share(process_state, prompt, negative_prompt, kwargs)
        return self.run(self.plan(prompt, negative_prompt, *args, **kwargs))

    def run(self, req: Request):
        """A planned request through its stages: conditions, initial latents, noise optimisation,
        the loop, decoding (``conditions``, ``sampling``, ``output``)."""
        start = time.perf_counter()
        noise, seeds = noise_source(req)
        fork = sampling.fork_for(
            req, noise, seeds
        )  # before any draw: a noise optimiser replays the stream
        truncated = conditions.truncation_notice(self, req)
        if truncated:
            warnings.warn(truncated, PromptTruncated, stacklevel=3)
        # inference mode skips autograd bookkeeping on every small tensor op of the loop; a guidance
        # method that differentiates through the network (needs_grad) runs with plain no_grad
        grads = getattr(req.guidance, "needs_grad", False) or req.noise_optimizer is not None
        with torch.no_grad() if grads else torch.inference_mode():
            conds = conditions.encode(self, req)
            encoded = time.perf_counter()
            x = sampling.initial(self, req, noise, fork)
            guided, make = sampling.guided_maker(self, req, conds)
            x, report = sampling.optimise(self, req, x, fork, conds, make)
            optimised, before = time.perf_counter(), len(self.graphs.notices)
            x, nfe, forwards, computed = sampling.loop(self, req, conds, guided, make, x, noise)
            x = self.family.finish(x, conds.tree["pos"])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            sampled = time.perf_counter()
            images, nsfw = output.decode(self, req, x)
        end = time.perf_counter()
        timings = {
            "encode": encoded - start,
            "noise": optimised - encoded,
            "sample": sampled - optimised,
            "decode": end - sampled,
            "total": end - start,
        }
        said = output.notices(self, req, truncated, self.graphs.notices[before:])
        out = output.result(req, images, nsfw, nfe, forwards, timings, seeds, report, said)
        if computed is not None and req.return_dict:
            out.computed = computed
        return out

    def _check_graph(self, g, callback, callback_on_step_end) -> None:
        if (
            self.graphs.backend.device_types
            and self.device.type not in self.graphs.backend.device_types
        ):
            raise ValueError(
                f"cuda_graph=True needs the pipeline on a CUDA device; it is on {self.device}"
            )
        # accelerate hooks the offloaded models themselves (model and sequential offload alike)
        offloaded = [
            name
            for name, m in getattr(self.pipe, "components", {}).items()
            if isinstance(m, torch.nn.Module) and hasattr(m, "_hf_hook")
        ]
        if offloaded:  # the weights move between calls: a graph would replay freed GPU copies
            raise ValueError(
                f"cuda_graph=True cannot run with CPU offload ({', '.join(offloaded)} offloaded); "
                f"keep the pipeline on the GPU (pipe.to('cuda')) or leave cuda_graph off"
            )
        if callback is not None or callback_on_step_end is not None:
            raise ValueError(
                "cuda_graph=True replays the whole loop at once: no callback can run between steps"
            )
        if getattr(g, "needs_grad", False):
            raise ValueError(
                f"guidance {to_spec(g)!r} differentiates through the network; it cannot run "
                f"in a captured loop (cuda_graph=False)"
            )

    def prepare_image(self, image, height=None, width=None):
        """Image-to-image input as [k, 3, H, W] in [-1, 1], resized to height x width (default: its
        own size, rounded down to what the model takes) as diffusers' pipelines prepare it (a
        VaeImageProcessor on the multiple this model takes: the pipelines' own may round to 8 for a
        pixel model)."""
        from diffusers.image_processor import VaeImageProcessor

        proc = VaeImageProcessor(vae_scale_factor=self.family.multiple)
        if (
            isinstance(image, (list, tuple))
            and image
            and all(isinstance(i, torch.Tensor) and i.ndim == 3 for i in image)
        ):
            image = torch.stack(list(image))
        elif isinstance(image, torch.Tensor) and image.ndim == 3:
            image = image[None]
        try:
            first = image[0] if isinstance(image, (list, tuple)) else image
            if height is None or width is None:  # PIL, tensors (N)CHW, arrays (N)HWC
                dh, dw = (
                    (first.height, first.width)
                    if hasattr(first, "height")
                    else tuple(first.shape[-2:])
                    if isinstance(first, torch.Tensor)
                    else tuple(first.shape[-3:-1])
                )
                m = self.family.multiple
                height, width = height or dh // m * m, width or dw // m * m
            return proc.preprocess(image, height=height, width=width).float(), height, width
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(
                f"image must be a PIL image, an array or a tensor in [0, 1] (or a list of "
                f"them), got {type(image).__name__}: {e}"
            ) from None

    def steps_skipped(self, steps: int, strength: float | None = None) -> int:
        """How many of ``steps`` image-to-image at ``strength`` skips (None: the family's
        default)."""
        strength = self.family.default_strength if strength is None else strength
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not 0 <= strength <= 1
        ):
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        k = self.family.start_index(steps, float(strength))
        if k >= steps:
            raise ValueError(
                f"strength {strength} leaves none of the {steps} steps to run; raise strength or "
                "steps"
            )
        return k

    def _diffusers_options(
        self, g: Guidance, s: Sampler, eta, guidance_rescale
    ) -> tuple[Guidance, Sampler]:
        """diffusers' eta (on samplers that have one) and guidance_rescale (CFG's rescale of the raw
        network output: eps, or v for v-models)."""
        if eta is not None:
            fields = {f.name for f in dataclasses.fields(s)}
            if "eta" not in fields and "gamma" not in fields:
                raise ValueError(
                    f"sampler {to_spec(s)!r} takes no eta; samplers with one: ddim, "
                    f"euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde, dpmpp_2s_ancestral"
                )
            s = dataclasses.replace(
                s, **{"gamma" if "gamma" in fields else "eta": float(eta)}
            )  # TCD: eta is gamma
        if guidance_rescale:
            names = {f.name for f in dataclasses.fields(g)}
            if not {"rescale", "rescale_space"} <= names:
                raise ValueError(
                    "guidance_rescale needs a guidance with a rescale option (cfg), got "
                    f"{to_spec(g)!r}"
                )
            g = dataclasses.replace(
                g, rescale=float(guidance_rescale), rescale_space=self.info.kind
            )
        return g, s

    @property
    def builtin(self) -> bool:
        """Whether this is one of the models shipped in the package (the toy world's)."""
        from ..assets import ROOT

        source = os.path.abspath(getattr(self, "source", "") or "")
        return source.startswith(os.path.abspath(ROOT) + os.sep)

    def caption_set(self) -> list[str]:
        """The model's own caption set (for ICG's real-prompt stand-ins): the toy world's for the
        built-in models; other models have none and need prompts given."""
        if self.builtin:
            from ..toy.scenes import captions

            return captions()
        raise ValueError(
            "this model has no caption set of its own: give prompts (icg:condition=prompts,"
            "prompts=FILE with one prompt per line)"
        )

    def _share(self, state, prompt, negative_prompt, kw: dict) -> GuidedOutput:
        """This process's contiguous part of a call's images (see ``process_state`` in __call__),
        under the one seed rule and prompt normalisation of a single-process call."""
        from ..parallel import bounds

        n, seed, generator = (
            kw.pop("num_images_per_prompt", 1),
            kw.pop("seed", None),
            kw.pop("generator", None),
        )
        prompts, negs = normalise_prompts(prompt, negative_prompt)
        b = len(prompts) * n
        if generator is not None and not isinstance(generator, (list, tuple)):
            raise ValueError(
                "with process_state, give seed= or one generator per image: a single "
                "generator's stream cannot be shared between processes"
            )
        if seed is None and generator is None:
            raise ValueError(
                "with process_state, give seed= (or one generator per image) so that every "
                "process draws its own images' noise"
            )
        check_generators(b, seed, generator)
        per_image = image_seeds(b, seed) if generator is None else list(generator)
        lo, hi = bounds(b, state)
        if lo == hi:  # more processes than images: nothing to make here
            return GuidedOutput(
                [] if kw.get("output_type", "pil") == "pil" else None, 0, 0, {}, [], indices=[]
            )
        rows = range(lo, hi)
        mine = (
            {"seed": [per_image[i] for i in rows]}
            if generator is None
            else {"generator": [per_image[i] for i in rows]}
        )
        image = kw.get("image")
        k = len(image) if isinstance(image, (list, tuple)) or getattr(image, "ndim", 0) == 4 else 1
        if k > 1:  # several init images: each process takes those of its own rows
            which = image_rows(k, len(prompts), n)
            kw = {**kw, "image": [image[which[i]] for i in rows]}
        out = self(
            [prompts[i // n] for i in rows],
            negative_prompt=[negs[i // n] for i in rows],
            num_images_per_prompt=1,
            **mine,
            **kw,
        )
        out.indices = list(rows)
        return out

    def _optimise_noise(self, opt, x, fork, texts, pos, make, sampler, ts, info, smalls=()):
        """Run a noise optimiser with this model's pieces; (x, report with per-image costs). Every
        draw it
        makes comes from the run's own noise (``fork``), whether seeds or generators gave it."""
        from ..noise import NoiseContext
        from .attention import capture, choose

        fam, b = self.family, x.shape[0]
        scale = float(self.info.start_scale(ts))
        counts = {"forward": 0, "backward": 0}
        tok = getattr(self.pipe, "tokenizer", None)

        grid = (
            choose(fam.net, tuple(x.shape[-2:]))
            if "attention" in getattr(opt, "needs", ())
            else None
        )

        # the optimiser's attention time: the first of an n-step grid of the model's own spacing
        # (InitNO's authors: 50 steps), else the run's first time
        n_att = getattr(opt, "attention_steps", 0)
        t_att = info.timesteps(n_att)[0] if n_att else ts[0]
        att_denoiser = self.denoiser_for(info=info)

        def attention(xi, i):
            with capture(fam.net, grid) as store:
                att_denoiser(xi, t_att, _rows(pos, [i]))
            counts["forward"] += 1
            if not store["cross"] or not store["self"]:
                raise ValueError(
                    f"no attention maps at {grid[0]}x{grid[1]} in {type(fam.net).__name__}"
                )
            return (
                torch.stack(store["cross"]).mean(0)[0],
                torch.stack(store["self"]).mean(0)[0],
                grid,
            )

        def render(xr, rows):
            src = fork.source(
                rows
            )  # where the run's stream for these rows stands after its initial draw
            d = make(rows)
            out = sample(d, sampler, ts, xr, src, grad=True)
            counts["forward"] += d.nfe * len(rows)
            return fam.decode(out)

        def draw(i, k):
            gen = torch.Generator().manual_seed((fork.seed(i) + 1_000_003 * k) % 2**63)
            return torch.randn((1, *x.shape[1:]), generator=gen).to(x.device)

        ctx = NoiseContext(
            texts,
            scale,
            fork.seeds,
            tokenize=(lambda t: _tokenize(tok, t)) if tok is not None else None,
            special=frozenset(tok.all_special_ids) if tok is not None else frozenset(),
            attention=attention if fam.conditional and tok is not None else None,
            render=render,
            draw=draw,
            counts=counts,
        )
        nets = [
            m
            for pipe in (self.pipe, *(small.pipe for small in smalls))
            for m in pipe.components.values()
            if isinstance(m, torch.nn.Module)
        ]
        with frozen(*nets):
            x, info = opt.optimise(ctx, x)
        return x.detach(), {
            "optimizer": opt.name,
            "nfe": counts["forward"] / b,
            "backward": counts["backward"] / b,
            **info,
        }


_STRUCTURE: "weakref.WeakKeyDictionary" = (
    weakref.WeakKeyDictionary()
)  # network -> (adapters, sample, lora layers)


def _weights_key(denoiser) -> tuple:
    """What a captured loop bakes in of a network, read without walking it at every call: its
    weights'
    storage and dtype (sampled at the first, middle and last parameter: a move or cast replaces them
    all), its LoRA adapters (diffusers' ``peft_config``), and each LoRA layer's scales, active
    adapters
    and merged state (Python values in its forward). The layers are found again only when the
    adapters change."""
    module = getattr(denoiser, "module", None)
    if not isinstance(module, torch.nn.Module):
        return (id(denoiser),)
    adapters = tuple(sorted(getattr(module, "peft_config", None) or {}))
    found = _STRUCTURE.get(module)
    if found is None or found[0] != adapters:
        params = list(module.parameters())
        sample = (
            [params[i] for i in sorted({0, len(params) // 2, len(params) - 1})] if params else []
        )
        loras = [m for m in module.modules() if isinstance(getattr(m, "scaling", None), dict)]
        found = _STRUCTURE[module] = (adapters, sample, loras)
    _, sample, loras = found
    return (
        id(module),
        adapters,
        tuple((p.data_ptr(), p.dtype, p.device) for p in sample),
        tuple(
            (
                tuple(sorted(m.scaling.items())),
                tuple(getattr(m, "active_adapters", ())),
                tuple(getattr(m, "merged_adapters", ())),
            )
            for m in loras
        ),
    )


def _tokenize(tok, text: str) -> list:
    with ENCODE_LOCK:
        return tok(text, truncation=True).input_ids


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, leave=False, desc="diffguide")
