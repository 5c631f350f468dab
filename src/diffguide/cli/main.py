"""The ``diffguide`` command. Errors are one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import re
import json
import os
import sys

import torch

from .. import __version__
from ..core import registry
from ..core.guided import guide
from ..core.registry import parse_spec, to_spec
from ..core.sample import SeededNoise, sample
from ..core.schedule import VPSchedule
from ..core.spacing import SPACINGS, timesteps
from ..parallel import end_processes, exit_launched, launched
from ..toy.mixture import GaussianMixture


from . import bench, comfy, distill, evaluate, generate
from .generate import MAX_SEED, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# a sentence ends at a period before a capital or an opening bracket, except after these
_SENTENCE = re.compile(
    r"(?<!\bal)(?<!\beq)(?<!\bcf)(?<!e\.g)(?<!i\.e)(?<!Sec)(?<!Alg)(?<!App)\.\s+(?=[A-Z(])"
)


def _summary(doc: str, width: int = 76) -> list[str]:
    """A docstring's first sentence, whole, wrapped to ``width``."""
    import textwrap

    first = " ".join(doc.strip().split("\n\n")[0].split())
    return textwrap.wrap(_SENTENCE.split(first, maxsplit=1)[0].rstrip(".") + ".", width) or [""]


def _list(args) -> int:
    titles = {
        "sampler": "samplers:",
        "guidance": "guidance methods:",
        "noise": "noise optimisers (--initno, --reno):",
        "cache": "step caches (--cache, cache=):",
    }
    for kind, title in titles.items():
        print(title)
        for name in registry.names(kind):
            opts = ", ".join(f"{k}={v}" for k, v in registry.options(kind, name).items())
            doc = _summary(registry.lookup(kind, name).__doc__ or "")
            print(f"  {name:20s} {doc[0]}" + "".join(f"\n  {'':20s} {line}" for line in doc[1:]))
            if opts:
                print(f"  {'':20s} options: {opts}")
    from ..core.spacing import SPACING_DOCS, SPACING_OPTIONS

    print("spacings (--spacing, spacing=):")
    for name in SPACINGS:
        print(f"  {name:20s} {SPACING_DOCS[name]}")
        if SPACING_OPTIONS[name]:
            print(f"  {'':20s} options: {', '.join(SPACING_OPTIONS[name])}")
    return 0


def _mixture(args) -> int:
    """Sample the 2-D class-conditional ring mixture and compare with the exact distribution."""
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    schedule = VPSchedule.from_betas()
    gm = GaussianMixture.ring(schedule)
    sampler = parse_spec("sampler", args.sampler)
    guidance = parse_spec("guidance", args.guidance)
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise UsageError(f"--seed must be in 0..{MAX_SEED - args.n}, got {args.seed}")
    if not 0 <= args.label <= int(gm.labels.max()):
        raise UsageError(f"--label must be in 0..{int(gm.labels.max())}, got {args.label}")
    labels = torch.full((args.n,), args.label)
    denoise = guide(gm, guidance, labels, torch.full((args.n,), -1))
    noise = SeededNoise(range(args.seed, args.seed + args.n))
    ts = timesteps(schedule, args.steps, args.spacing)
    x = sample(
        denoise, sampler, ts, noise.randn((args.n, gm.dim)) * float(schedule.sigma(ts[0])), noise
    )
    truth = gm.sample_data(args.n, labels, torch.Generator().manual_seed(args.seed))
    print(
        json.dumps(
            {
                "sampler": to_spec(sampler),
                "guidance": to_spec(guidance),
                "steps": args.steps,
                "nfe_per_sample": denoise.nfe,
                "class": args.label,
                "mean": [round(v, 4) for v in x.mean(0).tolist()],
                "true_class_mean": [round(v, 4) for v in truth.mean(0).tolist()],
                "in_class_fraction": round(_in_class(gm, x, args.label), 4),
            },
            indent=1,
        )
    )
    return 0


