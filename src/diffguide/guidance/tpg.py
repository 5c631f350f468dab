"""Token Perturbation Guidance (Rajabi, Mehraban, Sadat, Taati 2025, arXiv 2506.10036)."""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass

import torch

from ..core.registry import register
from ..core.sample import draw
from .perturb import PerturbedGuidance, _active, _cached, _hooked, _items, _module, _put, _take
from .perturb import blocks, default_layers

# the authors' default (pipeline_sdxl_tpg.py): SDXL's down-path transformer blocks 6 to 23
AUTHORS_FIRST = 6
PATHS = {"down": "d", "mid": "m", "up": "u"}  # UNet parts, as the authors name the blocks
_LOCAL = threading.local()


@register("guidance", "tpg")
@dataclass(frozen=True)
class TPG(PerturbedGuidance):
    """TPG (Rajabi et al. 2025, Algorithm 1): C + scale (C - P), P with the input tokens of the
    transformer blocks ``layers`` shuffled (H <- S H, a fresh permutation per row, block and call),
    in C's forward; ``cfg+tpg`` is the authors' U + g (C - U) + scale (C - P). Defaults are the
    authors' (scale 3; "auto": down-path blocks d6-d23 on an SDXL UNet, all down-path blocks on a
    UNet with fewer, the middle block of a transformer). ``layers``: ";"-separated dN / mN / uN
    (the N-th transformer block of a UNet's down, mid or up path, ranges d6-d23), integers
    (``transformer_blocks.i``) or regular expressions searched in block names.
    """

    layers: str = "auto"

    def perturbation(self):
        return ShuffledTokens(self.layers)


@dataclass(frozen=True)
class ShuffledTokens:
    """TPG's perturbation: the perturbed rows' tokens (the image stream) at the input of each
    chosen block permuted, as the authors' make_tpg_block does, and left in that order. Each row
    draws its own permutation from its noise source (so an image depends on its seed, not on its
    batch); the authors draw one torch.randperm per call for the whole batch."""

    layers: str = "auto"
    rowwise = True

    def targets(self, denoiser) -> list:
        net = _module(denoiser, "TPG")
        return _cached(net, ("tpg", self.layers), lambda: tpg_blocks(net, self.layers))

    @contextlib.contextmanager
    def apply(self, denoiser, noise, rows):
        saved, _LOCAL.noise = getattr(_LOCAL, "noise", None), noise
        install = lambda m: m.register_forward_pre_hook(_shuffle_hook, with_kwargs=True)  # noqa: E731
        try:
            with _hooked(self.targets(denoiser), "tpg", install, rows):
                yield
        finally:
            _LOCAL.noise = saved


def permutations(noise, k: int, n: int, device) -> torch.Tensor:
    """[k, n] token orders, one uniformly random permutation per row (argsort of normal draws)."""
    return draw(noise, torch.empty(k, n, device=device)).argsort(dim=1)


def _shuffle_hook(block, args, kwargs):
    rows = _active(block, "tpg")
    if rows is None:
        return None
    h = kwargs.get("hidden_states", args[0] if args else None)
    picked = _take(rows, h)
    order = permutations(getattr(_LOCAL, "noise", None), picked.shape[0], picked.shape[1], h.device)
    shuffled = _put(rows, picked.gather(1, order[..., None].expand_as(picked)), h)
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": shuffled}
    return (shuffled, *args[1:]), kwargs


def tpg_blocks(net, layers: str) -> list:
    """The transformer blocks ``layers`` names (see TPG)."""
    unet = _unet_blocks(net) if hasattr(net, "down_blocks") else None
    if layers == "auto":
        if unet is None:
            return blocks(net, default_layers(net), "TPG")
        n = len(unet["d"])
        layers = f"d{AUTHORS_FIRST if n > AUTHORS_FIRST else 0}-d{n - 1}"
    found = []
    for item in _items(layers):
        m = re.fullmatch(r"([dmu])(\d+)(?:-\1?(\d+))?", item)
        if m is None:
            hits = blocks(net, item, "TPG")
        elif unet is None:
            raise ValueError(
                f"TPG layer {item!r} names a UNet block; {type(net).__name__} has none"
            )
        else:
            part, lo = unet[m[1]], int(m[2])
            hi = int(m[3]) if m[3] else lo
            if not lo <= hi < len(part):
                raise ValueError(
                    f"TPG layer {item!r} is not among the UNet's {len(part)} {m[1]}-path "
                    f"transformer blocks ({m[1]}0-{m[1]}{len(part) - 1})"
                )
            hits = part[lo : hi + 1]
        found += [b for b in hits if b not in found]
    return found


def _unet_blocks(net) -> dict:
    """A UNet's BasicTransformerBlocks by path (d, m, u), in module order (the authors' list)."""
    out = {"d": [], "m": [], "u": []}
    for name, m in net.named_modules():
        part = PATHS.get(name.split(".")[0].split("_")[0])
        if part is not None and type(m).__name__ == "BasicTransformerBlock":
            out[part].append(m)
    return out
