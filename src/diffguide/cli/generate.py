"""``diffguide generate``: text (or class) to image files with their settings in the file's
metadata."""

from __future__ import annotations

import os
import re
import sys
import time

from .. import __version__
from ..core.registry import parse_spec, terms, to_spec
from ..core.spacing import SPACINGS
from ..parallel import barrier, gather, is_main, process_state, shard

MAX_SEED = 2**64 - 1  # torch generators take seeds in [0, 2^64)
# what one run may ask without --large: no sampler needs more steps; 4096x4096 is four times the
# largest size today's models are trained at; 2^40 pixel-steps is about 42,000 SDXL-size images
# (1024x1024, 25 steps), far more than one sitting on one GPU and weeks on a CPU
MAX_STEPS, MAX_PIXELS, MAX_WORK = 10_000, 4096 * 4096, 2**40
SPACE_HINT = (
    "free some space, write elsewhere (-o), or pass --large to try anyway (the estimate takes "
    "every image as incompressible)"
)


class UsageError(Exception):
    pass


def check_seed(seed: int, flag: str = "--seed") -> int:
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{flag} {seed} is out of range; seeds are integers in 0..{MAX_SEED}")
    return seed


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,9' -> [0, 1, 2, 3, 7, 9] (EDM's parse_int_list); seeds must be distinct and >= 0."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"bad --seeds {text!r}: use numbers and ranges like 0-15 or 1,5,9-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"bad --seeds range {part.strip()!r}: the end is below the start")
        if hi - lo > 10_000_000:
            raise UsageError(
                f"--seeds range {part.strip()!r} is too long (at most 10,000,000 seeds)"
            )
        out.extend(range(lo, hi + 1))
    if len(set(out)) != len(out):
        raise UsageError(f"--seeds {text!r} repeats a seed")
    for s in out:
        check_seed(s, "--seeds")
    return out


def add_arguments(p) -> None:
    p.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="text prompt (a class index or name for class-conditional models; none for "
        "unconditional models or with --from-png)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="use the built-in distilled student (4 steps) instead of the built-in model",
    )
    p.add_argument(
        "--from-png",
        default=None,
        metavar="FILE",
        help="re-create an image diffguide wrote (PNG, JPEG or WebP) from its own settings, "
        "bit for bit on the same machine; other flags given override them",
    )
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument(
        "--init-image",
        default=None,
        metavar="FILE",
        help="image-to-image (SDEdit): start from this image, noised to --strength; its size "
        "is the default size",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --init-image: how much of the schedule to run, 0-1 (1: all, the image "
        "barely kept; default: the model's img2img pipeline's, 0.8 for SD, 0.6 for Flux)",
    )
    add_model_arguments(p)
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the whole sampling loop in one CUDA graph on the first --batch and replay it "
        "on the next ones (same images; needs --device cuda)",
    )
    p.add_argument(
        "--parallel",
        default=None,
        metavar="SPEC",
        help="share each image's work between the processes of torchrun or accelerate launch: "
        "branches (each forward's guidance rows), sequence (each row's tokens, Flux.1, "
        "Qwen-Image, Wan) or both, e.g. branches=2,sequence=2 on 4 processes; the processes make "
        "every image together and the first writes it (no --cache, --cuda-graph)",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one seed (default 0)")
    seeds.add_argument("--seeds", default=None, help="several seeds, e.g. 0-15 or 1,4,9")
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="images per forward batch (an image is the same at the same batch size; another "
        "size can move a pixel by 1/255 through batched kernels)",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="a video model's frames per clip (default: the model's; Wan: 81, 4 k + 1)",
    )
    p.add_argument("--fps", type=int, default=None, help="a clip's frames per second (default 16)")
    add_stitch_arguments(p)
    add_noise_arguments(p)
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="a .png, .jpg or .webp path (a video model: .mp4, .gif or .webp), or a folder "
        "(files named by seed); default: outputs/ with A1111-style names, a running counter and "
        "the seed (00012-7.png)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    add_large_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_large_argument(p) -> None:
    p.add_argument(
        "--large",
        action="store_true",
        help=f"run a request beyond the limits (over {MAX_STEPS:,} steps, {MAX_PIXELS:,} pixels an "
        f"image, 2^40 images x steps x pixels, or the estimated free space)",
    )


