"""Evaluation as a library: prompt sets generated on one process or split across several, scored on
the toy world, laid out as grids; LinearAG calibration on recorded trajectories. ``diffguide eval``,
``compare`` and ``calibrate-linearag``, the bench scripts and the distillation trainer call it.
"""

from __future__ import annotations

import time

import numpy as np

from ..parallel import barrier, gather, shard


def prompt_seeds(seed: int, k: int, n: int) -> list[int]:
    """The seeds of prompt k's n images in a prompt set (distinct across prompts)."""
    return [seed * 100_000 + k * 1000 + j for j in range(n)]


def generate(
    gp,
    prompt: str,
    seeds: list,
    guidance,
    sampler,
    steps: int,
    spacing=None,
    stitch=None,
    noise=None,
    embedded_guidance=None,
    guide_model=None,
    cache=None,
) -> tuple[np.ndarray, dict]:
    """One batch: images [len(seeds), H, W, 3] in [0, 1] for one prompt and what they cost per image
    (NFE of sampling; a noise optimiser's NFE, backward passes and seconds). ``embedded_guidance``:
    the value of the model's own guidance input (Flux.1-dev, LCM students), default the model's;
    ``guide_model``: AutoGuidance's weaker model; ``cache``: a step cache (its cost is the share
    of the network's block evaluations that ran, ``computed``)."""
    res = gp(
        prompt,
        guidance=guidance,
        sampler=sampler,
        steps=steps,
        spacing=spacing,
        num_images_per_prompt=len(seeds),
        seed=list(seeds),
        output_type="np",
        progress=False,
        stitch=stitch,
        noise_optimizer=noise,
        embedded_guidance=embedded_guidance,
        guide_model=guide_model,
        **({"cache": cache} if cache is not None else {}),
    )
    cost = {"nfe": float(res.nfe)}
    if res.computed is not None:
        cost["computed"] = res.computed
    if res.noise:
        cost.update(
            noise_nfe=float(res.noise["nfe"]),
            noise_backward=float(res.noise["backward"]),
            noise_seconds=res.timings["noise"] / len(seeds),
        )
    return res.images, cost


def prompt_set(
    gp,
    prompts: list[str],
    n: int,
    seed: int,
    guidance,
    sampler,
    steps: int,
    spacing=None,
    batch: int = 32,
    stitch=None,
    noise=None,
    costs: dict | None = None,
    embedded_guidance=None,
    process_state=None,
    guide_model=None,
    on_batch=None,
    cache=None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """n images per prompt (seeds from ``prompt_seeds``): images, prompt index per image, NFE per
    image (the mean over every image) and wall seconds per image. ``costs``, if given, gets a noise
    optimiser's extra NFE, backward passes and seconds per image, and a step ``cache``'s share of
    block evaluations computed (``cache_computed``). ``on_batch(done, left)``, if
    given,
    is called once, after this process's first batch, with its image counts (for a time estimate).

    With ``process_state`` (accelerate's PartialState) the batches are shared between processes
    and every process returns the whole set, in the same order and with the same images as one
    process makes."""
    units = [
        (k, chunk)
        for k in range(len(prompts))
        for s in [prompt_seeds(seed, k, n)]
        for chunk in (s[i : i + batch] for i in range(0, n, batch))
    ]
    t0 = time.perf_counter()
    mine = []
    share = shard(units, process_state)
    for i, (k, chunk) in enumerate(share):
        mine.append(
            (
                k,
                chunk,
                *generate(
                    gp,
                    prompts[k],
                    chunk,
                    guidance,
                    sampler,
                    steps,
                    spacing,
                    stitch,
                    noise,
                    embedded_guidance,
                    guide_model,
                    cache,
                ),
            )
        )
        if i == 0 and on_batch is not None and len(share) > 1:
            on_batch(len(chunk), sum(len(c) for _, c in share[1:]))
    done = gather(mine, process_state)
    barrier(process_state)
    seconds = time.perf_counter() - t0
    images = np.concatenate([imgs for _, _, imgs, _ in done])
    ids = np.concatenate([np.full(len(chunk), k) for k, chunk, _, _ in done])
    m = len(images)
    total: dict = {}
    for _, chunk, _, cost in done:
        for key, v in cost.items():
            total[key] = total.get(key, 0.0) + v * len(chunk)
    if costs is not None and "noise_nfe" in total:
        costs.update(
            noise_nfe_per_image=total["noise_nfe"] / m,
            noise_backward_per_image=total["noise_backward"] / m,
            noise_seconds_per_image=round(total["noise_seconds"] / m, 4),
        )
    if costs is not None and "computed" in total:
        costs["cache_computed"] = round(total["computed"] / m, 4)
    return images, ids, total["nfe"] / m, seconds / m


def grid(rows: list[np.ndarray], labels: list[str] | None = None, scale: int = 2):
    """A PIL image: one row of images per entry, each [n, H, W, 3] in [0, 1], labels on the left."""
    from PIL import Image, ImageDraw

    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    cols = max(len(r) for r in rows)
    pad = 2
    label_w = 0 if not labels else 8 + 6 * max(len(t) for t in labels)
    canvas = Image.new(
        "RGB", (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, imgs in enumerate(rows):
        y = pad + r * (h + pad)
        if labels:
            draw.text((4, y + h // 2 - 5), labels[r], fill="black")
        for c, img in enumerate(imgs):
            tile = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype("uint8"))
            canvas.paste(tile.resize((w, h), Image.NEAREST), (label_w + pad + c * (w + pad), y))
    return canvas


def record(
    gp, prompts: list[str], n: int, seed: int, sampler, steps: int, scale: float, spacing=None
) -> list:
    """CFG trajectories: per prompt, the list of (x, c x0, u x0) of every evaluation (n images each,
    prompt_set's seeds)."""
    from ..guidance.linear_ag import Recorder

    runs = []
    for k, text in enumerate(prompts):
        rec = Recorder(scale=scale)
        gp(
            text,
            guidance=rec,
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            num_images_per_prompt=n,
            seed=prompt_seeds(seed, k, n),
            output_type="latent",
            progress=False,
        )
        runs.append(rec.sink)
    return runs


def calibrate_linear_ag(
    gp, prompts: list[str], n: int, seed: int, sampler, steps: int, scale: float, spacing=None
) -> list:
    """LinearAG coefficients fitted on CFG trajectories of n images per prompt (prompt_set's
    seeds)."""
    from ..guidance.linear_ag import fit

    return fit(record(gp, prompts, n, seed, sampler, steps, scale, spacing))
