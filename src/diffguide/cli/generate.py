"""``diffguide generate``: text (or class) to PNG files with their settings in the PNG metadata."""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time

from .. import __version__
from ..core.registry import parse_spec, to_spec
from ..core.spacing import SPACINGS
from ..pipelines.parallel import barrier, gather, is_main, process_state, shard


class UsageError(Exception):
    pass


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
        out.extend(range(lo, hi + 1))
    if len(set(out)) != len(out):
        raise UsageError(f"--seeds {text!r} repeats a seed")
    return out


def add_arguments(p) -> None:
    p.add_argument("prompt", help="text prompt (a class index or name for class-conditional models)")
    p.add_argument("--model", default="builtin",
                   help="diffusers model folder or hub id (default: the built-in toy model)")
    p.add_argument("--fast", action="store_true",
                   help="use the built-in distilled student (4 steps) instead of the built-in model")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--guidance", default=None,
                   help="guidance spec, e.g. cfg:scale=7.5,rescale=0.7 (default: cfg; none for LCM students)")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (overrides the spec's)")
    p.add_argument("--sampler", default=None,
                   help="sampler spec, e.g. dpmpp_2m:solver_type=heun (default: dpmpp_2m, or the model's own)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the model's own, 20 unless a distilled student says)")
    p.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="time grid (default: the one the model's scheduler config uses)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one seed (default 0)")
    seeds.add_argument("--seeds", default=None, help="several seeds, e.g. 0-15 or 1,4,9")
    p.add_argument("--batch", type=int, default=1, help="images per forward batch")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="network dtype (default: float16 on cuda, float32 on cpu)")
    add_stitch_arguments(p)
    add_noise_arguments(p)
    p.add_argument("-o", "--output", default="outputs", help="a .png path (one image) or a folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_stitch_arguments(p) -> None:
    p.add_argument("--stitch", default=None, metavar="SMALL_MODEL[:FRACTION]",
                   help="T-Stitch: a small model (folder, hub id or builtin-small) for the first FRACTION "
                        "of the steps (default 0.4)")
    p.add_argument("--stitch-reset", action="store_true",
                   help="restart the sampler's history at the switch (default: keep it)")


def add_noise_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--initno", nargs="?", const="", default=None, metavar="OPTIONS",
                   help="InitNO initial-noise optimisation before sampling; OPTIONS like "
                        "subjects=cat|dog,iterations=10")
    g.add_argument("--reno", nargs="?", const="", default=None, metavar="OPTIONS",
                   help="ReNO reward-based noise optimisation (for 1-4 step models); OPTIONS like "
                        "iterations=50,lr=5,reward=toy")


def noise_spec(args) -> str | None:
    """The noise optimiser spec from --initno / --reno (checked now, before any loading), or None."""
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


def load_stitch(args, gp):
    """The Stitching for --stitch (the small model on the large one's device and dtype), or None."""
    spec = parse_stitch(args.stitch)
    if spec is None:
        return None
    from ..pipelines import GuidedPipeline, Stitching

    small = GuidedPipeline.from_pretrained(spec[0], torch_dtype=gp.family.net.dtype, device=gp.device,
                                           progress=False)
    return Stitching(small, spec[1], reset=args.stitch_reset)  # checked against gp on each call


def _targets(output: str, seeds: list[int]) -> list[str]:
    if output.lower().endswith(".png"):
        if len(seeds) == 1:
            return [output]
        stem = output[:-4]
        return [f"{stem}-{s:06d}.png" for s in seeds]
    return [os.path.join(output, f"{s:06d}.png") for s in seeds]


