"""Max absolute difference between diffguide and diffusers' scheduler loops, per case.

Same model, SD scheduler settings, same initial noise (and per-sample generators for the stochastic
samplers). Models: a tiny random UNet around the exact N(0, I) prediction (eps and v), and the exact
Gaussian-mixture denoiser. Prints JSON.

    python bench/parity.py [--out FILE]
"""

import argparse

import torch

from _common import emit

import diffguide as dg
from helpers import PARITY_CASES, WellPosed, gmm_eps_model, parity_run, sd_schedule, tiny_unet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    sc = sd_schedule()
    unet = tiny_unet(0)
    g = torch.Generator().manual_seed(3)
    text = torch.randn(2, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g).expand(2, -1, -1)
    gm = dg.GaussianMixture.ring(sc)
    rows = {}
    for case in PARITY_CASES:
        row = {}
        for steps in (8, 20):
            for kind, label in (("eps", "epsilon"), ("v", "v_prediction")):
                m = WellPosed(sc, unet, kind)
                x, ref = parity_run(
                    case, steps, m, m.denoiser(), sc, (2, 4, 8, 8), *text, kind=label
                )
                row[f"unet_{kind}_{steps}"] = float(f"{(x - ref).abs().max():.2e}")
        x, ref = parity_run(
            case,
            15,
            gmm_eps_model(gm),
            gm,
            sc,
            (2, 2),
            torch.tensor([0, 2]),
            torch.tensor([-1, -1]),
        )
        row["gmm_15"] = float(f"{(x - ref).abs().max():.2e}")
        row["worst"] = max(row.values())
        rows[case] = row
    emit(
        {
            "metric": "max |diffguide - diffusers| on unit-variance samples",
            "cfg_scale": 5.0,
            "cases": rows,
            "worst": max(r["worst"] for r in rows.values()),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
