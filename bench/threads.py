"""torch's OpenMP wait policy under CPU contention: a tiny ``diffguide generate`` (built-in model,
10 steps) in fresh processes with libgomp's default (``OMP_WAIT_POLICY`` unset: each thread spins
300000 times before it sleeps) against ``OMP_WAIT_POLICY=PASSIVE`` (it sleeps at once), in
interleaved pairs (A B A B ...), loaded and as idle as the machine allows.

    python bench/threads.py [--pairs 5] [--steps 10] [--load 1] [--conditions loaded,idle]
        [--note TEXT] [--out bench/results/threads.json]

"loaded" adds ``--load`` busy Python loops for the whole condition; "idle" adds none (whatever else
runs on the machine still runs: the load average and the busiest processes are recorded around
each condition). Each run is a fresh interpreter calling the CLI's ``main`` through ``python -c``
(not ``python -m diffguide``, which would put its own policy in place of the unset one), with every
core's threads (OMP_NUM_THREADS removed); libgomp's own report (OMP_DISPLAY_ENV=VERBOSE) confirms
the spin count each run got. Per run: wall and CPU seconds of the whole process, and the seconds
per image that generate prints (sampling only). The ratio is default over passive, per pair.
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _common import emit

ENTRY = "import sys; from diffguide.cli.main import main; sys.exit(main(sys.argv[1:]))"
ARMS = {"default": None, "passive": "PASSIVE"}


def run_once(policy, steps: int, out: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"  # libgomp prints its settings at load: the proof of the arm
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-c", ENTRY, "generate", "a red circle", "--steps", str(steps)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd + ["-o", out], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"generate failed:\n{res.stderr[-2000:]}")
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", res.stderr)
    per_image = re.search(r"([\d.]+) s per image", res.stderr)
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3),
        "per_image_s": float(per_image.group(1)),
        "gomp_spincount": int(spin.group(1)) if spin else None,
    }


def machine() -> dict:
    """The load average and the busiest processes (other than this bench's) right now."""
    ps = subprocess.run(
        ["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True
    ).stdout.splitlines()[1:6]
    return {"loadavg": open("/proc/loadavg").read().split()[:3], "top": [p.strip() for p in ps]}


def summary(pairs: list, key: str) -> dict:
    ratios = sorted(p["default"][key] / p["passive"][key] for p in pairs)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {
        "median_ratio": round(statistics.median(ratios), 3),
        "iqr": [round(q[0], 3), round(q[2], 3)],
        "min_max": [round(ratios[0], 3), round(ratios[-1], 3)],
        "default_median": round(statistics.median(p["default"][key] for p in pairs), 3),
        "passive_median": round(statistics.median(p["passive"][key] for p in pairs), 3),
    }


def condition(n_load: int, n_pairs: int, steps: int, tmp: str) -> dict:
    # a busy loop per extra core of load: plain Python, no threads of its own
    loads = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_load)]
    try:
        time.sleep(1.0 if loads else 0.0)
        start = machine()
        pairs = []
        for i in range(n_pairs):
            pair = {
                arm: run_once(p, steps, os.path.join(tmp, f"{n_load}-{i}-{arm}.png"))
                for arm, p in ARMS.items()
            }
            pairs.append(pair)
            print(f"  pair {i + 1}: {pair}", file=sys.stderr)
        end = machine()
    finally:
        for p in loads:
            p.kill()
            p.wait()
    return {
        "busy_loops_added": n_load,
        "machine_at_start": start,
        "machine_at_end": end,
        "pairs": pairs,
        **{key: summary(pairs, key) for key in ("per_image_s", "wall_s", "cpu_s")},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--load", type=int, default=1, help="busy loops added for 'loaded'")
    ap.add_argument("--conditions", default="loaded,idle")
    ap.add_argument("--note", default="", help="what else ran on the machine, in words")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "threads.json")
    )
    args = ap.parse_args(argv)
    result = {
        "what": f"diffguide generate 'a red circle' --steps {args.steps} (built-in model), fresh "
        "process per run, OMP_WAIT_POLICY unset (libgomp default) vs PASSIVE, interleaved pairs",
        "ratio": "default / passive, per pair; median, interquartile range and min..max",
        "cores": os.cpu_count(),
        "note": args.note,
        "conditions": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.conditions.split(","):
            n_load = {"loaded": args.load, "idle": 0}[name]
            print(f"{name}: {n_load} busy loop(s) added", file=sys.stderr)
            result["conditions"][name] = condition(n_load, args.pairs, args.steps, tmp)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
