"""A procedural world of captioned 32x32 scenes whose true distribution is known exactly.

A scene is one or two flat-coloured shapes at random sizes and positions on a plain background.
Captions come from several templates with synonyms, some leaving attributes unspecified, so a prompt
has many valid images. ``parse_prompt`` reads a caption back into the constraints it states, which
is
what adherence is measured against; ``sample_for_prompt`` draws true images for a prompt. Everything
is deterministic from a seed (numpy's PCG64 per scene).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

SIZE = 32
_SS = 4  # supersampling factor for anti-aliased edges

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (145, 55, 185),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {
    "white": (238, 238, 238),
    "black": (22, 22, 22),
    "gray": (125, 125, 125),
    "blue": (45, 75, 190),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SYNONYMS = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus"),
}
COLOUR_WORDS = {"grey": "gray"}
# (colour, shape) pairs never drawn in training: compositional generalisation is measured on them
HELD_OUT = (("purple", "triangle"), ("orange", "cross"), ("green", "diamond"))
JITTER = 12  # per-scene colour jitter (uniform, per channel), so colour fidelity has a spread


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: float  # half-width in pixels
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    objects: tuple
    background: str
    jitter: tuple = ()  # RGB offsets per object and then the background

    @property
    def pairs(self) -> set:
        return {(o.colour, o.shape) for o in self.objects}


@dataclass(frozen=True)
class Prompt:
    """What a caption asks for: objects as (colour or None, shape or None) and a background or
    None."""

    objects: tuple
    background: str | None = None
    text: str = field(default="", compare=False)


def _mask(shape: str, cx: float, cy: float, r: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base at cy + r/2
        top, base = cy - r, cy + 0.6 * r
        half = (yy - top) / (base - top) * r
        return (yy >= top) & (yy <= base) & (np.abs(dx) <= half)
    if shape == "cross":
        t = r / 3
        return ((np.abs(dx) <= r) & (np.abs(dy) <= t)) | ((np.abs(dx) <= t) & (np.abs(dy) <= r))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")


_GRID = (np.arange(SIZE * _SS) + 0.5) / _SS
_XX, _YY = np.meshgrid(_GRID, _GRID)


def render(scene: Scene) -> np.ndarray:
    """The scene as float32 [32, 32, 3] in [0, 1], edges anti-aliased by 4x4 supersampling."""
    jit = np.asarray(scene.jitter or [(0, 0, 0)] * (len(scene.objects) + 1), dtype=np.float32)
    img = np.empty((SIZE * _SS, SIZE * _SS, 3), dtype=np.float32)
    img[:] = np.clip(np.asarray(BACKGROUNDS[scene.background]) + jit[-1], 0, 255)
    for o, j in zip(scene.objects, jit):
        m = _mask(o.shape, o.x, o.y, o.size, _XX, _YY)
        img[m] = np.clip(np.asarray(COLOURS[o.colour]) + j, 0, 255)
    img = img.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))
    return img / 255.0


def _place(rng: np.random.Generator, n: int, sizes: list) -> list:
    """Centres inside the frame with the objects' bounding discs apart (rejection sampling)."""
    for _ in range(200):
        pts = [(rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)) for r in sizes]
        if (
            n == 1
            or np.hypot(pts[0][0] - pts[1][0], pts[0][1] - pts[1][1]) > sizes[0] + sizes[1] + 1
        ):
            return pts
    raise RuntimeError("could not place objects")  # not reached with these sizes


