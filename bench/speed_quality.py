"""Speed versus quality on the built-in model: NFE and seconds per image against adherence and FD,
for CFG at 10/15/25/50 steps of several samplers, Adaptive Guidance, T-Stitch and AG + T-Stitch.

    python bench/speed_quality.py [--n 4] [--steps 10,15,25,50] [--out FILE] [--plot PNG] [--quick]

The AG, T-Stitch and AG + T-Stitch rows run at 25 steps (if not given, the second-largest count).
"""

import argparse

from _common import emit, line_plot, scored, toy_setup

from diffguide.pipelines import Stitching

SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m")
STEPS = (10, 15, 25, 50)


def settings(quick: bool, steps=STEPS):
    samplers, steps = (("ddim", "dpmpp_2m"), (3, 4)) if quick else (SAMPLERS, steps)
    out = [dict(sampler=s, steps=n, guidance="cfg:scale=5") for s in samplers for n in steps]
    n = 25 if 25 in steps else sorted(steps)[-2] if len(steps) > 1 else steps[-1]
    out += [
        dict(sampler="dpmpp_2m", steps=n, guidance="ag:scale=5"),
        dict(sampler="dpmpp_2m", steps=n, guidance="cfg:scale=5", stitch=0.4),
        dict(sampler="dpmpp_2m", steps=n, guidance="ag:scale=5", stitch=0.4),
    ]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--small", default="builtin-small")
    ap.add_argument(
        "--steps",
        default=",".join(map(str, STEPS)),
        help="comma-separated step counts for every sampler (default 10,15,25,50)",
    )
    ap.add_argument("--quick", action="store_true", help="two samplers, 3-4 steps, 1 image (CI)")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    judge, (gp, small), prompts = toy_setup([args.model, args.small], args.quick)
    n = 1 if args.quick else args.n
    rows = []
    try:
        steps = tuple(int(v) for v in args.steps.split(","))
    except ValueError:
        ap.error(f"--steps takes comma-separated step counts, got {args.steps!r}")
    if min(steps) < 1:
        ap.error(f"--steps must be >= 1 each, got {args.steps!r}")
    for cfg in settings(args.quick, steps):
        g, s = gp.resolve(cfg["guidance"], None, cfg["sampler"])
        st = Stitching(small, cfg["stitch"]) if "stitch" in cfg else None
        res = scored(gp, judge, prompts, n, g, s, cfg["steps"], st)
        rows.append(
            {
                **cfg,
                **{
                    k: res[k]
                    for k in (
                        "nfe_per_image",
                        "seconds_per_image",
                        "adherence",
                        "adherence_by_group",
                        "frechet_distance",
                    )
                },
            }
        )
        print(rows[-1], flush=True)
    emit(
        {
            "model": args.model,
            "small": args.small,
            "images_per_prompt": n,
            "prompts": len(prompts),
            "rows": rows,
        },
        args.out,
    )
    if args.plot:
        cfg_rows = [
            r
            for r in rows
            if r["sampler"] == "dpmpp_2m" and r["guidance"].startswith("cfg") and "stitch" not in r
        ]
        line_plot(
            args.plot,
            [r["nfe_per_image"] for r in cfg_rows],
            {
                "adherence": [r["adherence"] for r in cfg_rows],
                "FD": [r["frechet_distance"] for r in cfg_rows],
            },
            "NFE per image (dpmpp_2m, CFG 5)",
            "speed vs quality on the built-in model",
        )


if __name__ == "__main__":
    main()
