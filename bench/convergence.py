"""Convergence orders of every deterministic sampler on the exact Gaussian-mixture denoiser.

Error at sigma_lo (VE) against scipy's DOP853 solution of the probability-flow ODE (rtol 1e-13), on
logSNR-uniform grids, versus NFE. Prints JSON: per range and sampler, errors, NFEs, fitted order.

    python bench/convergence.py [--out FILE] [--quick]
"""

import argparse
import math

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="fewer step counts (for CI smoke runs)")
    args = ap.parse_args()
    steps = [10, 20] if args.quick else [20, 40, 80, 160, 320, 640]
    sc = dg.VPSchedule.from_betas()
    gm = dg.GaussianMixture.ring(sc)
    result = {
        "schedule": "SD1.x scaled_linear",
        "grid": "uniform_lam, final=sigma_min",
        "fit": "least squares of log(err) on log(NFE), first step count excluded",
        "ranges": {},
    }
    for hi, lo in [(2.0, 0.05), (sc.sigma_max, sc.sigma_min)]:
        g = torch.Generator().manual_seed(0)
        y0 = torch.randn(16, 2, dtype=torch.float64, generator=g) * math.sqrt(1 + hi**2)
        labels = torch.arange(16) % 4
        yref = ode_reference(gm, y0, hi, lo, labels)
        rows = {}
        for spec in SPECS:
            errs, nfes = convergence_errors(spec, gm, y0, labels, yref, steps, hi, lo)
            rows[spec] = {
                "order": round(fitted_order(errs[1:], nfes[1:]), 3),
                "nfe": nfes,
                "max_error": [float(f"{e:.3e}") for e in errs],
            }
        result["ranges"][f"ve {hi:.4g} -> {lo:.4g}"] = rows
    emit(result, args.out)


if __name__ == "__main__":
    main()