def check_work(
    images: int, steps: int | None, height: int | None, width: int | None, large: bool
) -> None:
    """Refuse, before any work, a request far beyond what a model and a machine can do, unless
    ``large``; what is not known yet (None: the model's default) counts at its least, so the check
    can run before the model loads and again, exactly, once it has."""
    if large:
        return
    if steps is not None and steps > MAX_STEPS:
        raise UsageError(f"--steps {steps:,} is over {MAX_STEPS:,}; pass --large to run it anyway")
    pixels = (height or 1) * (width or 1)
    if pixels > MAX_PIXELS:
        raise UsageError(
            f"{width or '?'}x{height or '?'} is {pixels:,} pixels an image, over {MAX_PIXELS:,} "
            f"(4096x4096); pass --large to run it anyway"
        )
    work = images * (steps or 1) * pixels
    if work > MAX_WORK:
        raise UsageError(
            f"{images:,} images x {steps or 1:,} steps x {pixels:,} pixels is {work:.3g} "
            f"pixel-steps, over the limit of 2^40 ({MAX_WORK:.3g}); ask for fewer, or pass --large "
            "to run it anyway"
        )


def duration(seconds: float) -> str:
    """'42 s', '3.5 min', '2.1 h', '3.0 days'."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def estimate(first: float, done: int, left: int) -> str:
    """The line said once the first batch is done: its time, and the rest's at that pace."""
    return (
        f"diffguide: the first {done:,} image(s) took {duration(first)}; about "
        f"{duration(first * left / done)} more for the other {left:,}"
    )


def add_model_arguments(p, guidance: bool = True) -> None:
    """The model, sampling and device options generate, eval and compare share, with one set of
    defaults."""
    from ..pipelines.pipeline import DEFAULT_STEPS

    p.add_argument(
        "--model",
        default=None,
        help="diffusers model folder or hub id (default: the built-in toy model)",
    )
    if guidance:
        p.add_argument(
            "--guidance",
            default=None,
            help="guidance spec, e.g. cfg:scale=7.5,rescale=0.7 (default: the model's own: cfg; "
            "none for distilled students and unconditional models)",
        )
        p.add_argument(
            "--scale",
            type=float,
            default=None,
            help="guidance scale, overriding the spec's (default: the method's own, cfg 5)",
        )
    p.add_argument(
        "--embedded-guidance",
        type=float,
        default=None,
        metavar="VALUE",
        help="the model's own guidance input (Flux.1-dev's guidance, an LCM student's w; "
        "default: the model's); --guidance/--scale stay diffguide's method",
    )
    p.add_argument(
        "--sampler",
        default=None,
        help="sampler spec, e.g. dpmpp_2m:solver_type=heun (default: the model's own; dpmpp_2m "
        "for the built-in model)",
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="SPEC",
        help="step cache spec, e.g. first_block:threshold=0.1 (reuses the network's blocks "
        "between steps, decided per guidance branch; default: none)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampling steps (default: the model's own; {DEFAULT_STEPS} unless a distilled "
        f"student's folder says)",
    )
    p.add_argument(
        "--spacing",
        default=None,
        choices=SPACINGS,
        help="time grid (default: the one the model's scheduler config uses)",
    )
    p.add_argument(
        "--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="network dtype (default: float16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--vae-dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="the VAE's dtype (default: --dtype); float32 avoids float16 VAE overflow",
    )
    p.add_argument(
        "--vae",
        default=None,
        metavar="PATH",
        help="another VAE: a folder, hub id or .safetensors file",
    )
    p.add_argument(
        "--strict-config",
        action="store_true",
        help="refuse a model whose scheduler config has a key diffguide does not reproduce "
        "(default: one notice naming it)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="LoRA weights (folder, file or hub id) at SCALE (default 1); repeat for several "
        "(needs peft: pip install 'diffguide[lora]')",
    )


def add_stitch_arguments(p) -> None:
    p.add_argument(
        "--stitch",
        default=None,
        metavar="SMALL_MODEL[:FRACTION]",
        help="T-Stitch: a small model (folder, hub id or builtin-small) for the first FRACTION "
        "of the steps (default 0.4)",
    )
    p.add_argument(
        "--stitch-reset",
        action="store_true",
        help="restart the sampler's history at the switch (default: keep it)",
    )
    p.add_argument(
        "--guide-model",
        default=None,
        metavar="MODEL",
        help="the weaker model --guidance autoguidance guides away from (folder, hub id or "
        "builtin-small for the built-in model)",
    )


def add_noise_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--initno",
        nargs="?",
        const="",
        default=None,
        metavar="OPTIONS",
        help="InitNO initial-noise optimisation before sampling; OPTIONS like "
        "subjects=cat|dog,iterations=10",
    )
    g.add_argument(
        "--reno",
        nargs="?",
        const="",
        default=None,
        metavar="OPTIONS",
        help="ReNO reward-based noise optimisation (for 1-4 step models); OPTIONS like "
        "iterations=50,lr=5,reward=toy",
    )


