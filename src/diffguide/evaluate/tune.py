"""``diffguide tune``: a guidance method's hyperparameters for one model from a few probe runs.

The probe records CFG trajectories (x, conditional x0, unconditional x0 at every evaluation) on a
prompt set; each method's choice is read off them:
- ag: the highest cosine threshold whose switch points give at most ``target_nfe`` of CFG's NFE.
  Before its switch AG *is* CFG, so the switch points, and the NFE, are exact, not estimates.
- apg: the norm threshold (per-value RMS) at a quantile of the probe's update norms (momentum
  applied as APG applies it); on a built-in model the toy-world evaluator also picks eta, momentum
  and the quantile from a small grid by adherence (ties: the lower saturation error).
- linear_ag: LinearAG's least-squares coefficients.
The result is a spec file that ``--guidance @FILE`` (or ``parse_spec("guidance", "@FILE")``) loads.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..files import write_text
from . import prompt_set, record

METHODS = ("ag", "apg", "linear_ag")
CACHES = ("cache",)  # diffguide tune cache: MagCache's ratios and threshold


def ag_threshold(runs: list, target_nfe: float) -> tuple[float, dict]:
    """The highest threshold on AG's default measure (the correlation of the x0 predictions) whose
    per-image switch points give mean NFE <= target_nfe x CFG's (AG evaluates the unconditional
    branch up to and including its switch evaluation)."""
    cos = []
    for run in runs:
        c = torch.stack([ci.flatten(1) for _, ci, _ in run])  # [evals, n, values]
        u = torch.stack([ui.flatten(1) for _, _, ui in run])
        c, u = c - c.mean(2, keepdim=True), u - u.mean(2, keepdim=True)
        cos.append(torch.nn.functional.cosine_similarity(c, u, dim=2).T.numpy())  # [n, evals]
    cos = np.concatenate(cos)
    evals = cos.shape[1]

    def nfe(th: float) -> float:
        hit = cos >= th
        first = np.where(hit.any(1), hit.argmax(1), evals - 1)
        return float(np.mean(evals + first + 1)) / (2 * evals)

    # thresholds at the observed values, rounded down so that the 6-digit spec switches where they
    # do
    candidates = np.unique(np.floor(cos * 1e6) / 1e6)[::-1]
    chosen = next((float(th) for th in candidates if nfe(th) <= target_nfe), float(candidates[-1]))
    return chosen, {
        "images": int(cos.shape[0]),
        "nfe_fraction": round(nfe(chosen), 6),
        "nfe_per_image": round(nfe(chosen) * 2 * evals, 3),
        "cfg_nfe_per_image": 2 * evals,
        "target_met": nfe(chosen) <= target_nfe,
    }


def apg_norms(runs: list, momentum: float) -> np.ndarray:
    """Per-value RMS of APG's accumulated difference (x0 space) at every evaluation of every
    image."""
    out = []
    for run in runs:
        buf = None
        for _, c, u in run:
            d = (c - u).flatten(1)
            if momentum != 0:
                d = d if buf is None else d + momentum * buf
                buf = d
            out.append((d.norm(dim=1) / d.shape[1] ** 0.5).numpy())
    return np.concatenate(out)


def tune(
    gp,
    method: str,
    prompts: list[str],
    n: int = 2,
    seed: int = 1,
    sampler=None,
    steps: int = 25,
    scale: float = 5.0,
    target_nfe: float = 0.75,
    quantile: float = 0.5,
    spacing=None,
) -> dict:
    """The tuned spec and what it was read from, as written to the spec file."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} to tune; choose one of: {', '.join(METHODS)}")
    if not 0 < target_nfe <= 1:
        raise ValueError(f"target NFE fraction must be in (0, 1], got {target_nfe!r}")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    from ..core.registry import to_spec

    _, sampler = gp.resolve("none", None, sampler)
    runs = record(gp, prompts, n, seed, sampler, steps, scale, spacing)
    probe = {
        "prompts": len(prompts),
        "images_per_prompt": n,
        "seed": seed,
        "steps": steps,
        "sampler": to_spec(sampler),
        "scale": scale,
    }
    if method == "ag":
        th, stats = ag_threshold(runs, target_nfe)
        return {
            "guidance": f"ag:scale={scale:g},threshold={th:.6f}",
            "probe": {**probe, "target_nfe": target_nfe, **stats},
        }
    if method == "linear_ag":
        from ..guidance.linear_ag import fit

        return {
            "guidance": f"linear_ag:scale={scale:g},coefficients=@self",
            "coefficients": fit(runs),
            "features": ["c", "u_prev", "c_prev", "x"],
            "probe": probe,
        }
    return _tune_apg(gp, runs, probe, prompts, n, seed, sampler, steps, scale, quantile, spacing)


