"""``diffguide bench``: the CPU parts of the performance suite in one command, with a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .generate import UsageError

# (script, full-run arguments, quick arguments)
CPU_SUITE = [
    ("loop_overhead.py", [], ["--steps", "2", "--repeats", "1"]),
    (
        "loop_overhead.py",
        ["--model", "builtin"],
        ["--model", "builtin", "--steps", "2", "--repeats", "1"],
    ),
    ("speed_quality.py", [], ["--quick"]),
    ("stitch.py", [], ["--quick"]),
    ("guidance_methods.py", [], ["--quick"]),
]


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (a smoke run)")
    p.add_argument(
        "--out", default=None, help="folder for the JSON results (default: bench/results)"
    )
    p.add_argument(
        "--bench-dir", default=None, help="the repository's bench/ folder (default: found)"
    )


def find_bench(explicit: str | None) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = (
        [explicit]
        if explicit
        else [
            os.environ.get("DIFFGUIDE_BENCH_DIR"),
            os.path.join(os.getcwd(), "bench"),
            os.path.join(here, "..", "..", "..", "bench"),
        ]
    )
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "_common.py")):
            return os.path.abspath(c)
    raise UsageError(
        "diffguide bench needs the repository's bench/ folder: run it from a checkout or pass "
        "--bench-dir"
    )


def _summary(name: str, data: dict) -> list[str]:
    if name.startswith("loop_overhead"):
        cpu = data.get("paired_ratios", {}).get("cpu_diffguide_over_diffusers", {}).get("median")
        return [
            f"{data['model']}: diffguide/diffusers time "
            f"{data['time_ratio_diffguide_over_diffusers']}"
            + (f" (CPU, paired: {cpu})" if cpu is not None else "")
            + f", loop overhead ratio {data['loop_overhead_ratio']}"
        ]
    rows = data.get("rows", [])
    out = []
    for r in rows:
        what = r.get("guidance", "")
        if "sampler" in r:
            what = f"{r['sampler']} {r.get('steps', '')} {what}".strip()
        if "fraction" in r:
            what = f"stitch {r['fraction']}"
        if "stitch" in r:
            what += f" + stitch {r['stitch']}"
        out.append(
            f"{what:<44} NFE {r['nfe_per_image']:>5}  {r['seconds_per_image']:.4f} s/img  "
            f"adherence {r['adherence']:.3f}  FD "
            + (f"{r['frechet_distance']:.1f}" if r["frechet_distance"] is not None else "undefined")
        )
    return out


def run(args) -> int:
    bench = find_bench(args.bench_dir)
    out = args.out or os.path.join(bench, "results")
    os.makedirs(out, exist_ok=True)
    for script, full, quick in CPU_SUITE:
        tag = (
            script[:-3]
            + ("_builtin" if "builtin" in full else "")
            + ("_quick" if args.quick else "")
        )
        path = os.path.join(out, tag + ".json")
        r = subprocess.run(
            [
                sys.executable,
                os.path.join(bench, script),
                *(quick if args.quick else full),
                "--out",
                path,
            ],
            capture_output=True,
            text=True,
            cwd=bench,
        )
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"bench/{script} failed: {last}")
        with open(path) as f:
            data = json.load(f)
        print(f"== {tag} ({path})")
        for line in _summary(script, data):
            print("  " + line)
    return 0