def noise_spec(args) -> str | None:
    """The noise optimiser spec from --initno / --reno (checked now, before any loading), or
    None."""
    for name in ("initno", "reno"):
        opts = getattr(args, name, None)
        if opts is not None:
            spec = name + (":" + opts if opts else "")
            parse_spec("noise", spec)
            return spec
    return None


def parse_stitch(text: str | None) -> tuple[str, float] | None:
    """'builtin-small:0.4' -> ('builtin-small', 0.4); a model alone gets fraction 0.4."""
    if text is None:
        return None
    model, sep, tail = text.rpartition(":")
    if sep:
        try:
            fraction = float(tail)
        except ValueError:
            model, fraction = text, 0.4
    else:
        model, fraction = text, 0.4
    if not model:
        raise UsageError(f"--stitch {text!r} names no model; expected SMALL_MODEL[:FRACTION]")
    if not 0 <= fraction <= 1:
        raise UsageError(f"--stitch fraction must be in [0, 1], got {fraction!r}")
    return model, fraction


def parse_loras(items) -> list[tuple[str, float]]:
    """['style.safetensors:0.8', 'x'] -> [('style.safetensors', 0.8), ('x', 1.0)]."""
    out = []
    for item in items or []:
        path, scale = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass
        if not path.strip() or path.startswith(":"):
            raise UsageError(f"--lora {item!r} names no weights; expected PATH[:SCALE]")
        out.append((path, scale))
    return out


def load_stitch(args, gp):
    """The Stitching for --stitch (the small model on the large one's device and dtype), or None."""
    spec = parse_stitch(args.stitch)
    if spec is None:
        return None
    from ..pipelines import GuidedPipeline, Stitching

    small = GuidedPipeline.from_pretrained(
        spec[0], torch_dtype=gp.family.net.dtype, device=gp.device, progress=False
    )
    return Stitching(small, spec[1], reset=args.stitch_reset)  # checked against gp on each call


def load_guide(args, gp):
    """The GuidedPipeline for --guide-model (on the main model's device and dtype), or None."""
    if getattr(args, "guide_model", None) is None:
        return None
    from ..pipelines import GuidedPipeline
    from ..pipelines.pipeline import check_companion

    guide = GuidedPipeline.from_pretrained(
        args.guide_model, torch_dtype=gp.family.net.dtype, device=gp.device, progress=False
    )
    check_companion(gp, guide, "guide with this model")
    return guide


