"""Every guidance method at several strengths on the built-in model (dpmpp_2m, 25 steps):
adherence, Frechet distance, colour error, NFE and time, as JSON and a markdown table; plus one
labelled comparison grid. ``--methods transformer`` measures the flow transformer's set (CFG-Zero*,
SLG, PAG and SEG on joint attention, TCFG, FDG...: ``--model builtin-mmdit --sampler euler``).

    python bench/guidance_methods.py [--n 8] [--steps 25] [--out
    bench/results/guidance_methods.json]
        [--md bench/results/guidance_methods.md] [--grid bench/results/guidance_methods.png]

LinearAG is calibrated and APG and AG are tuned first (``diffguide tune``, probe seed 1, so on other
images than the evaluation's seed 0). Each row carries its adherence's standard error; the rows
named in COMPARE are also compared image by image with their CFG row (paired: same prompts and
seeds), with the discordant counts and an exact sign-test p-value.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from _common import emit, paired, scored, toy_setup

from diffguide.core.registry import to_spec
from diffguide.evaluate import calibrate_linear_ag, grid
from diffguide.evaluate.tune import tune

SPECS = [
    "none",
    "cfg:scale=3",
    "cfg:scale=5",
    "cfg:scale=7.5",
    "cfg:scale=12",
    "apg:scale=5",
    "apg:scale=7.5",
    "apg:scale=12",
    "{apg12}",
    "cfgpp:scale=0.4",
    "cfgpp:scale=0.6",
    "cfgpp:scale=1",
    "icg:scale=3",
    "icg:scale=3,condition=prompts",
    "icg:scale=5,condition=prompts",
    "tsg:scale=2",
    "tsg:scale=3",
    "ag:scale=5",
    "{ag5}",
    "linear_ag:scale=5,coefficients={lag}",
    "cfg:scale=5+tsg:scale=2",
]
# --methods transformer: what users ask about on flow transformers (issue 34), each beside CFG
SPECS_TRANSFORMER = [
    "none",
    "cfg:scale=3",
    "cfg:scale=5",
    "cfg:scale=7.5",
    "apg:scale=7.5",
    "cfg_zero_star:scale=5",
    "cfg:scale=5+slg",
    "cfg:scale=5+pag:scale=3",
    "cfg:scale=5+seg:scale=3",
    "tcfg:scale=5",
    "fdg",
    "ag:scale=5",
]
COMPARE_TRANSFORMER = [
    ("cfg_zero_star:scale=5", "cfg:scale=5"),
    ("cfg:scale=5+slg", "cfg:scale=5"),
    ("cfg:scale=5+pag:scale=3", "cfg:scale=5"),
    ("tcfg:scale=5", "cfg:scale=5"),
]
# (row, the CFG row it is compared with image by image)
COMPARE = [
    ("apg:scale=12", "cfg:scale=12"),
    ("{apg12}", "cfg:scale=12"),
    ("ag:scale=5", "cfg:scale=5"),
    ("{ag5}", "cfg:scale=5"),
    ("icg:scale=3", "cfg:scale=3"),
    ("icg:scale=3,condition=prompts", "cfg:scale=3"),
    ("linear_ag:scale=5,coefficients={lag}", "cfg:scale=5"),
]
GRID = [
    "none",
    "cfg:scale=5",
    "cfg:scale=12",
    "apg:scale=12",
    "cfgpp:scale=0.6",
    "icg:scale=5,condition=prompts",
    "tsg:scale=3",
    "ag:scale=5",
]
GRID_TRANSFORMER = [
    "none",
    "cfg:scale=5",
    "cfg_zero_star:scale=5",
    "cfg:scale=5+slg",
    "cfg:scale=5+pag:scale=3",
    "tcfg:scale=5",
]
# --methods: (rows, paired comparisons, grid) per method set
METHOD_SETS = {
    "unet": (SPECS, COMPARE, GRID),
    "transformer": (SPECS_TRANSFORMER, COMPARE_TRANSFORMER, GRID_TRANSFORMER),
}


def calibrate(gp, sampler, steps, scale, path, prompts):
    """LinearAG coefficients from 2 images per prompt at seed 1 (the evaluation uses seed 0)."""
    with open(path, "w") as f:
        json.dump(
            {"coefficients": calibrate_linear_ag(gp, prompts, 2, 1, sampler, steps, scale)}, f
        )


def table(rows) -> str:
    head = (
        "| guidance | NFE | s/image | adherence (± se) | single | two | FD | colour error | "
        "saturation error |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| `{r['guidance']}` | {r['nfe_per_image']:.1f} | {r['seconds_per_image']:.3f} | "
        f"{r['adherence']:.3f} ± {r['adherence_se']:.3f} | "
        f"{r['adherence_by_group'].get('single', float('nan')):.3f} | "
        f"{r['adherence_by_group'].get('two', float('nan')):.3f} | "
        f"{r['frechet_distance']:.2f} | {r['colour_error']:.4f} | {r['saturation_error']:.4f} |\n"
        for r in rows
    )
    return head + body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--model", default="builtin")
    ap.add_argument(
        "--methods",
        default="unet",
        choices=tuple(METHOD_SETS),
        help="the method set: the UNet's table or the flow transformer's (SLG, PAG, CFG-Zero*...)",
    )
    ap.add_argument("--only", default=None, help="comma-separated indices into the method set")
    ap.add_argument(
        "--quick", action="store_true", help="every method once, 3 steps, 3 prompts (CI)"
    )
    ap.add_argument("--out")
    ap.add_argument("--md")
    ap.add_argument("--grid")
    args = ap.parse_args()
    judge, (gp,), prompts = toy_setup([args.model], args.quick)
    lag = os.path.join(tempfile.mkdtemp(), "linear_ag.json")
    t0 = time.perf_counter()
    if args.quick:
        args.n, args.steps = 1, 3
    every, compare, grid_specs = METHOD_SETS[args.methods]
    specs = every if args.only is None else [every[int(i)] for i in args.only.split(",")]
    if args.quick:
        specs = [  # one strength per method: a composed row is judged by its first method
            sp
            for sp in specs
            if not any(k in sp.split("+")[0] for k in (":scale=3", ":scale=12", "0.4"))
        ]
    if any("{lag}" in sp for sp in specs):  # calibrated and tuned only where a row uses them
        calibrate(gp, args.sampler, args.steps, 5.0, lag, prompts)
    calib_seconds = time.perf_counter() - t0
    probe_n = 1 if args.quick else 2
    t0 = time.perf_counter()
    tuned = {}
    if "{apg12}" in specs:
        tuned["apg12"] = tune(gp, "apg", prompts, probe_n, 1, args.sampler, args.steps, 12.0)
    if "{ag5}" in specs:
        tuned["ag5"] = tune(
            gp, "ag", prompts, probe_n, 1, args.sampler, args.steps, 5.0, target_nfe=0.75
        )
    tune_seconds = time.perf_counter() - t0
    names = {k: v["guidance"] for k, v in tuned.items()}
    rows, by_name = [], {}
    for spec in specs:
        concrete = spec.format(lag=lag, **names)
        g, s = gp.resolve(concrete, None, args.sampler)
        label = spec.replace(",coefficients={lag}", " (calibrated)")
        if spec in ("{apg12}", "{ag5}"):
            label = f"{names[spec.strip('{}')]} (tuned)"
        rows.append(
            {
                "guidance": label,
                "spec": to_spec(g),
                **scored(gp, judge, prompts, args.n, g, s, args.steps),
            }
        )
        by_name[spec] = rows[-1]
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    comparisons = [
        {
            "row": by_name[a]["guidance"],
            "against": b,
            **paired(by_name[b]["adherent"], by_name[a]["adherent"]),
        }
        for a, b in compare
        if a in by_name and b in by_name
    ]
    for c in comparisons:
        print(c, flush=True)
    emit(
        {
            "model": args.model,
            "sampler": args.sampler,
            "steps": args.steps,
            "prompts": len(prompts),
            "images_per_prompt": args.n,
            "linear_ag_calibration_seconds": round(calib_seconds, 1),
            "tune_seconds": round(tune_seconds, 1),
            "tuned": tuned,
            "comparisons": comparisons,
            "rows": rows,
        },
        args.out,
    )
    if args.md:
        with open(args.md, "w") as f:
            f.write(table(rows))
    if args.grid:
        text = "a red circle on a blue background"
        imgs = []
        for spec in grid_specs:
            g, s = gp.resolve(spec, None, args.sampler)
            k = 2 if args.quick else 6
            imgs.append(
                gp(
                    text,
                    guidance=g,
                    sampler=s,
                    steps=args.steps,
                    num_images_per_prompt=k,
                    seed=list(range(k)),
                    output_type="np",
                    progress=False,
                ).images
            )
        grid([np.asarray(i) for i in imgs], GRID).save(args.grid)


if __name__ == "__main__":
    main()