def random_scene(
    rng: np.random.Generator,
    prompt: Prompt | None = None,
    train: bool = True,
    n_objects: int | None = None,
) -> Scene:
    """A scene from the world's distribution, conditioned on ``prompt``'s constraints if given.

    Free attributes are uniform; object colours differ from each other and never equal the
    background's; in training (``train=True``) the held-out colour-shape pairs are excluded.
    """
    wanted = list(prompt.objects) if prompt is not None else None
    n = len(wanted) if wanted else (n_objects or int(rng.integers(1, 3)))
    for _ in range(1000):
        bg = (
            prompt.background
            if prompt is not None and prompt.background
            else str(rng.choice(list(BACKGROUNDS)))
        )
        objs = []
        for i in range(n):
            c, s = wanted[i] if wanted else (None, None)
            c = c or str(rng.choice(list(COLOURS)))
            s = s or str(rng.choice(SHAPES))
            objs.append((c, s))
        colours = [c for c, _ in objs]
        if len(set(colours)) < n or bg in colours:
            continue
        if train and any(pair in HELD_OUT for pair in objs):
            continue
        if n == 2 and objs[0] == objs[1]:
            continue
        break
    else:
        raise ValueError(
            f"prompt {prompt.text if prompt else ''!r} cannot be satisfied"
            + (" in training (held-out pair)" if train else "")
        )
    big = n == 1
    sizes = [float(rng.uniform(5, 11) if big else rng.uniform(4, 7)) for _ in range(n)]
    pts = _place(rng, n, sizes)
    jitter = tuple(
        tuple(int(v) for v in rng.integers(-JITTER, JITTER + 1, 3)) for _ in range(n + 1)
    )
    return Scene(
        tuple(Obj(c, s, r, x, y) for (c, s), r, (x, y) in zip(objs, sizes, pts)), bg, jitter
    )


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _size_word(o: Obj, n: int) -> str:
    lo, hi = (5, 11) if n == 1 else (4, 7)
    return (
        "small" if o.size < lo + (hi - lo) / 3 else "large" if o.size > hi - (hi - lo) / 3 else ""
    )


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of several templates; some omit the background, the colour or (for one object) both."""
    objs, bg = scene.objects, scene.background
    name = lambda o: str(rng.choice(SYNONYMS[o.shape]))
    if len(objs) == 1:
        o = objs[0]
        s, c, z = name(o), o.colour, _size_word(o, 1)
        options = [
            f"{_a(c)} {s} on a {bg} background",
            f"{c} {s}, {bg} backdrop",
            f"{_a(c)} {s} on {bg}",
            f"{bg} background with {_a(c)} {s}",
            f"{_a(c)} {s}",
            _a(s),
            f"{_a(s)} on a {bg} background",
        ]
        if z:
            options.append(f"{_a(z)} {c} {s}")
        return str(rng.choice(options))
    a, b = objs
    sa, sb = name(a), name(b)
    options = [
        f"{_a(a.colour)} {sa} and {_a(b.colour)} {sb}",
        f"{_a(a.colour)} {sa} and {_a(b.colour)} {sb} on a {bg} background",
        f"{a.colour} {sa}, {b.colour} {sb}, {bg} backdrop",
        f"{_a(sa)} and {_a(sb)}",
    ]
    return str(rng.choice(options))


_SHAPE_OF = {w: s for s, ws in SYNONYMS.items() for w in ws}
_FILLER = {"a", "an", "and", "on", "with", "background", "backdrop", "small", "large", "the", "of"}


def parse_prompt(text: str) -> Prompt:
    """The constraints a caption states. Colours bind to the next shape word; a colour followed by
    'background' or 'backdrop', or preceding 'background with', or after 'on', is the background."""
    words = re.findall(r"[a-z]+", text.lower())
    words = [COLOUR_WORDS.get(w, w) for w in words]
    objects, background, colour = [], None, None
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        prev = words[i - 1] if i else ""
        if w in BACKGROUNDS and (nxt in ("background", "backdrop") or prev == "on"):
            background = w
        elif w in COLOURS:
            if colour is not None:
                raise ValueError(f"prompt {text!r}: colour {colour!r} is not followed by a shape")
            colour = w
        elif w in _SHAPE_OF:
            objects.append((colour, _SHAPE_OF[w]))
            colour = None
        elif w in _FILLER or w in BACKGROUNDS:
            continue
        else:
            raise ValueError(
                f"prompt {text!r}: unknown word {w!r}; the toy world knows colours "
                f"{', '.join(COLOURS)}, shapes {', '.join(_SHAPE_OF)} and backgrounds "
                f"{', '.join(BACKGROUNDS)}"
            )
    if colour is not None:
        raise ValueError(f"prompt {text!r}: colour {colour!r} is not followed by a shape")
    if not 1 <= len(objects) <= 2:
        raise ValueError(f"prompt {text!r} names {len(objects)} shapes; the toy world has 1 or 2")
    return Prompt(tuple(objects), background, text)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, index]))


def example(seed: int, index: int, train: bool = True) -> tuple[np.ndarray, str, Scene]:
    """The index-th (image, caption, scene) of the dataset with this seed."""
    rng = scene_rng(seed, index)
    scene = random_scene(rng, train=train)
    return render(scene), caption(scene, rng), scene


def sample_for_prompt(prompt: Prompt | str, n: int, seed: int = 0) -> tuple[np.ndarray, list]:
    """n true images [n, 32, 32, 3] for a prompt (free attributes drawn uniformly), and their
    scenes."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    scenes = [random_scene(scene_rng(seed, 10_000_000 + i), p, train=False) for i in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    words = set(_FILLER) | set(COLOURS) | set(BACKGROUNDS) | set(_SHAPE_OF) | set(COLOUR_WORDS)
    return sorted(words)


def captions(n: int = 256, seed: int = 7) -> list[str]:
    """n captions of independent random training scenes: the toy world's own prompts, e.g. as ICG's
    stand-in conditions."""
    rng = np.random.default_rng(seed)
    return [caption(random_scene(rng, train=True), rng) for _ in range(n)]
