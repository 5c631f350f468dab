"""What the toy world's small trained networks (evaluator, reward) share: augmentation, and
safetensors weights written atomically and loaded from the package's assets."""

from __future__ import annotations

import json
import os

import torch

from ..files import atomic_write


def augment(x: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    """Random horizontal flips and pixel noise of a random strength up to ``noise``; x in [0, 1]."""
    b = x.shape[0]
    x = torch.where((torch.rand(b, generator=g) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    return (
        x + torch.rand(b, 1, 1, 1, generator=g) * noise * torch.randn(x.shape, generator=g)
    ).clamp(0, 1)


def save(model: torch.nn.Module, out: str) -> None:
    """Weights to ``out``, written aside and renamed into place."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write(out, lambda f: f.write(data))


def load(model: torch.nn.Module, path: str | None, asset: str, module: str) -> torch.nn.Module:
    """``model`` with weights from ``path`` (default: the shipped ``asset``), in eval mode."""
    from safetensors.torch import load_file

    from ..assets import path as asset_path

    path = path or asset_path(asset)
    if not os.path.exists(path):
        raise ValueError(
            f"{asset.split('.')[0]} weights {path!r} not found (train them with "
            f"`python -m diffguide.toy.{module} OUT`)"
        )
    model.load_state_dict(load_file(path))
    return model.eval()


def main(train, description: str, steps: int, seed: int) -> None:
    """``python -m diffguide.toy.<module> OUT [--steps N] [--seed S]``: train, print the report."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seed", type=int, default=seed)
    a = ap.parse_args()
    print(json.dumps(train(a.out, steps=a.steps, seed=a.seed)))
