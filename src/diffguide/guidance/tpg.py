"""Token Perturbation Guidance (Rajabi, Mehraban, Sadat, Taati 2025, arXiv 2506.10036)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from dataclasses import dataclass

import torch

from ..core.registry import register
from .perturb import PerturbedGuidance, _active, _cached, _hooked, _items, _module, _put, _take
from .perturb import blocks, default_layers

# the authors' default (pipeline_sdxl_tpg.py): SDXL's down-path transformer blocks 6 to 23
AUTHORS_FIRST = 6
PATHS = {"down": "d", "mid": "m", "up": "u"}  # UNet parts, as the authors name the blocks
# this thread's evaluation of each TPG perturbation ("runs": its images' seeds, its key, the
# perturbed rows met so far) and the image seed of each perturbed row of the forward ("rows")
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
    # the permutations are made on the host at every block call, from the images' seeds: a
    # captured loop would replay the first run's
    capturable = False

    def perturbation(self):
        return ShuffledTokens(self.layers)

    def conditions(self, pt, conds, x, noise):
        self._perturb.begin(pt, x.shape[0], noise)  # on every process alike, before the forwards
        return {}


@dataclass(frozen=True)
class ShuffledTokens:
    """TPG's perturbation: the perturbed rows' tokens (the image stream) at the input of each
    chosen block permuted, as the authors' make_tpg_block does, and left in that order. Each row's
    permutation at a block is a function of its image's seed, the evaluation (step and time) and the
    block alone (``permutations``): it draws nothing from the run's noise (the sampler's), so an
    image is the same whatever its batch, ``max_batch`` and the processes sharing its rows; the
    authors draw one torch.randperm per call for the whole batch."""

    layers: str = "auto"
    rowwise = True
    # a process holding only the later perturbed rows of a shared forward cannot tell their images
    # (pipelines.parallel_layout refuses such layouts before sampling)
    one_process = "TPG's perturbed rows"

    def targets(self, denoiser) -> list:
        net = _module(denoiser, "TPG")
        return _cached(net, ("tpg", self.layers), lambda: tpg_blocks(net, self.layers))

    def begin(self, pt, b: int, noise) -> None:
        """An evaluation starts (``TPG.conditions``): its b images' seeds and its key; the
        perturbed rows of its forwards are the images in order, over the chunks ``max_batch``
        makes."""
        if pt.step is None:  # outside a sampling loop (training): fresh from torch's generator
            key = (None, int(torch.randint(2**62, (1,))))
        else:  # the time too: a second evaluation in a step (Heun's) gets fresh permutations
            key = (int(pt.step), float(pt.t) if pt.t.ndim == 0 else None)
        runs = _LOCAL.__dict__.setdefault("runs", {})
        runs[self] = {"seeds": image_seeds(noise, b), "key": key, "met": 0}

    @contextlib.contextmanager
    def apply(self, denoiser, noise, rows):
        run = getattr(_LOCAL, "runs", {}).get(self)
        if run is None:
            raise ValueError(
                "TPG's perturbation draws its permutations in a run of the tpg guidance"
            )
        flags = getattr(rows, "flags", None) or tuple(bool(f) for f in rows.tolist())
        seeds, b = run["seeds"], len(run["seeds"])
        mine = [i for i, f in enumerate(flags) if f]
        here = {i: seeds[(run["met"] + k) % b] for k, i in enumerate(mine)}  # a row's image seed
        run["met"] += len(mine)
        net = _module(denoiser, "TPG")
        index = _cached(
            net, ("tpg-order",), lambda: {id(m): i for i, m in enumerate(net.modules())}
        )
        saved = getattr(_LOCAL, "rows", None)
        merged = {**(saved[0] if saved else {}), **here}  # two TPG terms: the rows of both
        _LOCAL.rows = (merged, len(flags), run["key"], index)
        install = lambda m: m.register_forward_pre_hook(_shuffle_hook, with_kwargs=True)  # noqa: E731
        try:
            with _hooked(self.targets(denoiser), "tpg", install, rows):
                yield
        finally:
            _LOCAL.rows = saved


def image_seeds(noise, b: int) -> tuple:
    """An integer per image fixed by its own noise stream, read without drawing from it: its
    generator's seed (per-image generators, as a pipeline's seeds make), else the shared
    generator's (torch's own without one) mixed with the image's row (its images depend on their
    batch anyway)."""
    rows = None
    while hasattr(noise, "source"):  # a captured loop's tape, a sub-batch of a shared stream
        if getattr(noise, "rows", None) is not None:  # image i is row rows[i] of the source
            rows = list(noise.rows) if rows is None else [noise.rows[r] for r in rows]
        noise = noise.source
    gens = getattr(noise, "generators", None)
    if gens is not None and len(gens) == b:
        return tuple(int(g.initial_seed()) for g in gens)
    g = getattr(noise, "generator", None)
    base = int(g.initial_seed()) if g is not None else torch.initial_seed()
    return tuple(_mix(base, i if rows is None else rows[i]) for i in range(b))


def _mix(*parts) -> int:
    """A 63-bit seed from integers and floats, the same on every process and platform."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def permutations(seeds, key, block: int, n: int, device) -> torch.Tensor:
    """[k, n] token orders, one uniform random permutation (torch.randperm, as the authors) per
    image seed in ``seeds``, at evaluation ``key`` and the block numbered ``block`` (its place among
    the network's modules), made on the host (the same on every device)."""
    gen = torch.Generator()
    orders = [torch.randperm(n, generator=gen.manual_seed(_mix(s, *key, block))) for s in seeds]
    return torch.stack(orders).to(device)


def _shuffle_hook(block, args, kwargs):
    rows = _active(block, "tpg")
    if rows is None:
        return None
    h = kwargs.get("hidden_states", args[0] if args else None)
    here, size, key, index = _LOCAL.rows
    set_rows = [i for i, f in enumerate(rows.flags) if f]
    if len(rows.flags) == size:
        seeds = [here[i] for i in set_rows]
    elif len(set_rows) == len(here):  # a step cache runs this block on some rows: TPG's all here
        seeds = list(here.values())
    else:
        raise ValueError(
            "TPG needs all its perturbed rows in each block of a forward; use no step cache"
        )
    picked = _take(rows, h)
    order = permutations(seeds, key, index[id(block)], picked.shape[1], h.device)
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
