"""``diffguide eval`` (metrics on the toy world) and ``diffguide compare`` (a labelled image
grid)."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from .. import __version__
from ..core.registry import parse_spec, to_spec
from ..files import check_new_file, write_text
from ..evaluate import calibrate_linear_ag, generate, grid, prompt_seeds, prompt_set
from ..images import Outputs
from .generate import (
    MAX_SEED,
    SaidNotices,
    UsageError,
    add_large_argument,
    add_model_arguments,
    add_noise_arguments,
    add_stitch_arguments,
    check_work,
    estimate,
    load_guide,
    load_model,
    load_stitch,
    loading_notices,
    noise_spec,
    parse_stitch,
)


def _common(p, guidance: bool = False) -> None:
    add_model_arguments(p, guidance)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="images per forward batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_arguments(p) -> None:
    _common(p, guidance=True)
    p.add_argument(
        "--prompts", default=None, help="file with one prompt per line (default: built-in set)"
    )
    # torchrun's own parser takes --n for an abbreviation of its options: the long name passes
    # through
    p.add_argument(
        "--n",
        "--images-per-prompt",
        dest="n",
        type=int,
        default=8,
        help="images per prompt (spell it --images-per-prompt after torchrun)",
    )
    p.add_argument(
        "--grid", default=None, help="also write the images as a PNG grid (a row per prompt)"
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument(
        "--per-image",
        default=None,
        metavar="FILE",
        help="also write one JSON line per image (prompt, seed, what the evaluator read, "
        "which attributes are right)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing --out, --grid and --per-image files",
    )
    add_large_argument(p)
    add_stitch_arguments(p)
    add_noise_arguments(p)


def add_compare_arguments(p) -> None:
    _common(p)
    p.add_argument("prompt")
    p.add_argument(
        "--guidance", nargs="+", default=["none", "cfg"], help="guidance specs, one row each"
    )
    p.add_argument(
        "--scales",
        default=None,
        help="comma-separated scales; each spec with a scale option gets a row per scale",
    )
    p.add_argument("--n", type=int, default=4, help="images per row (the same seeds in every row)")
    p.add_argument(
        "-o", "--output", default="compare.png", help="the grid: a .png, .jpg or .webp file"
    )
    p.add_argument("--overwrite", action="store_true")
    add_large_argument(p)


def _check(args) -> None:
    for name in ("n", "steps", "batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be >= 1, got {v}")
    top = MAX_SEED // 100_000 - 1  # prompt sets derive seed x 100000 + 1000 k + j
    if not 0 <= args.seed <= top:
        raise UsageError(f"--seed must be in 0..{top}, got {args.seed}")


def _model_defaults(args, gp) -> None:
    """Fill what the user left out from the model (a distilled student's folder records its own)."""
    if args.steps is None:
        args.steps = gp.default_steps


def run_eval(args) -> int:
    """Generate and score a prompt set. Launched on several processes (torchrun, accelerate launch)
    the batches are shared between them and the main process alone scores, prints and writes."""
    from ..parallel import is_main, process_state
    from ..toy import evaluator, metrics

    _check(args)
    if args.prompts is not None and not os.path.isfile(args.prompts):
        raise UsageError(f"--prompts {args.prompts!r} is not a file")
    # every prompt must parse: one outside the toy world cannot be scored
    prompts = metrics.read_prompts(args.prompts) if args.prompts else list(metrics.DEFAULT_PROMPTS)
    sampler = parse_spec("sampler", args.sampler) if args.sampler else None
    guidance = parse_spec("guidance", args.guidance) if args.guidance else None
    cache = parse_spec("cache", args.cache) if args.cache else None
    grid_out = _check_files(args)
    parse_stitch(args.stitch)
    noise = noise_spec(args)
    images = args.n * len(prompts)
    check_work(images, args.steps, None, None, args.large)  # what is known before loading
    state = process_state(cpu=args.device == "cpu")
    judge = evaluator.load()
    gp, _ = load_model(args, state)
    _model_defaults(args, gp)
    h, w = gp.size(None, None)
    check_work(images, args.steps, h, w, args.large)  # again, exactly, with the model's own size
    stitch = load_stitch(args, gp)
    guide = load_guide(args, gp)
    guidance, sampler = gp.resolve(guidance, args.scale, sampler)
    embedded = (
        args.embedded_guidance if args.embedded_guidance is not None else gp.embedded_guidance
    )
    costs = {}
    on_batch = _announce(images, args, h, w, state)
    calls = SaidNotices(gp, loading_notices(gp, args), state)  # the API's notices on stderr
    images, ids, nfe, seconds = prompt_set(
        calls,
        prompts,
        args.n,
        args.seed,
        guidance,
        sampler,
        args.steps,
        args.spacing,
        args.batch,
        stitch,
        noise,
        costs,
        embedded_guidance=args.embedded_guidance,
        process_state=state,
        guide_model=guide,
        on_batch=on_batch,
        cache=cache,
    )
    if not is_main(state):
        return 0
    share = costs.pop("cache_computed", None)
    records = []
    result = {
        "model": args.model,
        "guidance": to_spec(guidance),
        "sampler": to_spec(sampler),
        **({"cache": to_spec(cache)} if cache is not None else {}),
        **({"stitch": args.stitch, "stitch_reset": args.stitch_reset} if stitch else {}),
        **({"guide_model": args.guide_model} if guide else {}),
        **({"noise_optimizer": noise, **costs} if noise else {}),
        **({"embedded_guidance": embedded} if embedded is not None else {}),
        "steps": args.steps,
        "images_per_prompt": args.n,
        "prompts": len(prompts),
        "processes": state.num_processes if state is not None else 1,
        "nfe_per_image": nfe,
        **(
            {  # the unit: one transformer block for one image; the first block always runs
                "cache_blocks_computed": share,
                "nfe_computed_per_image": round(nfe * share, 4),
            }
            if share is not None
            else {}
        ),
        "seconds_per_image": round(seconds, 4),
        **metrics.evaluate(images, ids, prompts, judge, per_image=records),
        "version": __version__,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        write_text(args.out, text + "\n", args.overwrite)
    if args.per_image:
        seeds = [s for k in range(len(prompts)) for s in prompt_seeds(args.seed, k, args.n)]
        write_text(
            args.per_image,
            "".join(json.dumps({"seed": s, **r}) + "\n" for s, r in zip(seeds, records)),
            args.overwrite,
        )
    if grid_out is not None:
        rows = [images[ids == k] for k in range(len(prompts))]
        grid_out.write(
            grid(rows, prompts),
            0,
            {k: result[k] for k in ("model", "guidance", "sampler", "steps", "version")},
        )
    return 0


def _check_files(args):
    """eval's --out, --per-image and --grid checked before any work: files (not folders), distinct,
    new unless --overwrite; the grid's Outputs, or None."""
    given = [
        (flag, path)
        for flag, path in (
            ("--out", args.out),
            ("--per-image", args.per_image),
            ("--grid", args.grid),
        )
        if path
    ]
    for flag, path in given:
        check_new_file(path, args.overwrite, flag)
    names = [os.path.realpath(path) for _, path in given]
    if len(set(names)) < len(names):
        raise UsageError(
            f"{', '.join(f'{f} {p!r}' for f, p in given)}: each file must be another one"
        )
    return Outputs(args.grid, [0], args.overwrite) if args.grid else None


def _announce(images: int, args, h: int, w: int, state):
    """Say a run's size up front when it takes more than one batch; returns the callback that says
    the time estimate once the first batch is done (None for a one-batch run)."""
    from ..parallel import is_main

    if images <= args.batch or not is_main(state):
        return None
    print(
        f"diffguide: {images:,} images x {args.steps} steps at {w}x{h}, in batches of up to "
        f"{args.batch}; a time estimate follows the first batch",
        file=sys.stderr,
    )
    t0 = time.perf_counter()

    def on_batch(done: int, left: int) -> None:
        print(estimate(time.perf_counter() - t0, done, left), file=sys.stderr)

    return on_batch


def run_compare(args) -> int:
    _check(args)
    specs = [parse_spec("guidance", s) for s in args.guidance]
    scales = None
    if args.scales:
        try:
            scales = [float(v) for v in args.scales.split(",")]
        except ValueError:
            raise UsageError(
                f"--scales must be comma-separated numbers, got {args.scales!r}"
            ) from None
    sampler = parse_spec("sampler", args.sampler) if args.sampler else None
    if os.path.isdir(args.output):
        raise UsageError(
            f"-o {args.output!r} is a folder; give the grid's file path (.png, .jpg or .webp)"
        )
    out = Outputs(args.output, [0], args.overwrite)
    images = args.n * sum(len(scales) if scales and hasattr(spec, "scale") else 1 for spec in specs)
    check_work(images, args.steps, None, None, args.large)
    gp, _ = load_model(args)
    _model_defaults(args, gp)
    check_work(images, args.steps, *gp.size(None, None), args.large)
    sampler = gp.resolve("none", None, sampler)[1]
    calls = SaidNotices(gp, loading_notices(gp, args))  # the API's notices on stderr
    rows, labels, seeds = [], [], [args.seed + j for j in range(args.n)]
    for spec in specs:
        has_scale = hasattr(spec, "scale")
        for scale in scales if scales and has_scale else [None]:
            g, s = gp.resolve(spec, scale, sampler)
            parts = [
                generate(
                    calls, args.prompt, seeds[i : i + args.batch], g, s, args.steps, args.spacing
                )
                for i in range(0, len(seeds), args.batch)
            ]
            nfe = sum(c["nfe"] * len(imgs) for imgs, c in parts) / len(seeds)
            rows.append(np.concatenate([imgs for imgs, _ in parts]))
            labels.append(f"{to_spec(g)} ({nfe:g} NFE)")
    meta = {
        "prompt": args.prompt,
        "rows": labels,
        "sampler": to_spec(sampler),
        "steps": args.steps,
        "seeds": seeds,
        "model": args.model,
        "version": __version__,
    }
    print(out.write(grid(rows, labels), 0, meta))
    print(f"{len(rows)} rows x {args.n} images", file=sys.stderr)
    return 0


def add_calibrate_arguments(p) -> None:
    _common(p)
    p.add_argument(
        "--scale", type=float, default=5.0, help="CFG scale of the recorded trajectories"
    )
    p.add_argument(
        "--prompts", default=None, help="file with one prompt per line (default: built-in set)"
    )
    p.add_argument(
        "--n", "--images-per-prompt", dest="n", type=int, default=2, help="images per prompt"
    )
    p.add_argument("-o", "--output", default="linear_ag.json")
    p.add_argument("--overwrite", action="store_true")


def _probe_setup(args):
    """calibrate-linearag's and tune's shared start: (prompts, sampler spec or None, the model),
    every argument checked and the output proven writable (and new, unless --overwrite) before the
    model loads."""
    from ..toy import metrics

    if args.prompts is not None and not os.path.isfile(args.prompts):
        raise UsageError(f"--prompts {args.prompts!r} is not a file")
    prompts = _read_prompts(args.prompts) if args.prompts else list(metrics.DEFAULT_PROMPTS)
    sampler = parse_spec("sampler", args.sampler) if args.sampler else None
    check_new_file(args.output, args.overwrite)
    gp, _ = load_model(args)
    _model_defaults(args, gp)
    return prompts, sampler, gp


def run_calibrate(args) -> int:
    """Record CFG trajectories and fit LinearAG's per-evaluation coefficients."""
    _check(args)
    prompts, sampler, gp = _probe_setup(args)
    sampler = gp.resolve("none", None, sampler)[1]
    t0 = time.perf_counter()
    coefficients = calibrate_linear_ag(
        gp, prompts, args.n, args.seed, sampler, args.steps, args.scale, args.spacing
    )
    data = {
        "model": args.model,
        "sampler": to_spec(sampler),
        "steps": args.steps,
        "spacing": args.spacing,
        "scale": args.scale,
        "prompts": len(prompts),
        "images_per_prompt": args.n,
        "features": ["c", "u_prev", "c_prev", "x"],
        "coefficients": coefficients,
        "seconds": round(time.perf_counter() - t0, 2),
        "version": __version__,
    }
    write_text(args.output, json.dumps(data, indent=1), args.overwrite)
    print(args.output)
    return 0


def add_tune_arguments(p) -> None:
    p.add_argument("method", help="ag, apg, linear_ag, or cache (MagCache's ratios and threshold)")
    _common(p)
    p.set_defaults(seed=1)  # other images than eval's seed 0
    p.add_argument(
        "--scale", type=float, default=5.0, help="the method's scale (diffusers' convention)"
    )
    p.add_argument(
        "--prompts", default=None, help="probe prompts, one per line (default: built-in set)"
    )
    p.add_argument(
        "--n", "--images-per-prompt", dest="n", type=int, default=2, help="probe images per prompt"
    )
    p.add_argument(
        "--target-nfe",
        type=float,
        default=None,
        help="ag: the NFE to reach, as a fraction of CFG's (default 0.75: 25%% fewer); cache: "
        "the share of the network's work to run (default 0.5)",
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=0.5,
        help="apg: the quantile of the probe's update norms used as norm_threshold",
    )
    p.add_argument(
        "-o", "--output", default="tuned.json", help="the spec file (load it with --guidance @FILE)"
    )
    p.add_argument("--overwrite", action="store_true")


def run_tune(args) -> int:
    """Pick a method's options for this model from probe runs; write a spec file."""
    from ..evaluate.tune import CACHES, METHODS, tune, tune_cache, write

    _check(args)
    if args.method not in METHODS + CACHES:
        raise UsageError(
            f"unknown method {args.method!r} to tune; choose one of: {', '.join(METHODS + CACHES)}"
        )
    if args.target_nfe is not None and not 0 < args.target_nfe <= 1:
        raise UsageError(f"--target-nfe must be in (0, 1], got {args.target_nfe}")
    prompts, sampler, gp = _probe_setup(args)
    t0 = time.perf_counter()
    cache = args.method == "cache"
    if cache:
        target = 0.5 if args.target_nfe is None else args.target_nfe
        result = tune_cache(
            gp, prompts, args.n, args.seed, sampler, args.steps, args.scale, target, args.spacing
        )
    else:
        result = tune(
            gp,
            args.method,
            prompts,
            args.n,
            args.seed,
            sampler,
            args.steps,
            args.scale,
            0.75 if args.target_nfe is None else args.target_nfe,
            args.quantile,
            args.spacing,
        )
    result["seconds"] = round(time.perf_counter() - t0, 2)
    kind = "cache" if cache else "guidance"
    spec = write(result, args.output, args.model, args.overwrite, kind=kind)
    print(spec)
    print(f"written to {args.output}; use it with --{kind} @{args.output}", file=sys.stderr)
    return 0


def _read_prompts(path: str) -> list[str]:
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {path!r} has no prompts")
    return prompts