def _train_toy(args) -> int:
    from ..pipelines import toy_model
    from ..pipelines.pipeline import quiet_loading

    if args.arch not in toy_model.ARCHES:
        raise UsageError(
            f"unknown --arch {args.arch!r}; choose one of: {', '.join(toy_model.ARCHES)}"
        )
    arch = toy_model.arch_module(args.arch)
    if args.size not in arch.SIZES:
        raise UsageError(
            f"unknown --size {args.size!r} for --arch {args.arch}; choose one of: "
            f"{', '.join(arch.SIZES)}"
        )
    if args.arch != "unet" and args.min_snr is not None:
        raise UsageError("--min-snr weights a VP model's loss; --arch mmdit is a flow model")
    for name in ("steps", "batch", "dataset", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.decay_from is not None and not 0 <= args.decay_from < args.steps:
        raise UsageError(f"--decay-from must be in [0, --steps), got {args.decay_from}")
    if args.teacher is not None and args.arch != "mmdit":
        raise UsageError("--teacher gives a flow model's targets; it needs --arch mmdit")
    if args.teacher is not None and args.export:
        raise UsageError("--export only writes the latest checkpoint's EMA; --teacher trains")
    quiet_loading()
    if args.export:
        if not os.path.exists(os.path.join(args.out, "checkpoint.pt")):
            raise UsageError(f"no checkpoint.pt in {args.out!r} to export")
        print(toy_model.export_checkpoint(args.out))
        return 0
    cfg = toy_model.TrainConfig(
        out=args.out,
        size=args.size,
        arch=args.arch,
        steps=args.steps,
        batch=args.batch,
        lr=arch.DEFAULT_LR if args.lr is None else args.lr,
        **({} if args.min_snr is None else {"min_snr": args.min_snr}),
        seed=args.seed,
        dataset=args.dataset,
        checkpoint_every=args.checkpoint_every,
        decay_from=args.decay_from,
        teacher=args.teacher,
    )
    print(toy_model.train(cfg, progress=not args.quiet))
    return 0


def _tiny(args) -> int:
    """Save a tiny random model: written aside, then renamed into place (a new or empty folder) or
    moved in file by file over the model a folder holds (``files.replace_model_files``)."""
    import shutil
    import tempfile

    from ..files import _umask, check_link, check_path, replace_model_files
    from ..pipelines import tiny
    from ..pipelines.pipeline import quiet_loading

    if args.family not in tiny.BUILDERS:
        raise UsageError(
            f"unknown --family {args.family!r}; choose one of: {', '.join(tiny.BUILDERS)}"
        )
    target = os.path.abspath(args.folder)
    check_path(target, "folder")
    check_link(args.folder, "folder")
    _tiny_target(args.folder, target, args.overwrite)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {args.folder!r}: folder {parent!r} does not exist")
    quiet_loading()
    # written beside its final place, on the same file system, so that each rename is atomic
    tmp = tempfile.mkdtemp(
        dir=target if os.path.isdir(target) else parent, prefix=".diffguide-tiny-"
    )
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a model folder is a plain one
        tiny.save(tmp, args.family)
        if os.path.isdir(target):  # a model's folder, or an empty one
            replace_model_files(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # this run's own temporary folder
    print(target)
    return 0


def _tiny_target(folder: str, target: str, overwrite: bool) -> None:
    """Refuse a file, a folder with other files in it (even with --overwrite), and a model folder
    without --overwrite; a new or empty folder is taken as it is."""
    from ..files import is_model_folder

    if not os.path.exists(target):
        return
    if not os.path.isdir(target):
        raise UsageError(f"{folder!r} is a file; give a new folder, an empty one or a model folder")
    if not os.listdir(target):
        return
    if not is_model_folder(target):
        raise UsageError(
            f"{folder!r} holds files and is not a diffusers model folder (no model_index.json); "
            f"give a new or empty folder (--overwrite replaces only a model's files)"
        )
    if not overwrite:
        raise UsageError(
            f"{folder!r} holds a model; pass --overwrite to replace its files (nothing else in the "
            "folder is touched)"
        )


def _in_class(gm: GaussianMixture, x: torch.Tensor, label: int) -> float:
    nearest = torch.cdist(x.double(), gm.means).argmin(1)
    return float((gm.labels[nearest] == label).double().mean())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffguide", description="Guidance methods and samplers for diffusion models.")
    p.add_argument("--version", action="version", version=f"diffguide {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("list", help="list samplers and guidance methods with their options")
    generate.add_arguments(
        sub.add_parser("generate", help="generate images with a diffusers model")
    )
    evaluate.add_eval_arguments(
        sub.add_parser(
            "eval",
            help="score a model on the toy world: adherence, Frechet distance, colour, diversity",
        )
    )
    evaluate.add_compare_arguments(
        sub.add_parser("compare", help="one prompt, several guidance settings: a labelled PNG grid")
    )
    evaluate.add_calibrate_arguments(
        sub.add_parser(
            "calibrate-linearag", help="fit LinearAG's coefficients on recorded CFG trajectories"
        )
    )
    evaluate.add_tune_arguments(
        sub.add_parser(
            "tune",
            help="pick a guidance method's options for a model from probe runs (ag, apg, "
            "linear_ag)",
        )
    )
    bench.add_arguments(
        sub.add_parser("bench", help="run the CPU performance suite and print a summary")
    )
    distill.add_arguments(
        sub.add_parser(
            "distill",
            help="distil a guided teacher into a 1-8 step student (consistency, dmd2, scm), or "
            "train a consistency model from data (ict)",
        )
    )
    tr = sub.add_parser("train-toy", help="train (or resume) a built-in toy text-to-image model")
    tr.add_argument(
        "out", help="run folder: checkpoint.pt, loss.jsonl, model/ (resumes if present)"
    )
    tr.add_argument(
        "--arch",
        default="unet",
        help="unet (v-prediction, the built-in model) or mmdit (an SD3-style flow transformer, "
        "builtin-mmdit)",
    )
    tr.add_argument(
        "--size",
        default="main",
        help="unet: main or small (the ~3x cheaper companion); mmdit: main (patch 4), p2 (the "
        "first recipe: patch 2, width 128) or tiny (for tests)",
    )
    tr.add_argument("--steps", type=int, default=20000)
    tr.add_argument("--batch", type=int, default=64)
    tr.add_argument("--lr", type=float, default=None, help="default 1e-3 (unet), 5e-4 (mmdit)")
    tr.add_argument(
        "--min-snr",
        type=float,
        default=None,
        help="Min-SNR-gamma loss weight of the unet (default 5); 0 turns it off",
    )
    tr.add_argument(
        "--decay-from",
        type=int,
        default=None,
        help="from this step on, the rate falls along a half cosine to 0 at --steps (default: "
        "constant after the warm-up)",
    )
    tr.add_argument(
        "--teacher",
        default=None,
        help="mmdit only: a v-prediction UNet (builtin, or a folder of its layout) whose x0 "
        "estimates give the targets instead of each draw's noise (default: none)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--dataset", type=int, default=50000, help="distinct training scenes")
    tr.add_argument("--checkpoint-every", type=int, default=500)
    tr.add_argument("--export", action="store_true", help="only export the latest checkpoint's EMA")
    tr.add_argument("--quiet", action="store_true")
    t = sub.add_parser(
        "tiny-model", help="save a tiny random-weight diffusers model (offline tests)"
    )
    t.add_argument(
        "folder", help="a new or empty folder, or a model folder to replace (with --overwrite)"
    )
    t.add_argument(
        "--family",
        default="sd",
        help="sd, pixel_sd, sdxl, dit, pixart, sd3, ddpm, flux, qwenimage, sana or sana_sprint",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model in a model folder: its files by name, the old model's other own "
        "files removed, nothing else in the folder touched",
    )
    comfy.add_arguments(
        sub.add_parser("comfy", help="install the ComfyUI node pack: comfy install COMFYUI_DIR")
    )
    m = sub.add_parser("mixture", help="sample the built-in 2-D Gaussian mixture (exact reference)")
    m.add_argument(
        "--sampler", default="dpmpp_2m", help="sampler spec, e.g. dpmpp_2m:solver_type=heun"
    )
    m.add_argument("--guidance", default="cfg:scale=3", help="guidance spec, e.g. cfg:scale=3")
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--spacing", default="karras", choices=SPACINGS)
    m.add_argument("--label", type=int, default=0)
    m.add_argument("--n", type=int, default=512)
    m.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "list":
            return _list(args)
        if args.command == "mixture":
            return _mixture(args)
        if args.command == "generate":
            return generate.run(args)
        if args.command == "eval":
            return evaluate.run_eval(args)
        if args.command == "compare":
            return evaluate.run_compare(args)
        if args.command == "bench":
            return bench.run(args)
        if args.command == "calibrate-linearag":
            return evaluate.run_calibrate(args)
        if args.command == "tune":
            return evaluate.run_tune(args)
        if args.command == "distill":
            return distill.run(args)
        if args.command == "comfy":
            return comfy.run(args)
        if args.command == "train-toy":
            return _train_toy(args)
        if args.command == "tiny-model":
            from ..versions import check

            check()
            return _tiny(args)
        parser.print_help()
        return 2
    except (UsageError, ValueError) as e:
        return _fail(e, 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # the reader went away (diffguide list | head -1): nothing to report
        _quiet_stdout()
        return 0
    except Exception as e:  # a failure, not bad usage: still one line unless debugging
        if os.environ.get("DIFFGUIDE_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {e}", 1)
    finally:
        end_processes()


def entry() -> None:
    """The ``diffguide`` command: ``main`` with its status, and a launched process's end made safe
    from gloo's teardown (``parallel.exit_launched``)."""
    code = main()
    if launched():
        exit_launched(code)
    raise SystemExit(code)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _fail(message, code: int) -> int:
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"diffguide: error: {text}", file=sys.stderr)
    return code
