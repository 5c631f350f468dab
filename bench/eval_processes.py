"""``diffguide eval`` on one process against two (torchrun, CPU, gloo): wall time and CPU time of
the whole command, in interleaved rounds, and whether the two give the same numbers.

    python bench/eval_processes.py [--quick] [--rounds 3] [--n 8] [--steps 25] [--out
    bench/results/eval_processes.json]

One process uses every core with its own threads; two processes get half the threads each. The
ratio is two-process time over one-process time (below 1: two processes are faster). With another
thread count per process the CPU kernels sum in another order, so images can differ in the last
bits; ``differing_metrics`` lists any number that moved (the tests compare at equal thread counts).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _common import emit


def timed(cmd, env) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of the command and its children, the eval JSON it wrote)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(res.stdout[res.stdout.index("{") :])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=8, help="images per prompt")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--prompts", default=None, help="prompt file (default: the built-in 21)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="one round, 2 prompts x 2 images, 2 steps")
    args = ap.parse_args(argv)
    if args.quick:
        from diffguide.toy.metrics import DEFAULT_PROMPTS

        args.rounds, args.n, args.steps = 1, 2, 2
        args.prompts = os.path.join(tempfile.mkdtemp(), "prompts.txt")
        with open(args.prompts, "w") as f:
            f.write("\n".join(DEFAULT_PROMPTS[:2]) + "\n")
    threads = os.cpu_count() or 1
    base = [
        "eval",
        "--images-per-prompt",
        str(args.n),
        "--steps",
        str(args.steps),
        "--quiet",
        *(["--prompts", args.prompts] if args.prompts else []),
    ]
    one = [sys.executable, "-m", "diffguide", *base]
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "diffguide",
        *base,
    ]
    env1 = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env2 = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // 2)), "ACCELERATE_USE_CPU": "1"}
    rows = []
    for r in range(args.rounds):  # alternate which goes first, so drifting load hits both alike
        pair = [("one", one, env1), ("two", two, env2)]
        res = {}
        for name, cmd, env in pair if r % 2 == 0 else pair[::-1]:
            res[name] = timed(cmd, env)
        a, b = res["one"][2], res["two"][2]
        differ = {
            k: [a[k], b.get(k)]
            for k in a
            if k not in ("seconds_per_image", "processes") and a[k] != b.get(k)
        }
        rows.append(
            {
                "one_wall": res["one"][0],
                "two_wall": res["two"][0],
                "one_cpu": res["one"][1],
                "two_cpu": res["two"][1],
                "wall_ratio": res["two"][0] / res["one"][0],
                "cpu_ratio": res["two"][1] / res["one"][1],
                "differing_metrics": differ,
                "images": res["one"][2]["images"],
            }
        )
    ratios = [r["wall_ratio"] for r in rows]
    result = {
        "cores": threads,
        "rows": rows,
        "images": rows[0]["images"],
        "steps": args.steps,
        "median_wall_ratio": statistics.median(ratios),
        "min_wall_ratio": min(ratios),
        "max_wall_ratio": max(ratios),
        "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rows),
        "same_metrics_every_round": not any(r["differing_metrics"] for r in rows),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
