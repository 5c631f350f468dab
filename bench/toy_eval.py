"""The built-in model on the toy world: adherence, Frechet distance, colour fidelity and time for
a table of guidance settings (and the companion model). Prints JSON, one row per setting.

    python bench/toy_eval.py [--n 8] [--steps 25] [--model builtin] [--out FILE]
"""

import argparse

from _common import emit, scored, toy_setup

SETTINGS = [("none", None), ("cfg", 1.5), ("cfg", 3.0), ("cfg", 5.0), ("cfg", 7.5)]


def run(gp, judge, prompts, guidance, scale, sampler, steps, n, seed=0):
    g, s = gp.resolve(guidance, scale, sampler)
    return {
        "guidance": guidance,
        "scale": scale,
        "sampler": sampler,
        "steps": steps,
        **scored(gp, judge, prompts, n, g, s, steps, seed=seed),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--models", default="builtin,builtin-small")
    ap.add_argument("--quick", action="store_true", help="3 prompts, 1 image, 3 steps (CI)")
    ap.add_argument("--out")
    args = ap.parse_args()
    models = args.models.split(",")
    judge, pipes, prompts = toy_setup(models, args.quick)
    if args.quick:
        args.n, args.steps = 1, 3
    rows = []
    for model, gp in zip(models, pipes):
        for guidance, scale in SETTINGS:
            rows.append(
                {
                    "model": model,
                    **run(gp, judge, prompts, guidance, scale, args.sampler, args.steps, args.n),
                }
            )
    emit({"prompts": len(prompts), "images_per_prompt": args.n, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
