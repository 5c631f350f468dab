"""Loop overhead: diffguide's GuidedPipeline versus the stock diffusers pipeline on the same model.

Same tiny random SD model (diffguide.pipelines.tiny), scheduler DPMSolverMultistep / sampler
dpmpp_2m on
the same grid, CFG 7.5 batched in one forward, same prompt and seed, images decoded on both sides.
Time inside the UNet, the text encoder and the VAE decoder is measured by hooks; "loop overhead per
step" is the rest (scheduler or sampler maths, guidance, batching, conversions, the pipeline's own
bookkeeping) divided by the step count. A second measurement swaps the UNet's forward for a
stand-in that returns 0.1 x at once and skips decoding, so that what remains is the loop itself.
Runs alternate between the candidates (after one warm-up each), so drifting machine load hits them
alike; each figure is the median over --repeats runs, and the ratios are medians of the per-round
(paired) ratios with their spread, in wall time and in this process's CPU time. A third candidate,
the stock pipeline under torch.inference_mode (diffguide's default; diffusers uses no_grad), shows
how much of a difference is the grad mode rather than the loop. Prints JSON.

    python bench/loop_overhead.py [--steps 20] [--repeats 15] [--size 16] [--out FILE]
"""

import argparse
import statistics
import time

import torch

from _common import emit
from _common import ratio_summary as paired

from diffguide.pipelines import tiny as tm
from diffguide.pipelines import GuidedPipeline


class Clock:
    """Seconds spent inside modules' forward passes (pre/post hooks) and inside wrapped methods."""

    def __init__(self):
        self.total, self._t = 0.0, None

    def watch(self, module):
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def wrap(self, owner, name):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t

        setattr(owner, name, timed)

    def _pre(self, *_):
        self._t = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t