def _tune_apg(gp, runs, probe, prompts, n, seed, sampler, steps, scale, quantile, spacing) -> dict:
    """The quantile rule, or on a built-in (toy-world) model a small grid scored by the
    evaluator."""
    from ..core.registry import to_spec
    from ..guidance.apg import APG

    if not gp.builtin:
        th = float(np.quantile(apg_norms(runs, -0.5), quantile))
        return {
            "guidance": f"apg:scale={scale:g},norm_threshold={th:.5f}",
            "probe": {**probe, "quantile": quantile, "rule": "quantile of the update norms"},
        }
    from ..toy import evaluator, metrics

    judge, rows = evaluator.load(), []
    for eta in (0.0, 1.0):
        for momentum in (-0.5, 0.0):
            norms = apg_norms(runs, momentum)
            for q in (0.25, 0.5, 0.75):
                g = APG(
                    scale=scale,
                    eta=eta,
                    momentum=momentum,
                    norm_threshold=round(float(np.quantile(norms, q)), 5),
                )
                images, ids, _, _ = prompt_set(gp, prompts, n, seed, g, sampler, steps, spacing)
                res = metrics.evaluate(images, ids, prompts, judge)
                rows.append(
                    {
                        "guidance": to_spec(g),
                        "adherence": res["adherence"],
                        "saturation_error": res["saturation_error"],
                        "quantile": q,
                    }
                )
    best = max(rows, key=lambda r: (r["adherence"], -abs(r["saturation_error"] or 0)))
    return {
        "guidance": best["guidance"],
        "probe": {**probe, "rule": "evaluator grid", "grid": rows},
    }


def tune_cache(
    gp,
    prompts: list[str],
    n: int = 2,
    seed: int = 1,
    sampler=None,
    steps: int = 25,
    scale: float = 5.0,
    target: float = 0.5,
    spacing=None,
    guidance=None,
) -> dict:
    """MagCache for this model: its ratios calibrated on CFG runs of the probe prompts (the mean
    over runs of the conditional branch's), and the lowest threshold whose decisions run at most
    ``target`` of the forwards (exact: they depend on the step only)."""
    from ..cache.magcache import Calibration, MagCache, share
    from ..core.registry import to_spec

    if not 0 < target <= 1:
        raise ValueError(f"target share of the work must be in (0, 1], got {target!r}")
    guidance = guidance or f"cfg:scale={scale:g}"
    _, sampler = gp.resolve("none", None, sampler)
    calibration = Calibration()
    prompt_set(gp, prompts, n, seed, guidance, sampler, steps, spacing, cache=calibration)
    tables = {}
    for run in calibration.sink:
        for branch, ratios in run.items():
            tables.setdefault(branch, []).append(ratios)
    means = {b: np.mean(np.array(t), axis=0).round(5).tolist() for b, t in tables.items()}
    ratios = tuple(means.get("pos", next(iter(means.values()))))
    defaults = MagCache("1")
    errors = sorted({0.0} | _errors(ratios, defaults.retention, len(ratios)))
    th = next(
        (
            e
            for e in errors
            if share(ratios, len(ratios), e, defaults.max_skip, defaults.retention) <= target
        ),
        errors[-1],
    )
    spec = f"magcache:ratios={';'.join(f'{r:g}' for r in ratios)},threshold={th:.6g}"
    return {
        "cache": spec,
        "probe": {
            "prompts": len(prompts),
            "images_per_prompt": n,
            "seed": seed,
            "steps": steps,
            "sampler": to_spec(sampler),
            "guidance": guidance if isinstance(guidance, str) else to_spec(guidance),
            "target": target,
            "computed": share(ratios, len(ratios), th, defaults.max_skip, defaults.retention),
            "ratios_per_branch": means,
        },
    }


def _errors(ratios: tuple, retention: float, n: int) -> set:
    """Every accumulated error MagCache can meet on these ratios (the thresholds that differ)."""
    out = set()
    start = int(retention * n + 0.5)
    for i in range(start, n):
        ratio, err = 1.0, 0.0
        for j in range(i, n):
            ratio *= ratios[j]
            err += abs(1.0 - ratio)
            out.add(round(err, 9))
    return out


def write(
    result: dict, path: str, model: str, overwrite: bool = True, kind: str = "guidance"
) -> str:
    """The spec file (written aside, then given its name: only if no file has it, unless
    ``overwrite``); a LinearAG file is its own coefficients file."""
    from .. import __version__

    data = {**result, "model": model, "version": __version__}
    data[kind] = data[kind].replace("@self", os.path.abspath(path))
    write_text(path, json.dumps(data, indent=1), overwrite)
    return data[kind]
