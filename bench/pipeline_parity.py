"""Max absolute image difference (in [0, 1]) between GuidedPipeline and diffusers' own pipelines.

Tiny random models (diffguide.pipelines.tiny) saved with save_pretrained and loaded back by both;
same prompts, per-image generators, steps and guidance scale. Prints JSON.

    python bench/pipeline_parity.py [--out FILE]
"""

import argparse
import tempfile

import numpy as np

from _common import emit

from diffguide.pipelines import tiny
from diffguide.pipelines.pipeline import quiet_loading
from helpers import PIPELINE_CASES, pipeline_parity


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    quiet_loading()
    rows = {}
    for case, (builder, options, _, _) in PIPELINE_CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            tiny.BUILDERS[builder](**options).save_pretrained(folder)
            out, ref = pipeline_parity(case, folder)
        rows[case] = {
            "max_abs_error": float(f"{np.abs(out.images - ref).max():.2e}"),
            "seed_to_seed_difference": round(float(np.abs(ref[0] - ref[1]).max()), 3),
            "nfe_per_image": out.nfe,
        }
    emit(
        {
            "metric": "max |diffguide - diffusers| over images in [0, 1], 2 images per case",
            "cases": rows,
            "worst": max(r["max_abs_error"] for r in rows.values()),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
