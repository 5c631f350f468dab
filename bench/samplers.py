"""Every sampler and schedule against the reference on the built-in model: adherence, FD and NFE at
a few step counts, CFG 5, with each row's adherence compared image by image (same prompts and seeds)
with the reference, CFG-5 dpmpp_2m at 25 steps; "reaches" is the smallest NFE whose adherence is
within one standard error of the reference's.

    python bench/samplers.py [--n 8] [--steps 6,10,15] [--set new] [--out FILE] [--md FILE]
        [--quick]

``--set new``: ComfyUI's samplers and schedules added for issue 37 instead of the first table's.
"""

import argparse

from _common import emit, paired, scored, toy_setup

SAMPLERS = (
    "euler",
    "euler_ancestral",
    "heun",
    "dpmpp_2m",
    "dpmpp_sde",
    "unipc",
    "deis",
    "lms",
    "plms",
    "ipndm",
    "dpm2",
    "restart",
)
SPACINGS = ("karras", "exponential", "kl_optimal", "sgm_uniform", "simple", "ays")
NEW_SAMPLERS = (  # ComfyUI's entries added in issue 37 (dpm_adaptive picks its own step count)
    "res_multistep",
    "res_multistep_ancestral",
    "er_sde",
    "sa_solver",
    "sa_solver_pece",
    "seeds_2",
    "seeds_3",
    "gradient_estimation",
    "heunpp2",
    "dpm_fast",
    "exp_heun_2_x0",
)
NEW_SPACINGS = ("normal", "ddim_uniform", "linear_quadratic", "laplace", "bong_tangent", "gits")


def table(rows, ref) -> str:
    out = [
        f"Reference: dpmpp_2m, 25 steps, CFG 5: adherence {ref['adherence']:.3f} ± "
        f"{ref['adherence_se']:.3f}, "
        f"NFE {ref['nfe_per_image']:g}, FD {ref['frechet_distance']:.1f}.",
        "",
        "| sampler | spacing | steps | NFE | adherence ± se | vs reference (better/worse images) "
        "| FD |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["paired"]
        out.append(
            f"| {r['sampler']} | {r['spacing'] or 'model'} | {r['steps']} | {r['nfe_per_image']:g} "
            f"| {r['adherence']:.3f} ± {r['adherence_se']:.3f} | {p['difference']:+.3f} "
            f"({p['better']}/{p['worse']}) | {r['frechet_distance']:.1f} |"
        )
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", default="6,10,15")
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--set", choices=("first", "new"), default="first")
    ap.add_argument(
        "--quick", action="store_true", help="two samplers, one spacing, 3 steps, 1 image (CI)"
    )
    ap.add_argument("--out")
    ap.add_argument("--md")
    args = ap.parse_args()
    judge, (gp,), prompts = toy_setup([args.model], args.quick)
    n = 1 if args.quick else args.n
    steps = [3] if args.quick else [int(v) for v in args.steps.split(",")]
    samplers, spacings = (
        (SAMPLERS, SPACINGS) if args.set == "first" else (NEW_SAMPLERS, NEW_SPACINGS)
    )
    if args.quick:  # two samplers, one spacing
        samplers, spacings = (
            (("unipc", "plms"), ("ays",))
            if args.set == "first"
            else (
                samplers[:2],
                spacings[:1],
            )
        )
    g = gp.resolve("cfg:scale=5", None, "dpmpp_2m")[0]
    ref = scored(
        gp, judge, prompts, n, g, gp.resolve(None, None, "dpmpp_2m")[1], 4 if args.quick else 25
    )
    settings = [(s, None, k) for s in samplers for k in steps] + [
        ("dpmpp_2m", sp, k) for sp in spacings for k in steps
    ]
    rows = []
    for sampler, spacing, k in settings:
        s = gp.resolve(None, None, sampler)[1]
        res = scored(gp, judge, prompts, n, g, s, k, spacing=spacing)
        rows.append(
            {
                "sampler": sampler,
                "spacing": spacing,
                "steps": k,
                **{
                    key: res[key]
                    for key in (
                        "nfe_per_image",
                        "seconds_per_image",
                        "adherence",
                        "adherence_se",
                        "adherence_by_group",
                        "frechet_distance",
                    )
                },
                "paired": paired(ref["adherent"], res["adherent"]),
            }
        )
        print(rows[-1], flush=True)
    for key in {(r["sampler"], r["spacing"]) for r in rows}:
        ok = [
            r
            for r in rows
            if (r["sampler"], r["spacing"]) == key
            and r["adherence"] >= ref["adherence"] - ref["adherence_se"]
        ]
        for r in rows:
            if (r["sampler"], r["spacing"]) == key:
                r["reaches_reference_at_nfe"] = min((x["nfe_per_image"] for x in ok), default=None)
    ref = {k: v for k, v in ref.items() if k != "adherent"}
    emit(
        {
            "model": args.model,
            "images_per_prompt": n,
            "prompts": len(prompts),
            "guidance": "cfg:scale=5",
            "reference": ref,
            "rows": rows,
        },
        args.out,
    )
    if args.md:
        with open(args.md + ".tmp", "w") as f:
            f.write(table(rows, ref))
        import os

        os.replace(args.md + ".tmp", args.md)


if __name__ == "__main__":
    main()
