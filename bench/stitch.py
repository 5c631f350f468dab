"""T-Stitch on the built-in model and its companion: time per image, adherence and FD for the
fraction r of steps given to the small model, r in {0, 0.2, 0.4, 0.6, 0.8, 1} (dpmpp_2m, CFG).

Quality comes from one scored pass per fraction. Time per image is measured apart, on a fixed batch
(one prompt, --timing-batch images), the fractions interleaved round by round so that drifting load
hits all alike, and the median over --repeats rounds is reported (``seconds_per_image``); the scored
pass's own time is kept as ``eval_seconds_per_image``.

    python bench/stitch.py [--n 8] [--steps 25] [--guidance cfg:scale=5] [--out FILE] [--plot PNG]
"""

import argparse
import statistics
import time

from _common import emit, line_plot, scored, toy_setup

from diffguide.pipelines import Stitching

FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--guidance", default="cfg:scale=5")
    ap.add_argument("--large", default="builtin")
    ap.add_argument("--small", default="builtin-small")
    ap.add_argument("--reset", action="store_true")
    ap.add_argument("--timing-batch", type=int, default=16)
    ap.add_argument(
        "--repeats", type=int, default=5, help="timing rounds; 0 scores only (a busy machine)"
    )
    ap.add_argument("--quick", action="store_true", help="1 image, 3 steps, 3 prompts (CI)")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if args.repeats < 0:
        ap.error(f"--repeats must be >= 0, got {args.repeats}")
    judge, (large, small), prompts = toy_setup([args.large, args.small], args.quick)
    if args.quick:
        args.n, args.steps, args.timing_batch, args.repeats = 1, 3, 1, 1
    g, s = large.resolve(args.guidance, None, args.sampler)
    rows = []
    for r in FRACTIONS:
        st = Stitching(small, r, reset=args.reset)
        res = scored(large, judge, prompts, args.n, g, s, args.steps, st)
        rows.append(
            {
                "fraction": r,
                "eval_seconds_per_image": res["seconds_per_image"],
                **{
                    k: res[k]
                    for k in (
                        "nfe_per_image",
                        "adherence",
                        "adherence_by_group",
                        "frechet_distance",
                        "colour_error",
                    )
                },
            }
        )
        print(rows[-1], flush=True)
    times = {r: [] for r in FRACTIONS}
    seeds = list(range(args.timing_batch))
    for rep in range(args.repeats + 1 if args.repeats else 0):  # round 0 warms up
        for r in FRACTIONS:
            t0 = time.perf_counter()
            large(
                prompts[0],
                guidance=g,
                sampler=s,
                steps=args.steps,
                seed=seeds,
                output_type="np",
                num_images_per_prompt=len(seeds),
                progress=False,
                stitch=Stitching(small, r, reset=args.reset),
            )
            if rep:
                times[r].append((time.perf_counter() - t0) / len(seeds))
    if args.repeats:
        for row in rows:
            row["seconds_per_image"] = round(statistics.median(times[row["fraction"]]), 4)
        base = rows[0]["seconds_per_image"]
        for row in rows:
            row["speedup"] = round(base / row["seconds_per_image"], 3)
    emit(
        {
            "large": args.large,
            "small": args.small,
            "guidance": args.guidance,
            "sampler": args.sampler,
            "steps": args.steps,
            "images_per_prompt": args.n,
            "timing_batch": args.timing_batch,
            "repeats": args.repeats,
            "reset": args.reset,
            "rows": rows,
        },
        args.out,
    )
    if args.plot and args.repeats:
        line_plot(
            args.plot,
            [r["fraction"] for r in rows],
            {"speed-up": [r["speedup"] for r in rows], "adherence": [r["adherence"] for r in rows]},
            "fraction of steps on the small model",
            "T-Stitch on the built-in model",
        )


if __name__ == "__main__":
    main()
