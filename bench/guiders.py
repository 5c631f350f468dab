"""The guiders users know from diffusers (PAG, SEG, SLG, CFG-Zero*, AutoGuidance, FDG, TCFG) on the
built-in model: adherence (with its standard error and a paired comparison against the CFG row of
the
same strength), Frechet distance, colour and saturation error and NFE, beside CFG and APG; then the
time per image of "cfg+pag" with its three branches in one forward against the same branches run as
separate forwards (the way diffusers' guiders run them), interleaved, in wall and process CPU time.

    python bench/guiders.py [--n 8] [--steps 25] [--out bench/results/guiders.json]
        [--md bench/results/guiders.md] [--repeats 9] [--set diffusers|new]
"""

import argparse
import statistics

from _common import emit, interleaved, paired, ratio_summary, scored, toy_setup

from diffguide.core.registry import to_spec
from diffguide.pipelines import GuidedPipeline

SPECS = [
    "cfg:scale=3",
    "cfg:scale=5",
    "cfg:scale=7.5",
    "apg:scale=7.5",
    "pag:scale=1.5",
    "pag:scale=3",
    "cfg:scale=5+pag:scale=1.5",
    "cfg:scale=5+pag:scale=3",
    "seg:scale=3",
    "seg:scale=3,sigma=2",
    "cfg:scale=5+seg:scale=3",
    "cfg:scale=5+slg:scale=2.8",
    "cfg:scale=5+slg:scale=2.8,stop=1",
    "cfg_zero_star:scale=5",
    "cfg_zero_star:scale=7.5",
    "autoguidance:scale=2",
    "autoguidance:scale=3",
    "cfg:scale=5+autoguidance:scale=1.5",
    "fdg:scales=7.5;3",
    "fdg:scales=10;5",
    "tcfg:scale=5",
    "tcfg:scale=7.5",
]
# the guiders users asked for in 2025-26 (issue 37), each paired with CFG at its NFE
NEW_SPECS = [
    "cfg:scale=5",
    "cfg:scale=7.5",
    "mambo:scale=5",
    "mambo:scale=7.5",
    "apg_mix:scale=5",
    "cfg_renorm:scale=5",
    "cfg_renorm:scale=7.5",
    "mahiro:scale=5",
    "skimmed_cfg:scale=7.5",
    "fresca:scale=5,freq_cutoff=5",  # ComfyUI's 20 is for 128-wide latents: all of 32x32 is below
    "tpg:scale=3",
    "cfg:scale=5+tpg:scale=1.5",
    "cfg:scale=5+pag:scale=1.5",
    "nag:cfg=5",
]
NEW_COMPARE = [
    ("mambo:scale=5", "cfg:scale=5"),
    ("mambo:scale=7.5", "cfg:scale=7.5"),
    ("apg_mix:scale=5", "cfg:scale=5"),
    ("cfg_renorm:scale=5", "cfg:scale=5"),
    ("cfg_renorm:scale=7.5", "cfg:scale=7.5"),
    ("mahiro:scale=5", "cfg:scale=5"),
    ("skimmed_cfg:scale=7.5", "cfg:scale=7.5"),
    ("fresca:scale=5,freq_cutoff=5", "cfg:scale=5"),
    ("tpg:scale=3", "cfg:scale=5"),
    ("cfg:scale=5+tpg:scale=1.5", "cfg:scale=5+pag:scale=1.5"),
    ("nag:cfg=5", "cfg:scale=5"),
]
COMPARE = [
    ("cfg:scale=5+pag:scale=1.5", "cfg:scale=5"),
    ("cfg:scale=5+pag:scale=3", "cfg:scale=5"),
    ("cfg:scale=5+seg:scale=3", "cfg:scale=5"),
    ("cfg:scale=5+slg:scale=2.8,stop=1", "cfg:scale=5"),
    ("cfg_zero_star:scale=5", "cfg:scale=5"),
    ("cfg_zero_star:scale=7.5", "cfg:scale=7.5"),
    ("tcfg:scale=5", "cfg:scale=5"),
    ("tcfg:scale=7.5", "cfg:scale=7.5"),
    ("fdg:scales=7.5;3", "cfg:scale=5"),
    ("cfg:scale=5+autoguidance:scale=1.5", "cfg:scale=5"),
]