def load_model(args, state=None):
    """(GuidedPipeline, dtype name) from --model, --device (default cuda if available; this
    process's own device when launched on several, from ``state``) and --dtype (default float16 on
    cuda, float32 on cpu), with the libraries' loading chatter off."""
    import torch

    from ..pipelines import GuidedPipeline
    from ..pipelines.pipeline import quiet_loading

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if state is not None and device == "cuda":
        device = state.device
    dtype = args.dtype or ("float16" if torch.device(device).type == "cuda" else "float32")
    quiet_loading()
    args.model = args.model or "builtin"
    gp = GuidedPipeline.from_pretrained(
        args.model,
        torch_dtype=dtype,
        device=device,
        vae_dtype=getattr(args, "vae_dtype", None),
        vae=getattr(args, "vae", None),
        loras=parse_loras(getattr(args, "lora", None)),
        strict_config=getattr(args, "strict_config", False),
        progress=not args.quiet and state is None,
    )
    if is_main(state):  # once, for every command
        for text in loading_notices(gp, args):
            print(f"diffguide: notice: {text}", file=sys.stderr)
    return gp, dtype


def loading_notices(gp, args) -> list[str]:
    """What a model says once loaded: a scheduler config key not reproduced, and the sampler its
    scheduler falls back to where the user named none (the Python API says it in out.notices only
    for a call with sampler=None; the commands pass the sampler they resolved)."""
    fallback = (
        gp.info.notice
        if getattr(args, "sampler", None) is None and "sampler" not in gp.defaults
        else None
    )
    return [text for text in (gp.info.config_notice, fallback) if text]


class SaidNotices:
    """A GuidedPipeline whose calls say their notices on stderr, each once per run
    (``out.notices``, the
    PromptTruncated warning's text among them): eval and compare call it through the evaluation
    library, which returns images only."""

    def __init__(self, gp, said=(), state=None):
        self.gp, self.said, self.main = gp, set(said), is_main(state)

    def __getattr__(self, name):
        return getattr(self.gp, name)

    def __call__(self, *args, **kwargs):
        import warnings

        from ..pipelines.pipeline import PromptTruncated

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncated)  # said below, once, as a notice
            out = self.gp(*args, **kwargs)
        for text in getattr(out, "notices", ()):
            if self.main and text not in self.said:
                self.said.add(text)
                print(f"diffguide: notice: {text}", file=sys.stderr)
        return out


# --from-png: an image is untrusted input. Only these generation settings are read from it, each
# given as the flag that sets it on the command line and parsed by that flag (its type and choices);
# nothing in a file decides where images go or what they replace, and the user's own flags win.
FROM_PNG = {
    "negative_prompt": "--negative",
    "model": "--model",
    "guidance": "--guidance",
    "sampler": "--sampler",
    "cache": "--cache",
    "steps": "--steps",
    "spacing": "--spacing",
    "height": "--height",
    "width": "--width",
    "dtype": "--dtype",
    "vae_dtype": "--vae-dtype",
    "vae": "--vae",
    "lora": "--lora",
    "stitch": "--stitch",
    "guide_model": "--guide-model",
    "scale": "--scale",
    "embedded_guidance": "--embedded-guidance",
    "init_image": "--init-image",
    "strength": "--strength",
    "frames": "--frames",
    "fps": "--fps",
}
# read apart (the prompt, the seeds, the noise optimiser, T-Stitch's reset), or no setting (version,
# parallel)
FROM_PNG_OWN = (
    "prompt",
    "seed",
    "batch_seeds",
    "noise_optimizer",
    "stitch_reset",
    "version",
    "parallel",  # how processes shared the work: the image is the same without it
)
GUIDANCE_OPTIONS = (
    "scale",
    "guide_model",
)  # the file's, dropped when the user gives another --guidance
NOISE_OPTIMIZERS = ("initno", "reno")