def timed(fns: dict, clocks: dict, repeats: int):
    """Per candidate and per figure (wall, CPU and each clock), the median over interleaved runs,
    and the per-round lists of wall and CPU seconds."""
    for fn in fns.values():
        fn()  # warm-up
    rec = {k: {c: [] for c in ["wall", "cpu", *clocks]} for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            for c in clocks.values():
                c.total = 0.0
            t, cpu = time.perf_counter(), time.process_time()
            fn()
            rec[k]["wall"].append(time.perf_counter() - t)
            rec[k]["cpu"].append(time.process_time() - cpu)
            for name, c in clocks.items():
                rec[k][name].append(c.total)
    return {
        k: {c: statistics.median(v) for c, v in r.items()} | {"walls": r["wall"], "cpus": r["cpu"]}
        for k, r in rec.items()
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=16, help="image side in pixels")
    ap.add_argument("--scale", type=float, default=7.5)
    ap.add_argument(
        "--model",
        default="tiny",
        choices=("tiny", "builtin"),
        help="tiny random SD, or the built-in pixel-space model (32 px, no VAE)",
    )
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    if args.model == "builtin":
        from diffusers import StableDiffusionPipeline

        from diffguide.pipelines.pipeline import builtin_path, quiet_loading

        quiet_loading()
        pipe = StableDiffusionPipeline.from_pretrained(
            builtin_path("builtin"),
            vae=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.vae_scale_factor = 1  # the stock pipeline assumes a VAE; the model works on pixels
        args.size, kind = 32, "latent"  # the stock pipeline cannot decode without a VAE: compare x
    else:
        pipe, kind = tm.sd(scheduler="DPMSolverMultistepScheduler"), "np"
    pipe.set_progress_bar_config(disable=True)
    clocks = {"unet": Clock(), "text_encoder": Clock(), "vae": Clock()}
    clocks["unet"].watch(pipe.unet)
    clocks["text_encoder"].watch(pipe.text_encoder)
    if pipe.vae is not None:
        clocks["vae"].wrap(pipe.vae, "decode")
    gp = GuidedPipeline.from_pipe(pipe, progress=False)
    prompt, n = "red circle", args.steps

    def stock():
        return pipe(
            prompt,
            num_inference_steps=n,
            guidance_scale=args.scale,
            height=args.size,
            width=args.size,
            generator=[torch.Generator().manual_seed(0)],
            output_type=kind,
        ).images

    def ours():
        return gp(
            prompt,
            guidance="cfg",
            guidance_scale=args.scale,
            sampler="dpmpp_2m",
            steps=n,
            height=args.size,
            width=args.size,
            seed=[0],
            output_type=kind,
        ).images

    def stock_inference_mode():
        with torch.inference_mode():
            return stock()

    diff = float(abs(stock() - ours()).max())
    rows = {}
    runs = timed(
        {"diffusers": stock, "diffusers_inference_mode": stock_inference_mode, "diffguide": ours},
        clocks,
        args.repeats,
    )
    for name, m in runs.items():
        rest = m["wall"] - m["unet"] - m["text_encoder"] - m["vae"]
        rows[name] = {
            "seconds_per_image": round(m["wall"], 5),
            "unet_seconds": round(m["unet"], 5),
            "text_encoder_seconds": round(m["text_encoder"], 5),
            "vae_decode_seconds": round(m["vae"], 5),
            "loop_overhead_ms_per_step": round(1000 * rest / n, 4),
            "cpu_seconds_per_image": round(m["cpu"], 5),
            "all_seconds": [round(w, 5) for w in m["walls"]],
        }
    # the loop alone: a stand-in network, no decoding
    pipe.unet.forward = lambda sample, *a, **k: (0.1 * sample,)
    stub = timed(
        {
            "diffusers": lambda: pipe(
                prompt,
                num_inference_steps=n,
                guidance_scale=args.scale,
                height=args.size,
                width=args.size,
                output_type="latent",
                generator=[torch.Generator().manual_seed(0)],
            ),
            "diffguide": lambda: gp(
                prompt,
                guidance="cfg",
                guidance_scale=args.scale,
                sampler="dpmpp_2m",
                steps=n,
                height=args.size,
                width=args.size,
                seed=[0],
                output_type="latent",
            ),
        },
        clocks,
        args.repeats,
    )
    for name, m in stub.items():
        rows[name]["stub_network_loop_ms_per_step"] = round(
            1000 * (m["wall"] - m["unet"] - m["text_encoder"]) / n, 4
        )
    d, g = rows["diffusers"], rows["diffguide"]
    ours_r, stock_r, stock_im = (
        runs["diffguide"],
        runs["diffusers"],
        runs["diffusers_inference_mode"],
    )
    ratios = {
        "wall_diffguide_over_diffusers": paired(ours_r["walls"], stock_r["walls"]),
        "cpu_diffguide_over_diffusers": paired(ours_r["cpus"], stock_r["cpus"]),
        "cpu_diffguide_over_diffusers_inference_mode": paired(ours_r["cpus"], stock_im["cpus"]),
        "cpu_diffusers_inference_mode_over_diffusers": paired(stock_im["cpus"], stock_r["cpus"]),
    }
    emit(
        {
            "model": "tiny random SD (diffguide.pipelines.tiny.sd)"
            if args.model == "tiny"
            else "built-in toy model (pixel space, 32 px)",
            "image": args.size,
            "steps": n,
            "cfg_scale": args.scale,
            "nfe_per_image": 2 * n,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "max_abs_image_difference": diff,
            "results": rows,
            "time_ratio_diffguide_over_diffusers": round(
                g["seconds_per_image"] / d["seconds_per_image"], 4
            ),
            "loop_overhead_ratio": round(
                g["loop_overhead_ms_per_step"] / d["loop_overhead_ms_per_step"], 4
            ),
            "stub_loop_ratio": round(
                g["stub_network_loop_ms_per_step"] / d["stub_network_loop_ms_per_step"], 4
            ),
            "paired_ratios": ratios,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
