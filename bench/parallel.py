"""One image on two CPU processes (``parallel="branches"``: CFG's cond and uncond rows, one per
process, gathered each step) against one process, each process on one thread: seconds per image.

    python bench/parallel.py [--pairs 15] [--steps 25] [--images 1] [--model builtin]
        [--guidance cfg] [--out bench/results/parallel.json]
    python bench/parallel.py --quick     # 3 pairs, 4 steps: checks that it runs
    python bench/parallel.py --device cuda   # NCCL, one GPU per process (the device check's step)

With ``--device cuda`` each process takes one GPU through accelerate's process state (NCCL), as
``diffguide generate --parallel`` does, and the clocks stop after a CUDA synchronize; with fewer
than two GPUs it writes and prints one line saying so and exits 0 (issue 38: a one-GPU machine
cannot measure it).

Both are timed inside one torchrun launch of two gloo processes, after a warm-up of each, so that
start-up and loading count for neither: the one-process run is the first process alone (the second
waits in a barrier, its CPU time reported as ``idle_cpu_s``), the two-process run is both. Each
pair runs one of each, in alternating order, so that drifting machine load hits both alike; the
ratio is two-process over one-process time (below 1: two processes are faster), per pair, then
its median, quartiles and extremes. Wall time is the first process's; CPU time is summed over the
processes that ran. ``max_abs_difference``: the largest latent difference between the two runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import emit, ratio_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "parallel.json")


def worker(args) -> None:
    """One of the two launched processes: the pairs, timed; the first process writes the JSON."""
    import torch
    import torch.distributed as dist

    from diffguide.parallel import exit_launched
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines.pipeline import quiet_loading

    if args.device == "cuda":
        from diffguide.parallel import process_state

        device = process_state().device  # NCCL, this process's GPU
        if device.type != "cuda":  # e.g. ACCELERATE_USE_CPU set: gloo, not what is reported
            raise SystemExit(f"--device cuda: this process got {device}")
    else:
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
        device = None
    rank = dist.get_rank()
    quiet_loading()
    gp = GuidedPipeline.from_pretrained(args.model, progress=False, device=device)
    kw = dict(
        guidance=args.guidance,
        steps=args.steps,
        num_images_per_prompt=args.images,
        seed=0,
        output_type="latent",
        progress=False,
    )
    out = {}

    def done():
        if device is not None:
            torch.cuda.synchronize()
        dist.barrier()

    def alone():
        if rank == 0:
            out["one"] = gp(args.prompt, **kw).images
        done()

    def together():
        out["two"] = gp(args.prompt, parallel="branches", **kw).images
        done()

    alone(), together()  # warm-up
    rec = {k: {"wall": [], "cpu": [], "idle_cpu": []} for k in ("one", "two")}
    for i in range(args.pairs):
        for name, fn in [("one", alone), ("two", together)][:: 1 if i % 2 == 0 else -1]:
            wall, cpus = timed(fn)
            rec[name]["wall"].append(wall)
            rec[name]["cpu"].append(cpus[0] if name == "one" else sum(cpus))
            rec[name]["idle_cpu"].append(cpus[1] if name == "one" else 0.0)
    if rank == 0:
        diff = float((out["one"] - out["two"]).abs().max())
        with open(args.worker, "w") as f:
            json.dump({"rec": rec, "max_abs_difference": diff}, f)
    dist.barrier()
    exit_launched(0)  # gloo's teardown at interpreter exit sometimes aborts a finished process


def timed(fn) -> tuple[float, list[float]]:
    """(the first process's wall seconds, each process's CPU seconds) of ``fn`` run by both."""
    import torch.distributed as dist

    dist.barrier()
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    cpus = [None] * dist.get_world_size()
    dist.all_gather_object(cpus, cpu)
    return wall, cpus


def spread(xs: list) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": round(statistics.median(xs), 4), "q25": round(q[0], 4), "q75": round(q[2], 4)}


def summary(rec: dict, images: int) -> dict:
    one, two = rec["one"], rec["two"]
    per = {
        name: {
            "wall_s_per_image": spread([w / images for w in r["wall"]]),
            "cpu_s_per_image": spread([c / images for c in r["cpu"]]),
        }
        for name, r in rec.items()
    }
    per["one"]["idle_cpu_s"] = spread(one["idle_cpu"])
    return {
        "one_process": per["one"],
        "two_processes": per["two"],
        "wall_ratio_two_over_one": ratio_summary(two["wall"], one["wall"]),
        "cpu_ratio_two_over_one": ratio_summary(two["cpu"], one["cpu"]),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--images", type=int, default=1, help="images per call (one batch)")
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--guidance", default="cfg")
    ap.add_argument("--prompt", default="a red circle above a blue square")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="3 pairs, 4 steps")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.pairs, args.steps = 3, 4
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            line = (
                f"bench/parallel.py: {torch.cuda.device_count()} CUDA device(s) here; one image on "
                "several GPUs needs at least 2, so it is not measured"
            )
            print(line, file=sys.stderr)
            emit({"skipped": line, "device": "cuda"}, args.out)
            return {"skipped": line}
    tmp = os.path.join(tempfile.mkdtemp(), "rec.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.abspath(__file__), "--worker", tmp, "--pairs", str(args.pairs)]
    cmd += ["--steps", str(args.steps), "--images", str(args.images), "--model", args.model]
    cmd += ["--guidance", args.guidance, "--prompt", args.prompt, "--device", args.device]
    env = dict(os.environ)
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the launch failed:\n{res.stderr[-3000:]}")
    with open(tmp) as f:
        got = json.load(f)
    what = (
        "2 gloo processes of 1 thread vs 1 process of 1 thread"
        if args.device == "cpu"
        else "2 NCCL processes of one GPU each vs 1 process on one GPU (CPU times are the host's "
        "waits on the GPU)"
    )
    result = {
        "what": f"one image, parallel='branches' on {what}, timed in one launch (start-up and "
        "loading excluded)",
        "device": args.device,
        "model": args.model,
        "guidance": args.guidance,
        "steps": args.steps,
        "images_per_call": args.images,
        "pairs": args.pairs,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "max_abs_difference": got["max_abs_difference"],
        **summary(got["rec"], args.images),
        "raw": got["rec"],
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