def table(rows) -> str:
    head = (
        "| guidance | NFE | s/image | adherence (± se) | FD | colour error | saturation error |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| `{r['guidance']}` | {r['nfe_per_image']:.1f} | {r['seconds_per_image']:.3f} | "
        f"{r['adherence']:.3f} ± {r['adherence_se']:.3f} | {r['frechet_distance']:.2f} | "
        f"{r['colour_error']:.4f} | {r['saturation_error']:.4f} |\n"
        for r in rows
    )


def batching(gp, steps: int, images: int, repeats: int) -> dict:
    """cfg+pag with the three branches in one forward vs one forward per branch (max_batch = the
    images of one branch), same images; interleaved rounds after a warm-up."""
    kw = dict(
        guidance="cfg:scale=5+pag:scale=3",
        steps=steps,
        seed=list(range(images)),
        output_type="np",
        num_images_per_prompt=images,
        progress=False,
    )
    runs = {
        "batched": lambda: gp("a red circle", **kw),
        "separate": lambda: gp("a red circle", max_batch=images, **kw),
    }
    first = {k: f() for k, f in runs.items()}
    rec = interleaved(runs, repeats)
    return {
        "images_per_call": images,
        "steps": steps,
        "forwards_per_call": {k: v.forwards for k, v in first.items()},
        "max_abs_image_difference": float(
            abs(first["batched"].images - first["separate"].images).max()
        ),
        "median_seconds_per_image": {
            k: {m: round(statistics.median(v) / images, 4) for m, v in r.items()}
            for k, r in rec.items()
        },
        "wall_batched_over_separate": ratio_summary(
            rec["batched"]["wall"], rec["separate"]["wall"]
        ),
        "cpu_batched_over_separate": ratio_summary(rec["batched"]["cpu"], rec["separate"]["cpu"]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch-images", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="every spec once, 3 steps, 3 prompts (CI)")
    ap.add_argument(
        "--set",
        choices=("diffusers", "new"),
        default="diffusers",
        help="the guiders diffusers ships (default) or issue 37's (2025-26), each against CFG",
    )
    ap.add_argument("--out")
    ap.add_argument("--md")
    args = ap.parse_args()
    judge, (gp,), prompts = toy_setup(["builtin"], args.quick)
    guide = GuidedPipeline.from_pretrained("builtin-small", progress=False)
    if args.quick:
        args.n, args.steps, args.repeats = 1, 3, 1
    specs, compare = (NEW_SPECS, NEW_COMPARE) if args.set == "new" else (SPECS, COMPARE)
    rows, by = [], {}
    for spec in specs:
        g, s = gp.resolve(spec, None, args.sampler)
        rows.append(
            {
                "guidance": spec,
                "spec": to_spec(g),
                **scored(
                    gp,
                    judge,
                    prompts,
                    args.n,
                    g,
                    s,
                    args.steps,
                    guide_model=guide if "autoguidance" in spec else None,
                ),
            }
        )
        by[spec] = rows[-1]
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    comparisons = [
        {"row": a, "against": b, **paired(by[b]["adherent"], by[a]["adherent"])} for a, b in compare
    ]
    # the batching timing is the diffusers set's (cfg+pag); the new set only scores
    timing = (
        batching(gp, args.steps, args.batch_images, args.repeats)
        if args.set == "diffusers"
        else None
    )
    emit(
        {
            "model": "builtin",
            "guide_model": "builtin-small",
            "sampler": args.sampler,
            "steps": args.steps,
            "prompts": len(prompts),
            "images_per_prompt": args.n,
            "comparisons": comparisons,
            "rows": rows,
            "cfg_pag_batching": timing,
        },
        args.out,
    )
    if args.md:
        with open(args.md, "w") as f:
            f.write(table(rows))


if __name__ == "__main__":
    main()
