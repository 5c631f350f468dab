"""Convergence orders of every deterministic sampler on the exact Gaussian-mixture denoiser.

The error is the largest one at sigma_lo (VE), against scipy's DOP853 solution of the probability-
flow ODE in VE coordinates (rtol 1e-13; ``helpers.ode_reference``), on logSNR-uniform grids that end
at sigma_lo; the order is minus the least-squares slope of log(error), first point excluded.

- ``ranges``: SD's VP schedule, versus NFE at 20..640 evaluations, for the diffusers-family samplers
  over VE 2 -> 0.05 and over SD's whole range (the figures README.md quotes).
- ``orders``: every ODE sampler of the registry (stochastic ones with eta = 0) on a VP schedule
  (SD1.x) and on a flow schedule (shift 3), VE 2 -> 0.05 on both (the same ODE solution: the flow's
  x / alpha follows the VE path), versus steps 8..128. dpm_fast at steps = 3k + 2 (its third-order
  budgets) and 3k (second order: its plan ends with orders 2, 1); dpm_adaptive versus its NFE as
  rtol falls (atol = rtol * 0.156, the default ratio).

    python bench/convergence.py [--out FILE] [--md FILE] [--quick]
"""

import argparse
import math
import os

import torch

from _common import emit

import diffguide as dg
from helpers import convergence_errors, fitted_order, ode_reference

SPECS = [
    "ddim",
    "euler",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m:solver_type=heun",
    "dpmpp_2s",
    "dpmpp_3m",
    "dpmpp_3m:warmup=lower_order",
    "dpmpp_3m_published",
    "unipc",
    "unipc:lower_order_final=False",
    "unipc:solver_type=bh1,lower_order_final=False",
    "unipc:order=3,lower_order_final=False",
    "deis",
    "deis:order=3",
    "lms",
    "dpm2",
    "plms",
    "ipndm",
]

# ``orders``: spec -> (nominal order, what its measured order should be read against)
STEPS = [8, 16, 32, 64, 128]
ODE = {
    "euler": (1, ""),
    "ddim": (1, ""),
    "heun": (2, ""),
    "dpm2": (2, ""),
    "dpmpp_2m": (2, ""),
    "dpmpp_2m:solver_type=heun": (2, ""),
    "dpmpp_2s": (2, ""),
    "dpmpp_2s_singlestep": (2, ""),
    "dpmpp_3m": (3, ""),
    "dpmpp_3m_published": (3, "its d2 term is half the third-order one: second order (README)"),
    "unipc": (
        3,
        "diffusers' lower_order_final makes every last step first order: 2 on a grid "
        "that ends above data",
    ),
    "unipc:lower_order_final=False": (3, ""),
    "unipc:order=3,lower_order_final=False": (4, "UniP-3 + UniC: still rising at these steps"),
    "deis": (2, ""),
    "deis:order=3": (3, "starts at first order, as diffusers' DEIS: capped at 2 on this range"),
    "lms": (4, "starts at first order, as k-diffusion's LMS: capped at 2 on this range"),
    "plms": (
        4,
        "equal-step Adams weights; the VE steps of a logSNR grid are geometric: capped at "
        "2 (4.3 on a grid uniform in VE)",
    ),
    "ipndm": (4, "as plms: capped at 2 on a logSNR grid (4.3 on a grid uniform in VE)"),
    "res_multistep": (2, ""),
    "gradient_estimation": (
        1,
        "Euler plus (gamma - 1) times the change of slope: first order, slowly approached",
    ),
    "heunpp2": (
        2,
        "ComfyUI weights Heun's extra slopes by sigma / sigma_max, so they fade as the "
        "level falls and the steps become Euler steps: first order",
    ),
    "exp_heun_2_x0": (2, ""),
    "seeds_2:eta=0": (2, ""),
    "seeds_3:eta=0": (3, ""),
    "sa_solver:eta=0": (
        4,
        "predictor 3 + corrector 4, but ComfyUI lowers the orders over the "
        "grid's last steps (it assumes the grid ends at data): 3 (2 without the "
        "corrector)",
    ),
    "sa_solver_pece:eta=0": (4, "as sa_solver"),
    "dpm_fast": (3, "steps = 3k + 2: orders 3, ..., 3, 2"),
    "dpm_fast@3k": (2, "steps = 3k: the plan ends with orders 2, 1"),
    "dpm_adaptive": (3, "versus NFE as rtol falls (0.01 .. 8e-5)"),
}
FAST_3K2 = [8, 17, 32, 65, 128]  # 3k + 2
FAST_3K = [9, 18, 33, 66, 129]
RTOLS = [0.05, 0.01, 0.002, 4e-4, 8e-5]


def _schedules():
    sd = dg.VPSchedule.from_betas()
    flow = dg.FlowSchedule(shift=3.0)
    return {"vp (SD1.x)": sd, "flow (shift 3)": flow}


def _problem(gm, hi: float, lo: float):
    """(y0, labels, yref): 16 starting points (seed 0, labels 0..3) in VE coordinates at level hi
    and the probability-flow ODE's solution from them at lo."""
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(16, 2, dtype=torch.float64, generator=g) * math.sqrt(1 + hi**2)
    labels = torch.arange(16) % 4
    return y0, labels, ode_reference(gm, y0, hi, lo, labels)


