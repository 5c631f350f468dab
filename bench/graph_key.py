"""The per-call key of a captured loop (``cuda_graph=True``): what it costs on real network sizes.

The old key walked every parameter (data pointer, dtype) and every module (LoRA scales) at every
call;
``pipelines.pipeline._weights_key`` samples three parameters and finds the LoRA layers again only
when the adapters change. Both run here on SD 1.5's, SDXL's and Flux.1's denoisers built on the meta
device
(no memory; the walk is what costs), interleaved, medians of per-round times and of paired ratios.

    python bench/graph_key.py --out bench/results/graph_key.json [--repeats 21]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402
from device_bench import FLUX, QUICK, SD15, SDXL  # noqa: E402

from diffguide.core.denoiser import NetDenoiser  # noqa: E402
from diffguide.core.schedule import VPSchedule  # noqa: E402
from diffguide.pipelines.pipeline import _weights_key  # noqa: E402


def walked_key(module) -> tuple:
    """The key as it was: every parameter and every module, at every call."""
    parts = [id(module)] + [(p.data_ptr(), p.dtype) for p in module.parameters()]
    for m in module.modules():
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, dict):
            parts.append((tuple(sorted(scaling.items())), tuple(getattr(m, "active_adapters", ()))))
    return tuple(parts)


def networks(quick: bool) -> dict:
    import diffusers

    with torch.device("meta"):
        if quick:
            return {"sd15 (quick)": diffusers.UNet2DConditionModel(**QUICK["sd15"])}
        return {
            "sd15": diffusers.UNet2DConditionModel(**SD15),
            "sdxl": diffusers.UNet2DConditionModel(**SDXL),
            "flux": diffusers.FluxTransformer2DModel(**FLUX),
        }


def per_call(fn, calls: int) -> float:
    t = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t) / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.calls = 3, 2
    rows = []
    for name, net in networks(args.quick).items():
        den = NetDenoiser(lambda x, t, c: x, VPSchedule.from_betas(), module=net)
        _weights_key(den)  # the first call finds the structure once
        old, new = [], []
        for _ in range(args.repeats):  # interleaved rounds, process CPU time
            old.append(per_call(lambda: walked_key(net), args.calls))
            new.append(per_call(lambda: _weights_key(den), args.calls))
        ratio = [o / n for o, n in zip(old, new)]
        rows.append(
            {
                "network": name,
                "parameters": sum(1 for _ in net.parameters()),
                "modules": sum(1 for _ in net.modules()),
                "walked_key_ms": round(1000 * statistics.median(old), 4),
                "sampled_key_ms": round(1000 * statistics.median(new), 4),
                "ratio_median": round(statistics.median(ratio), 1),
                "ratio_quartiles": [
                    round(q, 1) for q in statistics.quantiles(ratio, n=4, method="inclusive")
                ]
                if len(ratio) > 1
                else None,
            }
        )
    emit(
        {
            "repeats": args.repeats,
            "calls_per_round": args.calls,
            "clock": "process CPU time",
            "rows": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