def check_writable(paths: list[str], overwrite: bool) -> None:
    """Fail before any work if the files cannot be written; create nothing yet."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"cannot write to output folder {folder!r}: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to output folder {folder!r}: {probe!r} is not writable")
    if not overwrite:
        for p in paths:
            if os.path.exists(p):
                raise UsageError(f"output {p!r} exists; pass --overwrite to replace it")


def parameters_text(meta: dict) -> str:
    """The 'parameters' text chunk in the layout other image tools already parse."""
    lines = [str(meta["prompt"])]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = [("Steps", meta["steps"]), ("Sampler", meta["sampler"]), ("Guidance", meta["guidance"])]
    if meta.get("scale") is not None:
        fields.append(("CFG scale", meta["scale"]))
    fields += [("Seed", meta["seed"]), ("Size", f"{meta['width']}x{meta['height']}"),
               ("Model", meta["model"]), ("Version", f"diffguide {meta['version']}")]
    if meta.get("spacing"):
        fields.insert(3, ("Spacing", meta["spacing"]))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def save_png(image, path: str, meta: dict, parameters: str | None = None) -> None:
    """Write atomically: a temporary file in the same folder, renamed into place. ``meta`` goes into
    a ``diffguide`` JSON text chunk, ``parameters`` (if given) into a ``parameters`` chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    info.add_text("diffguide", json.dumps(meta, sort_keys=True))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".diffguide-", suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a plain file is expected
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    return GuidedPipeline.from_pretrained(args.model, torch_dtype=dtype, device=device,
                                          progress=not args.quiet and state is None), dtype


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run(args) -> int:
    # everything that can be checked before loading the model is checked first
    if args.fast:
        if args.model != "builtin":
            raise UsageError(f"--fast picks the built-in distilled student; it cannot be combined with "
                             f"--model {args.model!r}")
        args.model = "builtin-fast"
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be a positive integer, got {v}")
    if args.scale is not None and not args.scale == args.scale:
        raise UsageError("--scale must be a number")
    sampler = parse_spec("sampler", args.sampler) if args.sampler else None
    guidance = parse_spec("guidance", args.guidance) if args.guidance else None
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [0 if args.seed is None else args.seed]
    if any(s < 0 for s in seeds):
        raise UsageError(f"seeds must be >= 0, got {min(seeds)}")
    paths = _targets(args.output, seeds)
    check_writable(paths, args.overwrite)
    parse_stitch(args.stitch)
    noise = noise_spec(args)

    state = process_state(cpu=args.device == "cpu")
    gp, dtype = load_model(args, state)
    stitch = load_stitch(args, gp)
    embedded = gp.embedded_guidance
    if args.steps is None:
        args.steps = gp.default_steps
    g, s = gp.resolve(guidance, None if embedded else args.scale, sampler)
    h, w = gp.size(args.height, args.width)
    gp.info.timesteps(args.steps, args.spacing)  # grid errors before any work
    meta = {"prompt": args.prompt, "negative_prompt": args.negative or "", "model": args.model,
            "guidance": to_spec(g), "sampler": to_spec(s), "steps": args.steps, "spacing": args.spacing,
            "width": w, "height": h, "version": __version__, "dtype": dtype,
            "scale": (args.scale if args.scale is not None else gp.embedded_scale) if embedded else getattr(g, "scale", None),
            **({"stitch": args.stitch, "stitch_reset": args.stitch_reset} if stitch else {}),
            **({"noise_optimizer": noise} if noise else {})}
    t0 = time.perf_counter()
    written, nfe = [], []
    # one unit of work is one --batch of seeds, made as a single process would make it; launched on
    # several processes each takes its share and writes its own files (named by seed)
    batches = [(seeds[i:i + args.batch], paths[i:i + args.batch]) for i in range(0, len(seeds), args.batch)]
    for chunk, targets in shard(batches, state):
        out = gp(args.prompt, negative_prompt=args.negative, guidance=g, sampler=s, steps=args.steps,
                 guidance_scale=args.scale if embedded else None,
                 spacing=args.spacing, height=h, width=w, num_images_per_prompt=len(chunk), seed=chunk,
                 output_type="pil", stitch=stitch, noise_optimizer=noise)
        nfe.append((out.nfe + (out.noise["nfe"] if out.noise else 0)) * len(chunk))
        for seed, img, path in zip(chunk, out.images, targets):
            m = {**meta, "seed": seed}
            save_png(img, path, m, parameters_text(m))
            written.append(path)
            if state is None:
                print(path)
    written, nfe = gather(written, state), gather(nfe, state)
    barrier(state)
    dt = time.perf_counter() - t0
    if not is_main(state):
        return 0
    if state is not None:
        print("\n".join(written))
    print(f"{len(seeds)} image(s), {sum(nfe) / len(seeds):g} network evaluations each, "
          f"{dt / len(seeds):.2f} s per image" + (f" on {state.num_processes} processes" if state else ""),
          file=sys.stderr)
    return 0