def _runs(spec: str, quick: bool):
    """(spec, steps) pairs measured for a sampler, and what the fit is against."""
    if spec == "dpm_adaptive":
        rtols = RTOLS[:3] if quick else RTOLS
        return [(f"dpm_adaptive:rtol={r},atol={r * 0.156:.3g}", 1) for r in rtols], "nfe"
    steps = {"dpm_fast": FAST_3K2, "dpm_fast@3k": FAST_3K}.get(spec, STEPS)
    return [(spec.split("@")[0], n) for n in (steps[:3] if quick else steps)], "steps"


def measure(spec, gm, y0, labels, yref, hi, lo, quick=False) -> dict:
    """Errors, NFEs and the fitted order (first point excluded) of one sampler on one schedule."""
    runs, against = _runs(spec, quick)
    errs, nfes, steps = [], [], []
    for s, n in runs:
        (err,), (nfe,) = convergence_errors(s, gm, y0, labels, yref, [n], hi, lo)
        errs.append(err)
        nfes.append(nfe)
        steps.append(n)
    xs = nfes if against == "nfe" else steps
    return {
        "order": round(fitted_order(errs[1:], xs[1:]), 3),
        "against": against,
        "steps": steps if against == "steps" else None,
        "nfe": nfes,
        "max_error": [float(f"{e:.3e}") for e in errs],
        "local_orders": [
            round(-math.log(errs[i + 1] / errs[i]) / math.log(xs[i + 1] / xs[i]), 2)
            for i in range(len(errs) - 1)
        ],
    }


def orders(quick: bool = False, specs=None, hi: float = 2.0, lo: float = 0.05) -> dict:
    """The ``orders`` table: {schedule: {spec: measure(...)}} on VE hi -> lo."""
    out = {}
    for name, sc in _schedules().items():
        gm = dg.GaussianMixture.ring(sc)
        y0, labels, yref = _problem(gm, hi, lo)
        out[name] = {s: measure(s, gm, y0, labels, yref, hi, lo, quick) for s in (specs or ODE)}
    return out


def markdown(result: dict) -> str:
    table = result["orders"]
    names = list(table)
    lines = [
        "Convergence orders on the exact Gaussian-mixture denoiser (`python "
        "bench/convergence.py`): the max error at VE 0.05 against DOP853's solution of the "
        "probability-flow ODE from VE 2, on logSNR-uniform grids; the order is minus the "
        "least-squares slope of log error on log steps (dpm_adaptive: log NFE), first point "
        "excluded. The exponential integrators in lambda give the same errors on both "
        "schedules; the samplers in straight coordinates (heun, lms, ipndm, res_multistep, "
        "gradient_estimation, heunpp2, dpm_fast, dpm_adaptive) integrate x / a on VP and the "
        "flow's own x on flows.",
        "",
        "| sampler | nominal | "
        + " | ".join(f"{n} order" for n in names)
        + " | steps | "
        + " | ".join(f"{n} error at the last" for n in names)
        + " | note |",
        "|---|---|" + "---|" * (2 * len(names) + 2),
    ]
    for spec, (nominal, note) in ODE.items():
        if spec not in table[names[0]]:
            continue
        rows = [table[n][spec] for n in names]
        xs = rows[0]["steps"] or rows[0]["nfe"]
        span = f"{xs[1]}..{xs[-1]}" + ("" if rows[0]["steps"] else " NFE")
        lines.append(
            f"| `{spec}` | {nominal} | "
            + " | ".join(f"{r['order']:.2f}" for r in rows)
            + f" | {span} | "
            + " | ".join(f"{r['max_error'][-1]:.1e}" for r in rows)
            + f" | {note} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--md", help="the orders table in markdown")
    ap.add_argument("--quick", action="store_true", help="fewer step counts (for CI smoke runs)")
    args = ap.parse_args()
    steps = [10, 20, 40] if args.quick else [20, 40, 80, 160, 320, 640]
    sc = dg.VPSchedule.from_betas()
    gm = dg.GaussianMixture.ring(sc)
    result = {
        "schedule": "SD1.x scaled_linear",
        "grid": "uniform_lam, final=sigma_min",
        "fit": "least squares of log(err) on log(NFE), first step count excluded",
        "ranges": {},
    }
    for hi, lo in [(2.0, 0.05), (sc.sigma_max, sc.sigma_min)]:
        y0, labels, yref = _problem(gm, hi, lo)
        rows = {}
        for spec in SPECS:
            errs, nfes = convergence_errors(spec, gm, y0, labels, yref, steps, hi, lo)
            rows[spec] = {
                "order": round(fitted_order(errs[1:], nfes[1:]), 3),
                "nfe": nfes,
                "max_error": [float(f"{e:.3e}") for e in errs],
            }
        result["ranges"][f"ve {hi:.4g} -> {lo:.4g}"] = rows
    result["orders_setup"] = (
        "VE 2 -> 0.05 on each schedule, uniform_lam grids of 8..128 steps (dpm_fast: 3k + 2 and "
        "3k steps; dpm_adaptive: rtol 0.05..8e-5), order against steps (dpm_adaptive: NFE)"
    )
    result["orders"] = orders(args.quick)
    result["nominal"] = {s: {"order": n, "note": note} for s, (n, note) in ODE.items()}
    emit(result, args.out)
    if args.md:
        with open(args.md + ".tmp", "w") as f:
            f.write(markdown(result))
        os.replace(args.md + ".tmp", args.md)


if __name__ == "__main__":
    main()
