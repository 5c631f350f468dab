"""DeepCache (Ma et al. 2024; horseee/DeepCache): a UNet's deep features reused between steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.registry import register
from ..guidance.perturb import _cached
from .base import Cache, _module, active, wrap
from .modules import ModuleForward, tree

LAYERS = ("resnets", "attentions")


@dataclass(frozen=True)
class DeepCache(Cache):
    """Every ``interval`` steps the whole UNet runs; in between, the layers deeper than the branch
    point return their outputs of the last full step and only the shallow path runs (DeepCache,
    Sec. 3.2, as the authors' ``DeepCacheSDHelper``: ``branch`` is their cache_branch_id, block
    ``branch // 3``, layer ``branch % 3``; 0 is the shallowest). ``other_interval`` sets the
    interval of every branch but the plain conditional one (the unconditional and perturbed rows,
    which change more slowly); 0: the same. The decisions depend only on the step."""

    interval: int = 3
    branch: int = 0
    other_interval: int = 0
    per: str = "branch"

    capturable = True

    def __post_init__(self):
        if self.interval < 1 or self.other_interval < 0 or self.branch < 0:
            raise ValueError(
                f"need interval >= 1, other_interval >= 0 and branch >= 0; got {self.interval!r}, "
                f"{self.other_interval!r}, {self.branch!r}"
            )
        super().__post_init__()

    def check(self, denoiser) -> None:
        unet = _module(denoiser, self.name)
        if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
            raise ValueError(
                f"cache 'deepcache' needs a UNet (down_blocks, up_blocks); {type(unet).__name__} "
                "has none (transformers: first_block, teacache, magcache)"
            )
        if self.branch // 3 >= len(unet.down_blocks):
            raise ValueError(
                f"deepcache branch {self.branch} is past this UNet's {len(unet.down_blocks)} "
                f"blocks (at most {3 * len(unet.down_blocks) - 1})"
            )

    def apply(self, denoiser, state, groups: list):
        unet = _module(denoiser, self.name)
        deep, units = _cached(unet, ("deepcache", self.branch), lambda: _deep(unet, self.branch))
        return active(ModuleForward(self, state, self.folded(groups), units), deep, wrap)

    def ready(self, entry) -> bool:
        return "out" in entry

    def keep(self, state, entry, module, rows) -> None:
        entry.setdefault("out", {})[module] = tree(rows, torch.Tensor.detach)

    def reuse(self, state, entry, module):
        return entry["out"][module]

    def decide(self, state, key, rows) -> bool:
        entry = state.entries.setdefault(key, {"calls": 0})
        i, entry["calls"] = entry["calls"], entry["calls"] + 1
        branch = key[0] if isinstance(key, tuple) else key
        plain = isinstance(branch, str) or (branch.cond == "pos" and branch.perturb is None)
        every = self.interval if plain or not self.other_interval else self.other_interval
        return i % every == 0


def _layers(unet) -> list:
    """(module, kind, block, layer) as the authors' helper numbers them: up blocks and their layers
    counted from the output end."""
    out = []
    for b, block in enumerate(unet.down_blocks):
        for name in LAYERS:
            out += [(m, "down", b, i) for i, m in enumerate(getattr(block, name, None) or [])]
        out += [(m, "down", b, len(block.resnets)) for m in (block.downsamplers or [])]
        out.append((block, "down", b, 0))
    if unet.mid_block is not None:
        out.append((unet.mid_block, "mid", 0, 0))
    n = len(unet.up_blocks)
    for i, block in enumerate(unet.up_blocks):
        b, k = n - i - 1, len(block.resnets)
        for name in LAYERS:
            out += [(m, "up", b, k - j - 1) for j, m in enumerate(getattr(block, name, None) or [])]
        out += [(m, "up", b, 0) for m in (block.upsamplers or [])]
        out.append((block, "up", b, 0))
    return out


def _is_deep(kind, b, layer, block_id, layer_id) -> bool:
    if b > block_id or kind == "mid":
        return True
    if b < block_id:
        return False
    return layer >= layer_id if kind == "down" else layer > layer_id


def _deep(unet, branch: int) -> tuple[list, tuple[int, int]]:
    """The modules that are reused past ``branch`` (outermost ones only), and the UNet's leaf
    layers (resnets, attentions, resamplers) counted: (always run, deep)."""
    layers = _layers(unet)
    deep = [m for m, kind, b, i in layers if _is_deep(kind, b, i, branch // 3, branch % 3)]
    inside = {id(c) for m in deep for c in m.modules() if c is not m}
    outer = [m for m in deep if id(m) not in inside]
    covered = {id(c) for m in outer for c in m.modules()}
    leaves = {
        id(c): id(c) in covered
        for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)
        if block is not None
        for name in (*LAYERS, "downsamplers", "upsamplers")
        for c in (getattr(block, name, None) or [])
    }  # by id: a layer listed twice counts once
    n_deep = sum(leaves.values())
    return outer, (len(leaves) - n_deep, n_deep)


register("cache", "deepcache")(DeepCache)
