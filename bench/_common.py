"""Bench scripts reuse the measuring code the tests use (tests/helpers.py)."""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, out)


def line_plot(path: str, xs, series: dict, xlabel: str, title: str = "") -> None:
    """A small PNG line plot with PIL (no plotting library needed): one line per series, each
    scaled to its own [min, max] and labelled with it."""
    from PIL import Image, ImageDraw

    w, h, m = 520, 300, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, w - m, h - m], outline="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    x0, x1 = min(xs), max(xs)
    for k, (name, ys) in enumerate(series.items()):
        lo, hi = min(ys), max(ys)
        span = (hi - lo) or 1.0
        pts = [
            (m + (x - x0) / ((x1 - x0) or 1) * (w - 2 * m), h - m - (y - lo) / span * (h - 2 * m))
            for x, y in zip(xs, ys)
        ]
        d.line(pts, fill=colours[k % 4], width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colours[k % 4])
        d.text((m + 5, m + 5 + 14 * k), f"{name}: {lo:.3g} .. {hi:.3g}", fill=colours[k % 4])
    d.text((w // 2 - 60, h - m + 12), f"{xlabel}: {x0:g} .. {x1:g}", fill="black")
    if title:
        d.text((m, 12), title, fill="black")
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def toy_setup(models, quick: bool = False):
    """Quiet loading; (evaluator, pipelines for ``models``, prompt set: 3 prompts when quick)."""
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines.pipeline import quiet_loading
    from diffguide.toy import evaluator, metrics

    quiet_loading()
    pipes = [GuidedPipeline.from_pretrained(m, progress=False) for m in models]
    return (
        evaluator.load(),
        pipes,
        list(metrics.DEFAULT_PROMPTS[:3] if quick else metrics.DEFAULT_PROMPTS),
    )


def scored(
    gp,
    judge,
    prompts,
    n,
    guidance,
    sampler,
    steps,
    stitch=None,
    seed=0,
    noise=None,
    guide_model=None,
    spacing=None,
    cache=None,
) -> dict:
    """NFE, seconds per image and the toy-world metrics (without the per-prompt breakdown); with a
    noise optimiser also its extra NFE, backward passes and seconds per image; with a step cache
    the share of the network's work it ran (``cache_computed``)."""
    from diffguide.evaluate import prompt_set
    from diffguide.toy import metrics

    costs, per_image = {}, []
    images, ids, nfe, seconds = prompt_set(
        gp,
        prompts,
        n,
        seed,
        guidance,
        sampler,
        steps,
        spacing=spacing,
        stitch=stitch,
        noise=noise,
        costs=costs,
        guide_model=guide_model,
        cache=cache,
    )
    res = metrics.evaluate(images, ids, prompts, judge, per_image=per_image)
    res.pop("adherence_by_prompt")
    m = len(per_image)
    p = res["adherence"]
    return {
        "nfe_per_image": float(nfe),
        "seconds_per_image": round(seconds, 4),
        **(costs if noise or cache else {}),
        **res,
        "adherence_se": round((p * (1 - p) / m) ** 0.5, 4),
        "adherent": [int(r["adherent"]) for r in per_image],
    }


def paired(a: list, b: list) -> dict:
    """Adherence of b minus a on the same images (same prompts and seeds), with the discordant
    counts and a two-sided exact sign-test p-value (McNemar)."""
    from math import comb

    worse = sum(1 for x, y in zip(a, b) if x and not y)
    better = sum(1 for x, y in zip(a, b) if y and not x)
    k, n = min(worse, better), worse + better
    pval = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {
        "difference": round((better - worse) / len(a), 4),
        "better": better,
        "worse": worse,
        "p_value": round(pval, 4),
    }


def interleaved(fns: dict, repeats: int) -> dict:
    """Wall and process CPU seconds of each candidate, one run of each per round after a warm-up of
    each, so that drifting machine load hits them alike: {name: {"wall": [...], "cpu": [...]}}."""
    for fn in fns.values():
        fn()
    rec = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            rec[k]["wall"].append(time.perf_counter() - t)
            rec[k]["cpu"].append(time.process_time() - c)
    return rec


def ratio_summary(a: list, b: list) -> dict:
    """The median of the per-round ratios a_i / b_i, with their quartiles and extremes."""
    r = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return {
        "median": round(statistics.median(r), 4),
        "q25": round(q[0], 4),
        "q75": round(q[2], 4),
        "min": round(r[0], 4),
        "max": round(r[-1], 4),
        "rounds": len(r),
    }
