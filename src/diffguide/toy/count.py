"""How many objects of each colour a toy-world image shows, in closed form (no network).

The evaluator CNN answers "which shape has this colour, if any" per colour, so it cannot count: a
duplicated object (two blue squares for "a red circle and a blue square") reads as if both prompted
objects were there. The counter here measures what the CNN cannot: each pixel is given the nearest
object palette colour when it is close to it and closer to it than to the background; same-colour
pixels form connected components; components too small or too thin to be an object are dropped
(anti-aliased rims and noise speckles); and colour parts of one object with a colour gradient are
joined. Thresholds are set from the world's geometry and checked on rendered and generated images
(tests/test_evaluator_count.py).
"""

from __future__ import annotations

import numpy as np

from . import scenes

COLOURS = list(scenes.COLOURS)
PALETTE = np.asarray(list(scenes.COLOURS.values()), np.float32) / 255
# A pixel is an object pixel if it is this close (RGB distance, [0, 1] units) to a palette colour.
# The world's jitter moves a colour up to 0.08 and generated images drift a little more; the closest
# two palette colours (orange, yellow) are 0.28 apart, so the nearest one still decides.
TOLERANCE = 0.2
# ... and this far from the background. Every palette colour is at least 0.37 from every background
# except blue from the blue background (0.12, less with jitter), which generation-like pixel noise
# (sigma 0.05) would otherwise turn into blue blobs.
CONTRAST = 0.2
# An object is a component with at least this many pixels and at least one interior pixel (its four
# neighbours of its colour). On 5,000 rendered scenes every object has 16 px or more and an interior
# pixel; every other component (anti-aliased rims whose blend lands near another palette colour,
# noise speckles at sigma 0.05) has at most 9 px and no interior pixel, being a line or a dot.
MIN_AREA = 8
# Two touching components of different colours are one object with a colour gradient when they
# share a boundary this long relative to the smaller one's size (sqrt of its area): a cut through
# one object is long (about 1.4 for a square cut in half), objects that merely touch share a few
# pixels at a corner or along a short edge.
MERGE = 1.0
_NONE = -1
_OFFSETS4 = ((0, 1), (1, 0), (0, -1), (-1, 0))
# components are 8-connected: with 4-connectivity pixel noise of sigma 0.1 split objects into
# several (exact counts 84% of scenes against 95%); two same-colour objects touching at a corner
# count once either way
_OFFSETS8 = _OFFSETS4 + ((1, 1), (1, -1), (-1, 1), (-1, -1))


def background(x: np.ndarray) -> np.ndarray:
    """[N, 3]: the median border pixel (objects are placed at least a pixel inside the frame)."""
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    return np.median(border, axis=1)


def classify(x: np.ndarray, tolerance: float = TOLERANCE) -> np.ndarray:
    """[N, H, W] palette index per pixel, -1 for background and for colours that are no palette
    colour (blends at an object's rim, blends of two colours)."""
    to_bg = np.linalg.norm(x - background(x)[:, None, None], axis=-1)
    # |x - p|^2 expanded: one matrix product instead of an [N, H, W, 6, 3] difference (8x faster)
    sq = (x * x).sum(-1, keepdims=True) - 2 * x @ PALETTE.T + (PALETTE * PALETTE).sum(-1)
    dist = np.sqrt(np.maximum(sq, 0))
    k, dk = dist.argmin(-1), dist.min(-1)
    # closer to the palette colour than to the background: on the blue background the background
    # itself must not read as blue objects
    keep = (dk < tolerance) & (dk < to_bg) & (to_bg > CONTRAST)
    return np.where(keep, k, _NONE).astype(np.int8)


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """a[:, y + dy, x + dx], ``fill`` outside the frame."""
    h, w = a.shape[1:]
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def label(cls: np.ndarray) -> np.ndarray:
    """[N, H, W] component id per pixel (8-connected pixels of one class; -1 where none): the
    smallest flat pixel index of the component, found by min-propagation with pointer jumping
    (about 10 rounds on toy-world images, all images at once)."""
    n, h, w = cls.shape
    valid = cls != _NONE
    same = [valid & (_shift(cls, dy, dx, _NONE) == cls) for dy, dx in _OFFSETS8]
    dtype = np.int32 if cls.size < 2**31 - 1 else np.int64  # int32 moves half the bytes
    big = np.iinfo(dtype).max
    lab = np.where(valid, np.arange(cls.size, dtype=dtype).reshape(cls.shape), big)
    pad = np.full((n, h + 2, w + 2), big, dtype)
    while True:
        pad[:, 1:-1, 1:-1] = lab
        new = lab.copy()
        for (dy, dx), s in zip(_OFFSETS8, same):
            np.minimum(new, pad[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w], out=new, where=s)
        new[valid] = new.ravel()[new[valid]]  # jump to the label of the pixel it names
        if np.array_equal(new, lab):
            return np.where(valid, lab, -1)
        lab = new