def apply_png(args) -> list[int] | None:
    """Fill every setting the user did not give from the image's own (``--from-png``), each checked
    as its flag is and before the model loads; the batch it was made in, so that the image comes out
    bit for bit."""
    from ..images import read_settings

    path = args.from_png
    meta, notices = read_settings(path)  # an image A1111 wrote: its labels read as specs
    for text in notices:
        print(f"diffguide: notice: {text}", file=sys.stderr)
    unread = sorted(k for k in meta if k not in FROM_PNG and k not in FROM_PNG_OWN)
    if (
        unread
    ):  # never silently: the file said them, and they are not settings diffguide takes from it
        print(
            f"diffguide: notice: {path}: not read (not generation settings): {', '.join(unread)}",
            file=sys.stderr,
        )
    dropped = (
        [k for k in GUIDANCE_OPTIONS if meta.get(k) is not None]
        if args.guidance is not None
        else []
    )
    if dropped:  # they belong to the file's guidance, which the user's replaces
        print(
            f"diffguide: notice: {path}: its {' and '.join(dropped)} (part of its guidance "
            f"{meta.get('guidance')!r}) "
            f"{'is' if len(dropped) == 1 else 'are'} not applied to --guidance {args.guidance}",
            file=sys.stderr,
        )
    parser = png_parser()
    for key, flag in FROM_PNG.items():
        attr = flag[2:].replace("-", "_")
        if (
            key not in dropped
            and getattr(args, attr, None) is None
            and meta.get(key) not in (None, "", [])
        ):
            setattr(args, attr, png_value(parser, path, key, flag, meta[key]))
    if args.prompt is None and meta.get("prompt") not in (None, ""):
        args.prompt = png_text(path, "prompt", meta["prompt"])
    apply_png_noise(args, path, meta.get("noise_optimizer"))
    if meta.get("stitch_reset") not in (None, False):
        if meta["stitch_reset"] is not True:
            raise UsageError(f"{path}: stitch_reset {meta['stitch_reset']!r} is not true or false")
        args.stitch_reset = True
    batch = png_batch(path, meta) if args.seed is None and args.seeds is None else None
    if batch is not None:
        args.seed = int(meta["seed"])
    check_png_settings(args, path, batch)
    return batch


def png_parser():
    """generate's own parser, whose flags read a file's settings as they read the command line."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(message)

    parser = Parser(prog="diffguide generate", add_help=False)
    add_arguments(parser)
    return parser


def png_value(parser, path: str, key: str, flag: str, value):
    """One of a file's settings through its flag (``--steps=...``): the flag's type and choices, so
    a file says nothing the command line could not."""
    items = value if flag == "--lora" and isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise UsageError(
                f"{path}: {key} {value!r} is not allowed; a file's settings are text or numbers, "
                f"as {flag} takes them on the command line"
            )
    try:
        parsed = parser.parse_args([f"{flag}={item}" for item in items])
    except UsageError as e:
        raise UsageError(f"{path}: {key} {value!r} is not allowed ({e})") from None
    if key in ("guidance", "sampler", "cache") and any(
        term.strip().startswith("@") for term in terms(value)
    ):
        raise UsageError(
            f"{path}: {key} {value!r} reads a spec file (@); an image's settings cannot make "
            f"diffguide read other files"
        )
    return getattr(parsed, flag[2:].replace("-", "_"))


def png_text(path: str, key: str, value) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{path}: {key} {value!r} is not text")
    return value


def apply_png_noise(args, path: str, spec) -> None:
    """A file's noise optimiser as --initno / --reno would give it (unless the user gave one)."""
    if spec in (None, "") or args.initno is not None or args.reno is not None:
        return
    name, _, opts = png_text(path, "noise_optimizer", spec).partition(":")
    if name not in NOISE_OPTIMIZERS:  # the name picks a flag: nothing else may be set this way
        raise UsageError(
            f"{path}: noise_optimizer {spec!r} is not allowed; it names one of: "
            f"{', '.join(NOISE_OPTIMIZERS)}"
        )
    setattr(args, name, opts)


def png_batch(path: str, meta: dict) -> list[int]:
    """The seeds of the batch a file's image was made in: distinct seeds in range, its own among
    them (otherwise the run would make its batch and write nothing)."""
    seed = png_seed(path, "seed", meta.get("seed"))
    batch = meta.get("batch_seeds", [seed])
    if not isinstance(batch, list) or not batch:
        raise UsageError(f"{path}: batch_seeds {batch!r} is not a list of seeds")
    batch = [png_seed(path, "batch_seeds", v) for v in batch]
    if len(set(batch)) != len(batch):
        raise UsageError(f"{path}: batch_seeds repeats a seed")
    if seed not in batch:
        raise UsageError(
            f"{path}: its seed {seed} is not in its batch_seeds, so replaying it would write no "
            f"image; give --seed to make that seed's image"
        )
    return batch


