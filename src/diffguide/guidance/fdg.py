"""Frequency-Decoupled Guidance (Sadat et al. 2025, arXiv 2506.19713)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from ..core.guided import Branch, Guidance, constant
from ..core.registry import number_list
from ..core.pred import as_images, Pred
from ..core.registry import register
from .cfg import check_space, output_space

_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _blur(x):
    k = constant(_BINOMIAL, str(x.device), x.dtype)
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, [2, 2, 2, 2], mode="reflect"), kernel, groups=x.shape[1])


def _up(x):
    return _blur(
        F.interpolate(
            x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False
        )
    )


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list:
    """Band-pass levels, finest first, and the low-pass residual last (Burt & Adelson's pyramid with
    a 5-tap binomial kernel, bilinear resampling and reflect borders, as kornia's); a side that is
    not a power of two when neither is gets reflect-padded up to one."""
    h, w = x.shape[-2:]
    if not (_pow2(h) or _pow2(w)):
        x = F.pad(
            x,
            [0, 2 ** math.ceil(math.log2(w)) - w, 0, 2 ** math.ceil(math.log2(h)) - h],
            mode="reflect",
        )
    gauss = [x]
    for _ in range(levels - 1):
        g = _blur(gauss[-1])
        gauss.append(
            F.interpolate(
                g, size=(g.shape[-2] // 2, g.shape[-1] // 2), mode="bilinear", align_corners=False
            )
        )
    return [g - _up(n) for g, n in zip(gauss, gauss[1:])] + [gauss[-1]]


def from_pyramid(pyr: list) -> torch.Tensor:
    x = pyr[-1]
    for band in reversed(pyr[:-1]):
        x = _up(x) + band
    return x


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _floats(text, n: int | None, name: str) -> list:
    error = (
        f"FDG {name} must be {'one number or ' + str(n) if n else 'one or more'} finite "
        f"numbers separated by ';', got {text!r}"
    )
    vals = list(number_list(text, error))
    if not vals or (n is not None and len(vals) not in (1, n)) or not all(map(math.isfinite, vals)):
        raise ValueError(error)
    return vals * n if n and len(vals) == 1 else vals


@register("guidance", "fdg")
@dataclass(frozen=True)
class FDG(Guidance):
    """FDG (Sadat et al. 2025, Alg. 1): CFG applied per level of a Laplacian pyramid of the output,
    u_l + w_l (c_l - u_l), with one scale per level from the finest (``scales`` "10;5": w_high 10,
    w_low 5, the paper's SDXL setting), then the pyramid collapsed. ``parallel`` (one weight, or one
    per level) scales the part of c_l - u_l parallel to c_l (the paper's APG-style projection; 1:
    off). In ``space`` (auto: the model's own output), as diffusers' FrequencyDecoupledGuidance."""

    scales: str = "10;5"
    parallel: str = "1"
    space: str = "auto"

    def __post_init__(self):
        check_space(self.space)
        self._weights  # parsed (and checked) now

    @cached_property
    def _weights(self) -> tuple[list, list]:
        ws = _floats(self.scales, None, "scales")
        return ws, _floats(self.parallel, len(ws), "parallel")

    def branches(self, pt, state=None):
        if all(w == 1 for w in self._weights[0]):
            return {"c": Branch("pos")}
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        if "u" not in preds:
            return preds["c"], state
        ws, ps = self._weights
        space = output_space(self.space, pt)
        c, u = (preds[k].output(space, pt.a, pt.s) for k in ("c", "u"))
        if c.ndim < 4:
            raise ValueError(f"FDG needs image-shaped outputs (B, C, H, W), got {tuple(c.shape)}")
        shape = c.shape
        c, u = as_images(c), as_images(u)  # a video's frames are pyramids of their own
        out = []
        for cl, ul, w, p in zip(
            laplacian_pyramid(c, len(ws)), laplacian_pyramid(u, len(ws)), ws, ps
        ):
            d = cl - ul
            if p != 1:
                dims = tuple(range(1, d.ndim))
                unit = F.normalize(cl.double().flatten(1), dim=1).view_as(cl)
                par = (d.double() * unit).sum(dims, keepdim=True) * unit
                d = (p * par + (d.double() - par)).to(d.dtype)
            out.append(ul + w * d)
        guided = from_pyramid(out)[..., : c.shape[-2], : c.shape[-1]].reshape(shape)
        return Pred.from_output(space, guided, x, pt.a, pt.s), state
