"""Loop overhead: diffguide's GuidedPipeline versus the stock diffusers pipeline on the same model.

Same tiny random SD model (diffguide.pipelines.tiny), scheduler DPMSolverMultistep / sampler dpmpp_2m on
the same grid, CFG 7.5 batched in one forward, same prompt and seed, images decoded on both sides.
Network time is measured by hooks on the UNet, so "non-network time per step" is everything else
(scheduler or sampler maths, guidance, batching, conversions) divided by the step count. Median of
--repeats timed runs after one warm-up. Prints JSON.

    python bench/loop_overhead.py [--steps 20] [--repeats 15] [--size 16] [--out FILE]
"""
import argparse
import statistics
import time

import torch

from _common import emit

from diffguide.pipelines import tiny as tm
from diffguide.pipelines import GuidedPipeline


class NetClock:
    """Seconds spent inside a module's forward (pre/post hooks)."""

    def __init__(self, module):
        self.total, self._t = 0.0, None
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_):
        self._t = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t


def timed(fns: dict, clock, repeats):
    """Runs the candidates in turn (interleaved, so machine load drifts hit both alike); per
    candidate the run with the median wall time, its network time and all wall times."""
    for fn in fns.values():
        fn()  # warm-up
    walls = {k: [] for k in fns}
    nets = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            clock.total = 0.0
            t = time.perf_counter()
            fn()
            walls[k].append(time.perf_counter() - t)
            nets[k].append(clock.total)
    out = {}
    for k in fns:
        i = walls[k].index(statistics.median_low(walls[k]))
        out[k] = (walls[k][i], statistics.median(nets[k]), walls[k])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=16, help="image side in pixels")
    ap.add_argument("--scale", type=float, default=7.5)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    pipe = tm.sd(scheduler="DPMSolverMultistepScheduler")
    pipe.set_progress_bar_config(disable=True)
    clock = NetClock(pipe.unet)
    gp = GuidedPipeline.from_pipe(pipe, progress=False)
    prompt, n = "red circle", args.steps

    def stock():
        return pipe(prompt, num_inference_steps=n, guidance_scale=args.scale, height=args.size,
                    width=args.size, generator=[torch.Generator().manual_seed(0)], output_type="np").images

    def ours():
        return gp(prompt, guidance="cfg", guidance_scale=args.scale, sampler="dpmpp_2m", steps=n,
                  height=args.size, width=args.size, seed=[0], output_type="np").images

    diff = float(abs(stock() - ours()).max())
    rows = {}
    for name, (wall, net, walls) in timed({"diffusers": stock, "diffguide": ours}, clock,
                                          args.repeats).items():
        rows[name] = {"seconds_per_image": round(wall, 5), "network_seconds": round(net, 5),
                      "non_network_ms_per_step": round(1000 * (wall - net) / n, 4),
                      "all_seconds": [round(w, 5) for w in walls]}
    d, g = rows["diffusers"], rows["diffguide"]
    emit({"model": "tiny random SD (diffguide.pipelines.tiny::sd)", "image": args.size, "steps": n,
          "cfg_scale": args.scale, "nfe_per_image": 2 * n, "threads": torch.get_num_threads(),
          "max_abs_image_difference": diff, "results": rows,
          "time_ratio_diffguide_over_diffusers": round(g["seconds_per_image"] / d["seconds_per_image"], 4),
          "non_network_ratio": round(g["non_network_ms_per_step"] / d["non_network_ms_per_step"], 4)},
         args.out)


if __name__ == "__main__":
    main()
