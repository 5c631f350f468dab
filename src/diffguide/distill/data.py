"""Training data and micro-batches: the toy world's scenes or a folder of captioned images, cut so
that a step's examples and randomness do not depend on how its batch is split."""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np
import torch


class ToyData:
    """The built-in world's training scenes: 3x32x32 images in [-1, 1] and a caption each."""

    def __init__(self, cfg):
        from ..toy.data import SceneData

        # rendered as the batches ask: step 1 comes at once, not after cfg.dataset renders
        self.scenes = SceneData(cfg.dataset, cfg.seed)
        self.n, self.shape = cfg.dataset, (3, 32, 32)

    def items(self, idx: np.ndarray, epoch: int):
        return self.scenes.batch(idx, epoch, np.zeros(len(idx), dtype=bool))


class FolderData:
    """A folder of images with captions in ``metadata.jsonl`` (lines {"file_name": ..., "text":
    ...}, the imagefolder convention), loaded once into memory."""

    def __init__(self, folder: str):
        meta = os.path.join(folder, "metadata.jsonl")
        if not os.path.isfile(meta):
            raise ValueError(
                f"data folder {folder!r} has no metadata.jsonl (one JSON line per image: "
                f'{{"file_name": "a.png", "text": "a caption"}})'
            )
        imgs, self.captions = _read_folder(folder, meta)
        if not imgs:
            raise ValueError(f"{meta} lists no images")
        if len({a.shape for a in imgs}) != 1:
            raise ValueError(f"images in {folder!r} differ in size; all must match the teacher's")
        self.images = np.stack(imgs)
        self.n = len(imgs)
        self.shape = (3,) + self.images.shape[1:3]

    def items(self, idx: np.ndarray, epoch: int):
        x = torch.from_numpy(self.images[idx].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        return x.contiguous(), [self.captions[i] for i in idx]


def _read_folder(folder: str, meta: str) -> tuple[list, list]:
    """The RGB images (uint8 HWC) and captions ``meta`` lists, in its order."""
    from PIL import Image

    imgs, captions = [], []
    with open(meta) as f:
        for k, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name, text = rec["file_name"], rec["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f'{meta} line {k + 1}: expected {{"file_name": ..., "text": ...}}'
                ) from None
            with Image.open(os.path.join(folder, name)) as im:
                imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            captions.append(str(text))
    return imgs, captions


def load_data(cfg):
    return ToyData(cfg) if cfg.data == "toy" else FolderData(cfg.data)


class MicroBatch(NamedTuple):
    """One process's share of one accumulation round: its own generator, data and conditions."""

    generator: torch.Generator
    x0: torch.Tensor  # in the teacher's space
    pos: dict
    neg: dict | None


def batches(cfg, data, teacher, device, parts: int):
    """(step, part) -> MicroBatch. A step's examples are one slice of a fixed per-epoch
    permutation, as large as the effective batch (``parts`` micro-batches of ``cfg.batch``:
    processes x accumulation), and micro-batch ``part`` draws from a generator seeded by (seed,
    step, part), so neither the data nor the randomness a step sees depends on how its batch is
    split."""
    family = teacher.family
    size = family.default_size
    if data.shape != (3, size, size):
        raise ValueError(
            f"the data has {data.shape[1]}x{data.shape[2]} images but the teacher makes "
            f"{size}x{size} ones; use data of the teacher's size"
        )
    total = cfg.batch * parts
    if data.n < total:
        raise ValueError(
            f"the effective batch {total} (batch {cfg.batch} x {parts}) is larger than the data "
            f"({data.n} images)"
        )
    per_epoch = data.n // total

    def get(step: int, part: int) -> MicroBatch:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * parts + part)
        epoch, k = divmod(step, per_epoch)
        order = np.random.Generator(np.random.PCG64([cfg.seed, epoch, 2])).permutation(data.n)
        lo = k * total + part * cfg.batch
        images, caps = data.items(order[lo : lo + cfg.batch], epoch)
        with torch.no_grad():
            x0 = family.encode_images(images.to(device))
        return MicroBatch(g, x0, *conditions(teacher, caps, device))

    return get


@torch.no_grad()
def conditions(teacher, captions: list, device) -> tuple[dict, dict | None]:
    """The teacher's conditions for the captions and for empty negatives, at the data's size, with
    the teacher's own embedded guidance input (Flux.1-dev's) at its default."""
    family = teacher.family
    pos, neg = family.encode(captions, [""] * len(captions), 1, device)
    size = family.default_size  # the data's size (checked in batches()), in pixels
    pos, neg = (family.extra(c, size, size) if c is not None else c for c in (pos, neg))
    w = teacher.embedded_guidance
    if w is not None:
        pos, neg = (family.embed_guidance(c, w, len(captions)) for c in (pos, neg))
    return pos, neg


def drop_captions(pos: dict, neg: dict | None, p: float, generator: torch.Generator) -> dict:
    """``pos`` with each example's condition replaced by the empty caption's (``neg``) with
    probability ``p``: the text dropout that lets a model trained from data alone (iCT) take CFG."""
    if not p:
        return pos
    if neg is None:
        raise ValueError("caption dropout needs the empty caption's condition; this model has none")
    b = next(v.shape[0] for v in _tensors(pos))
    keep = torch.rand(b, generator=generator) >= p
    return _rows(pos, neg, keep)


def _tensors(cond):
    if torch.is_tensor(cond):
        yield cond
    elif isinstance(cond, dict):
        for v in cond.values():
            yield from _tensors(v)


def _rows(a, b, keep: torch.Tensor):
    """a's rows where ``keep``, else b's, through nested condition dicts (other entries: a's)."""
    if torch.is_tensor(a) and a.ndim and a.shape[0] == keep.shape[0]:
        return torch.where(keep.to(a.device).view(-1, *([1] * (a.ndim - 1))), a, b.to(a.dtype))
    if isinstance(a, dict):
        return {k: _rows(v, b[k], keep) if k in b else v for k, v in a.items()}
    return a