def _interior(cls: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours have their class: an anti-aliased rim or a speckle has none."""
    out = cls != _NONE
    for dy, dx in _OFFSETS4:
        out &= _shift(cls, dy, dx, _NONE) == cls
    return out


def _objects(cls: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The components that are objects: (ids, areas), ids sorted."""
    ids, area = np.unique(lab[lab >= 0], return_counts=True)
    thick = np.isin(ids, lab[_interior(cls)])
    keep = (area >= MIN_AREA) & thick
    return ids[keep], area[keep]


def _joins(lab: np.ndarray, ids: np.ndarray, area: np.ndarray) -> list:
    """Pairs of object components that are parts of one object (a long shared boundary)."""
    pairs = []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # each 8-neighbour pair once
        a, b = lab, _shift(lab, dy, dx, -1)
        m = (a >= 0) & (b >= 0) & (a != b)
        pairs.append(np.stack([np.minimum(a[m], b[m]), np.maximum(a[m], b[m])], 1))
    pairs = np.concatenate(pairs)
    pairs = pairs[np.isin(pairs, ids).all(1)]
    if not len(pairs):
        return []
    uniq, shared = np.unique(pairs, axis=0, return_counts=True)
    size = dict(zip(ids.tolist(), area.tolist()))
    return [
        (a, b)
        for (a, b), n in zip(uniq.tolist(), shared.tolist())
        if n >= MERGE * np.sqrt(min(size[a], size[b]))
    ]


def _merge(ids: np.ndarray, joins: list) -> list:
    """Groups of component ids (union-find over the joins); few joins, so plain Python."""
    parent = {i: i for i in ids.tolist()}

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in joins:
        parent[root(a)] = root(b)
    groups = {}
    for i in parent:
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def count(images: np.ndarray) -> np.ndarray:
    """[N, 6] number of objects per palette colour (``COLOURS`` order) in images [N, H, W, 3] in
    [0, 1]. An object with a colour gradient counts once, for the colour of its largest part."""
    x = np.asarray(images, np.float32)
    if not len(x):
        return np.zeros((0, len(COLOURS)), np.int64)
    if x.ndim != 4 or x.shape[-1] != 3 or x.min() < -0.01 or x.max() > 1.01:
        # uint8 images (0-255) or [-1, 1] ones would find no palette colour: say so, not zero
        raise ValueError(
            f"count reads images [N, H, W, 3] in [0, 1]; got shape {tuple(x.shape)}, values "
            f"{x.min():g} to {x.max():g}"
        )
    cls = classify(x)
    lab = label(cls)
    ids, area = _objects(cls, lab)
    size = dict(zip(ids.tolist(), area.tolist()))
    flat = cls.ravel()
    out = np.zeros((len(x), len(COLOURS)), np.int64)
    hw = cls.shape[1] * cls.shape[2]
    for group in _merge(ids, _joins(lab, ids, area)):
        big = max(group, key=size.get)  # an id is a flat pixel index: it names image and colour
        out[big // hw, flat[big]] += 1
    return out


def counts(images: np.ndarray) -> list[dict]:
    """Per image {colour: number of objects} for the colours present."""
    return [{c: int(n) for c, n in zip(COLOURS, row) if n} for row in count(images)]