def png_seed(path: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{path}: {key} {value!r} is not a seed (an integer in 0..{MAX_SEED})")
    return check_seed(value, f"{path}: {key}")


def check_png_settings(args, path: str, batch: list[int] | None) -> None:
    """The checks the command line's values get before the model loads, on the settings as the file
    filled them, with the file named."""
    try:
        check_numbers(args)
        check_work(len(batch or [0]), args.steps, args.height, args.width, args.large)
        parse_spec("sampler", args.sampler) if args.sampler else None
        parse_spec("cache", args.cache) if args.cache else None
        parse_guidance(args.guidance)
        parse_stitch(args.stitch)
        parse_loras(args.lora)
        noise_spec(args)
    except (UsageError, ValueError) as e:
        raise UsageError(f"--from-png {path}: {e}") from None


def check_numbers(args) -> None:
    """The numbers generate takes, in range."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    for name in ("frames", "fps"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be >= 1, got {v}")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be a positive integer, got {v}")
    if args.scale is not None and not args.scale == args.scale:
        raise UsageError("--scale must be a number")


def parse_guidance(spec: str | None):
    """The --guidance spec checked now, except a CFG++ scale outside [0, 1]: its hint quotes the
    run's own grid, known once the model is loaded (the pipeline's plan words it)."""
    if not spec:
        return None
    try:
        return parse_spec("guidance", spec)
    except ValueError as e:
        if "CFG++ scale is lambda" not in str(e):
            raise
        return spec  # parsed again by resolve, which raises again, with the model at hand


def model_grid(gp, spacing: str | None) -> dict:
    """The grid a run uses as ``timesteps`` arguments: the spacing given, else the model's own."""
    own = spacing or gp.defaults.get("spacing")
    if own:
        return {"spacing": own}
    grid = gp.info.grid
    if callable(grid):  # a flow-matching scheduler's own grid (FlowGrid)
        return {"spacing": "flow_match", **grid.options()}
    return {"spacing": getattr(gp.info.schedule, "spacing", "uniform_t"), **grid}


def stored_path(path: str) -> str:
    """A model, VAE or LoRA path as an image's settings record it: a local file or folder as an
    absolute
    path (so that --from-png finds it from any folder), a built-in name or hub id as given."""
    from ..pipelines.pipeline import BUILTIN

    return path if path in BUILTIN or not os.path.exists(path) else os.path.abspath(path)


def stored_prefix(text: str, path: str) -> str:
    """'style.safetensors:0.8' with its path part (``path``, the text's start) as ``stored_path``
    gives it."""
    return stored_path(path) + text[len(path) :]


