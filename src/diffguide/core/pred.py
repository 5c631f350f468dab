"""Pred(x0, eps): what every network output becomes, and what samplers read.

Samplers anchor the update on ``x0`` and re-noise with ``eps``; they never re-derive one from x. For
an ordinary prediction x = a x0 + s eps holds; CFG++ deliberately breaks it (guided x0,
unconditional eps). Conversions run in float32 (float64 stays float64) whatever the network's dtype.

``x0_hist`` is what a multistep sampler remembers of this step for later steps' slope estimates;
None means x0. CFG++ sets it to the unconditional x0, as its authors' DPM++(2M) does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("eps", "x0", "sample", "v", "flow")


def _f(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _coef(c, like: torch.Tensor):
    """A scalar, or a per-sample tensor of shape [B], as something that broadcasts against like."""
    if isinstance(c, torch.Tensor):
        c = c.to(device=like.device, dtype=like.dtype)
        if c.ndim == 1 and like.ndim > 1:
            c = c.view(-1, *([1] * (like.ndim - 1)))
    return c


@dataclass(frozen=True)
class Pred:
    x0: torch.Tensor
    eps: torch.Tensor
    x0_hist: torch.Tensor | None = None

    @classmethod
    def from_output(cls, kind: str, out: torch.Tensor, x: torch.Tensor, a, s) -> "Pred":
        """Convert a raw network output of the given kind at state x, level (a, s)."""
        out, x = _f(out), _f(x)
        if out.shape != x.shape:
            raise ValueError(
                f"network output shape {tuple(out.shape)} does not match the sample shape "
                f"{tuple(x.shape)}"
            )
        a, s = _coef(a, x), _coef(s, x)
        if kind == "eps":
            return cls((x - s * out) / a, out)
        if kind in ("x0", "sample"):
            return cls.from_x0(x, out, a, s)
        if kind == "v":  # v = a eps - s x0 (Salimans & Ho 2022); general a, s
            n = a * a + s * s
            return cls((a * x - s * out) / n, (s * x + a * out) / n)
        if kind == "flow":  # velocity u = eps - x0 (rectified flow)
            x0 = (x - s * out) / (a + s)
            return cls(x0, x0 + out)
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of: {', '.join(KINDS)}")

    @classmethod
    def from_x0(cls, x: torch.Tensor, x0: torch.Tensor, a, s) -> "Pred":
        x, x0 = _f(x), _f(x0)
        return cls(x0, (x - _coef(a, x) * x0) / _coef(s, x))

    @classmethod
    def from_eps(cls, x: torch.Tensor, eps: torch.Tensor, a, s) -> "Pred":
        x, eps = _f(x), _f(eps)
        return cls((x - _coef(s, x) * eps) / _coef(a, x), eps)

    def v(self, a, s) -> torch.Tensor:
        return _coef(a, self.eps) * self.eps - _coef(s, self.x0) * self.x0

    @property
    def history(self) -> torch.Tensor:
        """The x0 a multistep sampler keeps for this step."""
        return self.x0 if self.x0_hist is None else self.x0_hist

    # Linear combinations keep x = a x0 + s eps when the weights sum to one, so CFG-type rules can
    # be written once on Pred and hold in every parameterisation. They act on (x0, eps) only: the
    # result's history is its own x0.
    def __add__(self, o: "Pred") -> "Pred":
        return Pred(self.x0 + o.x0, self.eps + o.eps)

    def __sub__(self, o: "Pred") -> "Pred":
        return Pred(self.x0 - o.x0, self.eps - o.eps)

    def __mul__(self, w) -> "Pred":
        w = _coef(w, self.x0)
        return Pred(self.x0 * w, self.eps * w)

    __rmul__ = __mul__

    def split(self, n) -> list["Pred"]:
        """n equal parts, or parts of the given sizes."""
        if isinstance(n, int):
            return [Pred(a, b) for a, b in zip(self.x0.chunk(n), self.eps.chunk(n))]
        return [Pred(a, b) for a, b in zip(self.x0.split(list(n)), self.eps.split(list(n)))]

    def output(self, kind: str, a, s) -> torch.Tensor:
        """This prediction as a raw output of ``kind`` (the inverse of ``from_output``)."""
        if kind == "eps":
            return self.eps
        if kind in ("x0", "sample"):
            return self.x0
        if kind == "v":
            return self.v(a, s)
        if kind == "flow":
            return self.eps - self.x0
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of: {', '.join(KINDS)}")

    @staticmethod
    def cat(preds) -> "Pred":
        preds = list(preds)
        return Pred(torch.cat([p.x0 for p in preds]), torch.cat([p.eps for p in preds]))


def as_images(t: torch.Tensor) -> torch.Tensor:
    """[B, ..., H, W] as [B, C', H, W]: a video's frames (and channels) side by side as channels,
    for the methods that work on an image's spatial structure (FDG's pyramid). 4-D stays as it
    is."""
    return t if t.ndim == 4 else t.flatten(1, -3)
