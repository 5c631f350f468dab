"""Metrics on the toy world: prompt adherence, Frechet distance, colour fidelity, diversity.

Generated images are read by the evaluator CNN; true images for the same prompts come from the
world's exact generator, so every number has a reference: true images score adherence about 1,
Frechet distance about 0, colour error about the generator's own jitter.
"""

from __future__ import annotations

import collections
import colorsys
import itertools

import numpy as np
import torch

from . import count as objects_count
from . import evaluator as ev
from . import scenes

DEFAULT_PROMPTS = [
    # one object, every attribute given
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
    "a blue cross on a gray background",
    "a purple diamond on a white background",
    "an orange circle on a black background",
    "a red square on a gray background",
    "a yellow cross on a blue background",
    # one object, some attributes free
    "a blue triangle",
    "a green circle",
    "a square on a black background",
    "a diamond",
    # two objects
    "a red circle and a blue square",
    "a yellow triangle and a green cross on a black background",
    "an orange square and a purple circle",
    "a blue diamond and a red triangle on a white background",
    "a green square and a yellow circle",
    "a purple cross and an orange diamond on a gray background",
    # colour-shape pairs never seen in training
    "a purple triangle on a white background",
    "an orange cross on a blue background",
    "a green diamond on a black background",
]


def group(p: scenes.Prompt) -> str:
    if any(pair in scenes.HELD_OUT for pair in p.objects):
        return "held_out"
    return "single" if len(p.objects) == 1 else "two"


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                scenes.parse_prompt(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            out.append(line)
    if not out:
        raise ValueError(f"{path} has no prompts (one per line, # for comments)")
    return out


def counted_right(p: scenes.Prompt, counts: dict) -> bool:
    """Whether the objects counted per colour are exactly the prompted ones: as many as prompted,
    each named colour as often as named, and no other colour twice (a scene's colours differ)."""
    named = collections.Counter(c for c, _ in p.objects if c is not None)
    return (
        sum(counts.values()) == len(p.objects)
        and all(counts.get(c, 0) == k for c, k in named.items())
        and all(n <= max(1, named[c]) for c, n in counts.items())
    )


def check(p: scenes.Prompt, present: set, background: str, counts: dict | None = None) -> dict:
    """Which prompted attributes an image gets right. Objects must match with colour and shape bound
    together (each prompted object to a distinct detected one), and the object count must match.

    ``counts`` ({colour: objects}, from ``count.counts``) is what the image shows; the evaluator
    CNN's ``present`` names each colour once whatever it sees, so without counts a duplicated
    object (two blue squares for "a red circle and a blue square") would pass. Default: one object
    per pair in ``present`` (right for a scene's exact labels)."""
    found = list(present)
    if counts is None:
        counts = collections.Counter(c for c, _ in found)
    colour = all(any(c is None or c == fc for fc, _ in found) for c, _ in p.objects)
    shape = all(any(s is None or s == fs for _, fs in found) for _, s in p.objects)
    bound = (
        any(
            all(
                (c is None or c == fc) and (s is None or s == fs)
                for (c, s), (fc, fs) in zip(p.objects, perm)
            )
            for perm in itertools.permutations(found, len(p.objects))
        )
        if len(found) >= len(p.objects)
        else False
    )
    out = {
        # both readers: the CNN's pairs (an extra colour-shape pair it reads stays wrong) and the
        # counter's objects (a duplicate the CNN cannot see)
        "count": len(found) == len(p.objects) and counted_right(p, counts),
        "colour": colour,
        "shape": shape,
        "binding": bound,
    }
    if p.background is not None:
        out["background"] = background == p.background
    out["all"] = all(out.values())
    return out


def frechet(f1: np.ndarray, f2: np.ndarray) -> float | None:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula); None when
    either set has fewer than two samples (no covariance to fit)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if min(len(f1), len(f2)) < 2:
        return None
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(c1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(r1 @ c2 @ r1)  # tr sqrt(C1^1/2 C2 C1^1/2) = tr sqrt(C1 C2)
    return float(
        ((m1 - m2) ** 2).sum()
        + np.trace(c1)
        + np.trace(c2)
        - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    )


def object_colour(
    img: np.ndarray, min_distance: float = 0.25
) -> tuple[np.ndarray | None, np.ndarray]:
    """(mean colour of the pixels far from the background, background colour) of an [H, W, 3] image
    in [0, 1]; the background is the median of the border pixels (objects never touch the
    border)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    far = dist > min_distance
    if far.sum() < 4:
        return None, bg
    core = far & (
        dist >= np.median(dist[far])
    )  # the inner half: anti-aliased edges mix in background
    return img[core].mean(0), bg


def colour_fidelity(images: np.ndarray, prompts: list) -> dict:
    """Single-object prompts with a colour: RGB distance of the object's mean colour to the true
    one,
    and the signed HSV saturation difference (positive = oversaturated); background distance where
    the prompt names one."""
    errs, sats, bgs = [], [], []
    for img, p in zip(images, prompts):
        if len(p.objects) != 1:
            continue
        col, bg = object_colour(img)
        c = p.objects[0][0]
        if c is not None and col is not None:
            true = np.asarray(scenes.COLOURS[c]) / 255
            errs.append(float(np.linalg.norm(col - true)))
            sats.append(colorsys.rgb_to_hsv(*col)[1] - colorsys.rgb_to_hsv(*true)[1])
        if p.background is not None:
            bgs.append(
                float(np.linalg.norm(bg - np.asarray(scenes.BACKGROUNDS[p.background]) / 255))
            )
    mean = lambda v: float(np.mean(v)) if v else None
    return {
        "colour_error": mean(errs),
        "saturation_error": mean(sats),
        "background_error": mean(bgs),
        "objects_measured": len(errs),
    }


def _diversity(feats: np.ndarray, ids: np.ndarray) -> float | None:
    """Mean pairwise feature distance between images of the same prompt, averaged over prompts; None
    when no prompt has two images."""
    vals = []
    for k in np.unique(ids):
        f = feats[ids == k]
        if len(f) > 1:
            d = np.linalg.norm(f[:, None] - f[None], axis=-1)
            vals.append(d[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(vals)) if vals else None


def evaluate(
    images: np.ndarray,
    prompt_ids: np.ndarray,
    prompts: list[str],
    model: ev.Evaluator,
    true_images: np.ndarray | None = None,
    true_ids: np.ndarray | None = None,
    per_image: list | None = None,
) -> dict:
    """Every metric for images [N, 32, 32, 3] in [0, 1], image i made for prompts[prompt_ids[i]].

    true_images default to as many exact samples per prompt as there are generated ones. A
    ``per_image`` list gets one record per image: its prompt, what the evaluator read (objects as
    [colour, shape], background), the objects counted per colour and which prompted attributes it
    got right.
    """
    parsed = [scenes.parse_prompt(t) for t in prompts]
    prompt_ids = np.asarray(prompt_ids)
    if true_images is None:
        true_list, true_ids = [], []
        for k, p in enumerate(parsed):
            n = int((prompt_ids == k).sum())
            if n:
                true_list.append(scenes.sample_for_prompt(p, n, seed=1000 + k)[0])
                true_ids += [k] * n
        true_images, true_ids = np.concatenate(true_list), np.asarray(true_ids)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(0, 3, 1, 2)
    present, backs, feats = ev.read(model, to_t(images))
    _, _, true_feats = ev.read(model, to_t(true_images))
    feats, true_feats = feats.numpy(), true_feats.numpy()

    counts = objects_count.counts(images)
    checks = [
        check(parsed[k], pr, bg, n) for k, pr, bg, n in zip(prompt_ids, present, backs, counts)
    ]
    if per_image is not None:
        per_image.extend(
            {
                "prompt": prompts[k],
                "objects": sorted([c, s] for c, s in pr),
                "background": bg,
                "counted": n,
                "adherent": c["all"],
                "checks": {a: v for a, v in c.items() if a != "all"},
            }
            for k, pr, bg, n, c in zip(prompt_ids, present, backs, counts, checks)
        )
    groups = {}
    for k, c in zip(prompt_ids, checks):
        groups.setdefault(group(parsed[k]), []).append(c["all"])
    attrs = {}
    for c in checks:
        for key, v in c.items():
            if key != "all":
                attrs.setdefault(key, []).append(v)
    fd, diversity = frechet(feats, true_feats), _diversity(feats, prompt_ids)
    undefined = {}  # statistics a small run cannot give: null, with the reason
    if fd is None:
        undefined["frechet_distance_undefined"] = f"needs at least 2 images, got {len(feats)}"
    if diversity is None:
        undefined["diversity_undefined"] = "needs at least 2 images of one prompt"
    per_prompt = {}
    for k, text in enumerate(prompts):
        sel = [c["all"] for i, c in zip(prompt_ids, checks) if i == k]
        if sel:
            per_prompt[text] = float(np.mean(sel))
    return {
        "images": int(len(images)),
        "adherence": float(np.mean([c["all"] for c in checks])),
        "adherence_by_group": {g: float(np.mean(v)) for g, v in sorted(groups.items())},
        "attribute_accuracy": {k: float(np.mean(v)) for k, v in sorted(attrs.items())},
        "frechet_distance": fd,
        **colour_fidelity(images, [parsed[k] for k in prompt_ids]),
        **{
            f"true_{k}": v
            for k, v in colour_fidelity(true_images, [parsed[k] for k in true_ids]).items()
            if k != "objects_measured"
        },
        "diversity": diversity,
        "true_diversity": _diversity(true_feats, np.asarray(true_ids)),
        "adherence_by_prompt": per_prompt,
        **undefined,
    }