def load_init_image(args, noise):
    """--init-image as a PIL image (checked before the model loads), or None."""
    if args.init_image is None:
        if args.strength is not None:
            raise UsageError("--strength applies to image-to-image: give --init-image too")
        return None
    if noise:
        raise UsageError(
            "--init-image starts from an image: it cannot be combined with --initno or --reno"
        )
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise UsageError(f"--strength must be in [0, 1], got {args.strength}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.init_image) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"cannot read --init-image {args.init_image!r}: {e}") from None


def check_parallel(args) -> None:
    """--parallel, checked before the model loads: its spec, on the processes the launcher started,
    with options it can run with."""
    if args.parallel is None:
        return
    from ..parallel import launched
    from ..pipelines.parallel_layout import layout

    if not launched():
        raise UsageError(
            "--parallel shares each image's work between processes: launch several, e.g. "
            "torchrun --nproc_per_node 2 -m diffguide generate ... --parallel branches"
        )
    for flag, given in (("--cache", args.cache), ("--cuda-graph", args.cuda_graph)):
        if given:
            raise UsageError(
                f"--parallel gathers every forward across processes: it cannot run with {flag}"
            )
    layout(args.parallel, int(os.environ["WORLD_SIZE"]))  # a ValueError: one line, as usage


def run(args) -> int:
    from ..images import DEFAULT_FPS, Outputs, parameters_text

    # everything that can be checked before loading the model is checked first
    batch_seeds = apply_png(args) if args.from_png else None
    if args.fast:
        if args.model not in (None, "builtin"):
            raise UsageError(
                "--fast picks the built-in distilled student; it cannot be combined with --model "
                f"{args.model!r}"
            )
        args.model = "builtin-fast"
    args.model = args.model or "builtin"
    check_numbers(args)
    sampler = parse_spec("sampler", args.sampler) if args.sampler else None
    cache = parse_spec("cache", args.cache) if args.cache else None
    guidance = parse_guidance(args.guidance)
    seeds = (
        parse_seeds(args.seeds)
        if args.seeds is not None
        else [check_seed(0 if args.seed is None else args.seed)]
    )
    clip = os.path.splitext(args.output or "")[1].lower() in (".mp4", ".gif")
    fps = args.fps or DEFAULT_FPS
    outputs = Outputs(args.output, seeds, args.overwrite, video=clip, fps=fps)
    parse_stitch(args.stitch)
    parse_loras(args.lora)
    noise = noise_spec(args)
    init = load_init_image(args, noise)
    computed = (
        len(batch_seeds) if batch_seeds else len(seeds)
    )  # --from-png makes its whole batch again
    check_work(
        computed, args.steps, args.height, args.width, args.large
    )  # what is known before loading
    if args.height and args.width and not args.large:
        outputs.check_space(args.height, args.width, SPACE_HINT)

    check_parallel(args)
    state = process_state(cpu=args.device == "cpu")
    if args.cuda_graph:
        import torch

        if args.device == "cpu" or not torch.cuda.is_available():
            raise UsageError(
                "--cuda-graph needs a CUDA device (--device cuda); this run is on the CPU"
            )
    gp, dtype = load_model(args, state)
    if gp.family.conditional and args.prompt is None:
        raise UsageError(f"give a prompt: {type(gp.family.net).__name__} is conditioned on one")
    prompt = "" if args.prompt is None else args.prompt
    stitch = load_stitch(args, gp)
    guide = load_guide(args, gp)
    batches = (
        [seeds[i : i + args.batch] for i in range(0, len(seeds), args.batch)]
        if batch_seeds is None
        else [batch_seeds]
    )
    # the one place the call is checked and resolved: the pipeline's plan, for the first batch
    req = gp.plan(
        prompt,
        negative_prompt=args.negative,
        guidance=guidance,
        guidance_scale=args.scale,
        sampler=sampler,
        steps=args.steps,
        embedded_guidance=args.embedded_guidance,
        spacing=args.spacing,
        height=args.height,
        width=args.width,
        num_images_per_prompt=len(batches[0]),
        seed=batches[0],
        output_type="pil",
        stitch=stitch,
        noise_optimizer=noise,
        image=init,
        strength=args.strength,
        guide_model=guide,
        cuda_graph=args.cuda_graph,
        cache=cache,
        num_frames=args.frames,
        parallel=args.parallel,
    )
    if gp.family.video != outputs.video:  # now the model is known
        outputs = Outputs(args.output, seeds, args.overwrite, video=gp.family.video, fps=fps)
    if not gp.family.video and args.fps is not None:
        raise UsageError(f"--fps is for video models; {type(gp.family.net).__name__} makes images")
    g, s, h, w, embedded, args.steps = (
        req.guidance,
        req.sampler,
        req.height,
        req.width,
        req.embedded,
        req.steps,
    )
    check_work(
        computed, args.steps, h, w, args.large
    )  # again, exactly, with the model's own defaults
    if not args.large:
        outputs.check_space(h * req.frames, w, SPACE_HINT)
    meta = {
        "prompt": prompt,
        "negative_prompt": args.negative or "",
        "model": stored_path(args.model),
        "guidance": to_spec(g),
        "sampler": to_spec(s),
        **({"cache": to_spec(cache)} if cache is not None else {}),
        **({"frames": req.frames, "fps": outputs.fps} if outputs.video else {}),
        "steps": args.steps,
        "spacing": args.spacing,
        "width": w,
        "height": h,
        "version": __version__,
        "dtype": dtype,
        **({"vae_dtype": args.vae_dtype} if args.vae_dtype else {}),
        **({"vae": stored_path(args.vae)} if args.vae else {}),
        **(
            {
                "lora": [
                    stored_prefix(item, path)
                    for item, (path, _) in zip(args.lora, parse_loras(args.lora))
                ]
            }
            if args.lora
            else {}
        ),
        "scale": getattr(g, "scale", None),
        **({"embedded_guidance": embedded} if embedded is not None else {}),
        **(
            {
                "init_image": os.path.abspath(args.init_image),
                **(
                    {}
                    if gp.family.first_frame  # a clip's first frame: no strength
                    else {
                        "strength": req.strength
                        if req.strength is not None
                        else gp.family.default_strength
                    }
                ),
            }
            if init is not None
            else {}
        ),
        **(
            {
                "stitch": stored_prefix(args.stitch, parse_stitch(args.stitch)[0]),
                "stitch_reset": args.stitch_reset,
            }
            if stitch
            else {}
        ),
        **({"guide_model": stored_path(args.guide_model)} if guide else {}),
        **({"noise_optimizer": noise} if noise else {}),
        **({"parallel": args.parallel} if args.parallel else {}),
    }
    own_grid = model_grid(gp, args.spacing)  # the grid the A1111 "Schedule type" names
    t0 = time.perf_counter()
    written, nfe = [], []
    # one unit of work is one --batch of seeds (with --from-png: the batch the image was made in),
    # made as a single process would make it; launched on several processes each takes its share
    # and writes its own files (named by seed)
    import warnings

    from ..pipelines.pipeline import PromptTruncated

    warnings.filterwarnings("ignore", category=PromptTruncated)  # said once below, as a notice
    # with --parallel every process makes every batch, together; otherwise each makes its share
    parallel = args.parallel is not None
    mine, wanted = (batches if parallel else shard(batches, state)), set(seeds)
    if len(batches) > 1 and is_main(state):
        print(
            f"diffguide: {len(seeds):,} images x {args.steps} steps at {w}x{h}, in "
            f"{len(batches):,} batches; a time estimate follows the first batch",
            file=sys.stderr,
        )
    for k, chunk in enumerate(mine):
        out = gp.run(req.for_seeds(chunk))
        for text in out.notices if not written and is_main(state) else ():
            if text not in loading_notices(gp, args):  # said at loading
                print(f"diffguide: notice: {text}", file=sys.stderr)
        if (
            not written and is_main(state) and out.noise and out.noise.get("subjects")
        ):  # InitNO's reading
            print(
                f"diffguide: InitNO subjects: {', '.join(out.noise['subjects'][0])} (set others "
                f"with --initno subjects=word|word)",
                file=sys.stderr,
            )
        if parallel and not is_main(state):
            continue  # every process holds the batch's images: the first writes them
        for seed, img in zip(chunk, out.images):
            if seed not in wanted:  # --from-png: the batch's other images are not asked for
                continue
            m = {**meta, "seed": seed, "batch_seeds": chunk}
            path = outputs.write(img, seed, m, parameters_text(m, gp.family.name, own_grid))
            written.append(path)
            nfe.append(out.nfe + (out.noise["nfe"] if out.noise else 0))
            if state is None:
                print(path)
        if k == 0 and len(mine) > 1 and is_main(state):
            print(
                estimate(time.perf_counter() - t0, len(chunk), sum(map(len, mine[1:]))),
                file=sys.stderr,
            )
    if not parallel:
        written, nfe = gather(written, state), gather(nfe, state)
    barrier(state)
    dt = time.perf_counter() - t0
    if not is_main(state):
        return 0
    if state is not None:
        print("\n".join(written))
    print(
        f"{len(seeds)} {'clip' if outputs.video else 'image'}(s), "
        f"{sum(nfe) / len(seeds):g} network evaluations each, "
        f"{dt / len(seeds):.2f} s per {'clip' if outputs.video else 'image'}"
        + (f" on {state.num_processes} processes" if state else "")
        + (f" (--parallel {args.parallel})" if parallel else ""),
        file=sys.stderr,
    )
    return 0
