"""Step caches on a built-in model: adherence (n images per prompt, with its standard error and
a paired comparison with no cache on the same images), Frechet distance, colour error, the share of
the network's work run, and time per image against no cache, interleaved (process CPU time and
wall time; the median of the per-round ratios and their quartiles), as JSON and a markdown table.

    python bench/cache.py [--model builtin] [--n 8] [--steps 25] [--repeats 7]
        [--out bench/results/cache_unet.json] [--md bench/results/cache_unet.md]

On a UNet the set is DeepCache's (interval, branch, and other_interval: the unconditional rows
reusing their deep features longer than the conditional ones, against the same interval for the
whole batch); on a transformer, the first-block cache (per branch and per batch), TeaCache and
MagCache (its ratios calibrated by ``diffguide tune cache`` on probe seed 1).
"""

import argparse
import os
import tempfile

from _common import emit, interleaved, paired, ratio_summary, scored, toy_setup

UNET = [
    "deepcache:interval=2",
    "deepcache:interval=3",
    "deepcache:interval=3,branch=1",
    "deepcache:interval=5",
    "deepcache:interval=3,other_interval=5",
]
TRANSFORMER = [
    "first_block:threshold=0.05",
    "first_block:threshold=0.1",
    "first_block:threshold=0.1,per=batch",
    "teacache:threshold=0.2",
    "teacache:threshold=0.4",
    "{magcache}",
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin")
    p.add_argument("--caches", default=None, help="';'-separated specs (default: the model's set)")
    p.add_argument("--guidance", default="cfg:scale=5")
    p.add_argument("--sampler", default=None)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="the prompt set's seed (1: other images)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="interleaved timing rounds; 0 scores only (for a re-measure of quality on a busy "
        "machine)",
    )
    p.add_argument("--timing-images", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args()
    if args.quick:
        args.n, args.steps, args.repeats, args.timing_images = 1, 4, 1, 2
    if args.repeats < 0:
        p.error(f"--repeats must be >= 0, got {args.repeats}")
    judge, (gp,), prompts = toy_setup([args.model], args.quick)
    unet = hasattr(gp.family.net, "down_blocks")
    specs = args.caches.split(";") if args.caches else (UNET if unet else TRANSFORMER)
    specs = [s.format(magcache=_magcache(gp, args)) if "{" in s else s for s in specs]
    _, sampler = gp.resolve(args.guidance, None, args.sampler)
    common = dict(guidance=args.guidance, sampler=sampler, steps=args.steps)
    base = scored(gp, judge, prompts, args.n, **common, seed=args.seed)
    rows = [{"cache": "none", **_public(base)}]
    for spec in specs:
        res = scored(gp, judge, prompts, args.n, **common, cache=spec, seed=args.seed)
        rows.append(
            {
                "cache": spec,
                **_public(res),
                "vs_none": paired(base["adherent"], res["adherent"]),
            }
        )

    def call(spec):
        return lambda: gp(
            prompts[0],
            **common,
            num_images_per_prompt=args.timing_images,
            seed=0,
            output_type="latent",
            progress=False,
            **({"cache": spec} if spec else {}),
        )

    fns = {"none": call(None), **{s: call(s) for s in specs}}
    times = interleaved(fns, args.repeats) if args.repeats else {}
    for row in rows[1:] if args.repeats else ():
        t = times[row["cache"]]
        row["speedup_cpu"] = ratio_summary(times["none"]["cpu"], t["cpu"])
        row["speedup_wall"] = ratio_summary(times["none"]["wall"], t["wall"])
    result = {
        "model": args.model,
        "guidance": args.guidance,
        "sampler": str(sampler.name),
        "steps": args.steps,
        "images_per_prompt": args.n,
        "prompts": len(prompts),
        "seed": args.seed,
        "timing": {"images": args.timing_images, "rounds": args.repeats},
        "rows": rows,
    }
    emit(result, args.out)
    if args.md:
        _table(result, args.md)


def _magcache(gp, args) -> str:
    from diffguide.evaluate.tune import tune_cache
    from diffguide.toy import metrics

    prompts = list(metrics.DEFAULT_PROMPTS[:3] if args.quick else metrics.DEFAULT_PROMPTS)
    res = tune_cache(gp, prompts, 1, 1, args.sampler, args.steps, 5.0, 0.5)
    return res["cache"]


def _public(res: dict) -> dict:
    keep = (
        "adherence",
        "adherence_se",
        "frechet_distance",
        "colour_error",
        "nfe_per_image",
        "cache_computed",
    )
    return {k: res[k] for k in keep if k in res}


def _table(result: dict, path: str) -> None:
    lines = [
        f"{result['model']}, {result['guidance']}, {result['sampler']}, {result['steps']} steps, "
        f"{result['images_per_prompt']} images x {result['prompts']} prompts",
        "",
        "| cache | work run | adherence | vs none (paired) | FD | colour error | CPU-time speedup "
        "(median [q25, q75]) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        vs = r.get("vs_none")
        sp = r.get("speedup_cpu")
        lines.append(
            f"| {r['cache']} | {r.get('cache_computed', 1.0):.2f} | {r['adherence']:.3f} ± "
            f"{r['adherence_se']:.3f} | "
            + (f"{vs['difference']:+.3f} (p {vs['p_value']:.2f})" if vs else "-")
            + f" | {r.get('frechet_distance', float('nan')):.1f}"
            + f" | {r.get('colour_error', float('nan')):.3f} | "
            + (f"{sp['median']:.2f}x [{sp['q25']:.2f}, {sp['q75']:.2f}]" if sp else "-")
            + " |"
        )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    tempfile.tempdir = tempfile.gettempdir()
    main()
