"""T-Stitch on the built-in model and its companion: time per image, adherence and FD for the
fraction r of steps given to the small model, r in {0, 0.2, 0.4, 0.6, 0.8, 1} (dpmpp_2m, CFG).

    python bench/stitch.py [--n 8] [--steps 25] [--guidance cfg:scale=5] [--out FILE] [--plot PNG]
"""
import argparse

from _common import emit, line_plot

from diffguide.cli.evaluate import prompt_set
from diffguide.pipelines import GuidedPipeline, Stitching
from diffguide.pipelines.pipeline import quiet_loading
from diffguide.toy import evaluator, metrics

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
    quiet_loading()
    judge = evaluator.load()
    large = GuidedPipeline.from_pretrained(args.large, progress=False)
    small = GuidedPipeline.from_pretrained(args.small, progress=False)
    prompts = metrics.DEFAULT_PROMPTS[:3] if args.quick else metrics.DEFAULT_PROMPTS
    if args.quick:
        args.n, args.steps = 1, 3
    g, s = large.resolve(args.guidance, None, args.sampler)
    rows = []
    for r in FRACTIONS:
        st = Stitching(small, r, reset=args.reset)
        prompt_set(large, prompts[:1], 2, 9, g, s, args.steps, stitch=st)  # warm-up
        images, ids, nfe, seconds = prompt_set(large, prompts, args.n, 0, g, s, args.steps, stitch=st)
        res = metrics.evaluate(images, ids, prompts, judge)
        rows.append({"fraction": r, "nfe_per_image": nfe, "seconds_per_image": round(seconds, 4),
                     "adherence": res["adherence"], "adherence_by_group": res["adherence_by_group"],
                     "frechet_distance": res["frechet_distance"], "colour_error": res["colour_error"]})
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
