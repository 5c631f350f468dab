"""T-Stitch on the built-in model and its companion: time per image, adherence and FD for the
fraction r of steps given to the small model, r in {0, 0.2, 0.4, 0.6, 0.8, 1} (dpmpp_2m, CFG).

    python bench/stitch.py [--n 8] [--steps 25] [--guidance cfg:scale=5] [--out FILE] [--plot PNG]
"""
import argparse

from _common import emit, line_plot, scored, toy_setup

from diffguide.cli.evaluate import prompt_set
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
    ap.add_argument("--quick", action="store_true", help="1 image, 3 steps, 3 prompts (CI)")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    judge, (large, small), prompts = toy_setup([args.large, args.small], args.quick)
    if args.quick:
        args.n, args.steps = 1, 3
    g, s = large.resolve(args.guidance, None, args.sampler)
    rows = []
    for r in FRACTIONS:
        st = Stitching(small, r, reset=args.reset)
        prompt_set(large, prompts[:1], 2, 9, g, s, args.steps, stitch=st)  # warm-up
        res = scored(large, judge, prompts, args.n, g, s, args.steps, st)
        rows.append({"fraction": r, **{k: res[k] for k in ("nfe_per_image", "seconds_per_image", "adherence",
                                                            "adherence_by_group", "frechet_distance",
                                                            "colour_error")}})
        print(rows[-1], flush=True)
    base = rows[0]["seconds_per_image"]
    for row in rows:
        row["speedup"] = round(base / row["seconds_per_image"], 3)
    emit({"large": args.large, "small": args.small, "guidance": args.guidance, "sampler": args.sampler,
          "steps": args.steps, "images_per_prompt": args.n, "reset": args.reset, "rows": rows}, args.out)
    if args.plot:
        line_plot(args.plot, [r["fraction"] for r in rows],
                  {"speed-up": [r["speedup"] for r in rows], "adherence": [r["adherence"] for r in rows]},
                  "fraction of steps on the small model", "T-Stitch on the built-in model")

if __name__ == "__main__":
    main()
