"""Branch perturbations inside the network: identity self-attention (PAG), blurred queries (SEG),
skipped blocks (SLG). Each acts on chosen rows of a forward pass only, so a perturbed branch runs
in the same batched forward as the plain ones (``rowwise``).

They work through forward hooks on diffusers modules found by duck typing (``to_q``/``to_v``/
``to_out`` attention modules, ``transformer_blocks`` lists), so UNets and the transformer families
share them. Hooks are installed on entry and removed on exit, reference-counted across threads;
a hook only acts for the thread (and forward) that entered the perturbation, so a concurrent plain
forward of the same network in another thread is unaffected.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from ..core.guided import Branch, Guidance, Point, constant, row_mask

# dual-stream blocks return (text, image) (SD3, Flux, Qwen-Image); these return (image, text)
IMAGE_FIRST = frozenset(
    {
        "CogVideoXBlock",
        "CogView4TransformerBlock",
        "HunyuanVideoTransformerBlock",
        "HunyuanVideoSingleTransformerBlock",
        "HunyuanVideoTokenReplaceTransformerBlock",
        "HunyuanVideoTokenReplaceSingleTransformerBlock",
        "HunyuanImageTransformerBlock",
        "MochiTransformerBlock",
    }
)


def _streams(block, out):
    """(image, text) of a block's output (text None for a one-stream block)."""
    if not isinstance(out, tuple):
        return out, None
    return (out[0], out[1]) if type(block).__name__ in IMAGE_FIRST else (out[1], out[0])


def _pack(block, image, text, like):
    """An output shaped as the block's own ``like``: a tensor, or its two streams in its order."""
    if not isinstance(like, tuple):
        return image
    return (image, text) if type(block).__name__ in IMAGE_FIRST else (text, image)


_LOCK = threading.Lock()
_INSTALLED: dict = {}  # (id(module), kind) -> [undo, users]
_LOCAL = threading.local()
# the step cache's forward in this thread (cache.base sets it; NAG on joint attention reads it)
CACHE_LOCAL = threading.local()


def _active(module, kind):
    """The rows mask this thread applies to ``module`` for ``kind``, or None."""
    return getattr(_LOCAL, "acts", {}).get((id(module), kind))


@contextlib.contextmanager
def installed(modules, kind, install):
    """``install(module)`` (returns what undoes it) in place while any thread is inside: run once
    per (module, kind) across threads, undone when the last one leaves. The perturbations' hooks
    and the step caches' wrappers both live by it."""
    keys = [(id(m), kind) for m in modules]
    with _LOCK:
        for m, key in zip(modules, keys):
            if key not in _INSTALLED:
                _INSTALLED[key] = [install(m), 0]
            _INSTALLED[key][1] += 1
    try:
        yield
    finally:
        with _LOCK:
            for key in keys:
                entry = _INSTALLED[key]
                entry[1] -= 1
                if entry[1] == 0:
                    entry[0]()
                    del _INSTALLED[key]


@contextlib.contextmanager
def _hooked(targets, kind, install, rows):
    """Install ``install(module)`` (returns a hook handle) once per module across threads, and mark
    ``rows`` active for these modules in this thread."""
    if getattr(rows, "flags", None) is None:  # a mask given by hand: every active mask carries
        rows = row_mask(tuple(rows.tolist()), str(rows.device))  # its flags (``narrowed``)
    acts = _LOCAL.__dict__.setdefault("acts", {})
    keys = [(id(m), kind) for m in targets]
    with installed(targets, kind, lambda m: install(m).remove):
        saved = {k: acts.get(k) for k in keys}
        for k in keys:  # two perturbations of one kind on a layer (e.g. two PAG terms): the union
            acts[k] = rows if saved[k] is None else _union(rows, saved[k])
        try:
            yield
        finally:
            for k in keys:
                if saved[k] is None:
                    acts.pop(k, None)
                else:
                    acts[k] = saved[k]


def _union(a, b):
    """a | b as a ``row_mask``, made from the flags (no read of the masks)."""
    return row_mask(tuple(x or y for x, y in zip(a.flags, b.flags)), str(a.device))


_FOUND: "weakref.WeakKeyDictionary" = (
    weakref.WeakKeyDictionary()
)  # network -> {(what, layers): modules}


def _cached(net, key, find):
    """The layers ``find()`` picks in ``net``, found once per network and key (a forward pass
    should not walk every module by regular expression)."""
    per = _FOUND.setdefault(net, {})
    if key not in per:
        per[key] = find()
    return per[key]


@contextlib.contextmanager
def acting(acts: dict):
    """This thread's perturbations replaced by ``acts`` ({(id(module), kind): rows}) meanwhile."""
    saved = getattr(_LOCAL, "acts", {})
    _LOCAL.acts = acts
    try:
        yield
    finally:
        _LOCAL.acts = saved


def _unperturbed():
    """This thread's perturbations paused: a hook recomputing its own rows (a sub-batch) through
    submodules must not meet the hooks of other branches (SEG's on to_q) meant for the whole
    batch."""
    return acting({})


def narrowed(run: list, device: str) -> dict:
    """This thread's rowwise perturbations re-aimed at a sub-batch, the rows ``run`` of the forward
    in that order (for ``acting``): a step cache runs the later blocks on the rows that are not
    reused. Every active mask is a ``row_mask`` (``_hooked``), so its rows are read on the host."""
    sub = {}
    for key, rows in getattr(_LOCAL, "acts", {}).items():
        picked = tuple(rows.flags[i] for i in run)
        if any(picked):
            sub[key] = row_mask(picked, device)
    return sub


def _installer(hook, with_kwargs: bool = True):
    """module -> the handle of ``hook`` registered as its forward hook (what ``_hooked``
    installs)."""
    return lambda m: m.register_forward_hook(hook, with_kwargs=with_kwargs)


def _module(denoiser, method: str) -> torch.nn.Module:
    module = getattr(denoiser, "module", None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            f"{method} needs a denoiser with .module (the network) to hook its layers; "
            "NetDenoiser(..., module=net) or a GuidedPipeline provides it"
        )
    return module


def _is_self_attention(m) -> bool:
    return (
        hasattr(m, "to_q")
        and hasattr(m, "to_v")
        and hasattr(m, "processor")
        and not getattr(m, "is_cross_attention", False)
    )


def _items(layers: str) -> list[str]:
    return [s for s in re.split(r"[;\s]+", layers.strip()) if s]


def main_blocks(module) -> str:
    """The name of the network's block list: ``transformer_blocks`` (SD3, Flux, PixArt, CogVideoX)
    or ``blocks`` (Wan)."""
    names = dict(module.named_children())
    if "transformer_blocks" not in names and "blocks" in names:
        return "blocks"
    return "transformer_blocks"


def _pattern(item: str, top: str = "transformer_blocks") -> str:
    """An integer names a block of the network's block list ``top``; anything else is a regular
    expression searched in module names (diffusers' pag_applied_layers)."""
    return rf"(^|\.){top}\.{item}\." if item.isdigit() else item


def self_attention_layers(module, layers: str, method: str) -> list:
    """Self-attention modules matching ``layers`` as diffusers' PAG pipelines match
    pag_applied_layers (a regular expression searched in the module's name, except a bare number
    that equals the name's last part)."""
    found, top = [], main_blocks(module)
    for item in _items(layers):
        pat, hits = _pattern(item, top), []
        for name, m in module.named_modules():
            last, pl = name.rsplit(".", 1)[-1], pat.rsplit(".", 1)[-1]
            fake = last.isnumeric() and pl.isnumeric() and last == pl
            if _is_self_attention(m) and re.search(pat, name) and not fake:
                hits.append(m)
        if not hits:
            names = [n for n, m in module.named_modules() if _is_self_attention(m)]
            raise ValueError(
                f"{method} layer {item!r} matches no self-attention layer of "
                f"{type(module).__name__}; its self-attention layers are: "
                f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            )
        found += [m for m in hits if m not in found]
    return found


def blocks(module, layers: str, method: str) -> list:
    """Transformer blocks: an integer i is ``transformer_blocks.i``; other items are regular
    expressions searched in the names of the blocks (``...transformer_blocks.N``, also Flux's
    ``single_transformer_blocks.N``)."""
    named = [
        (n, m)
        for n, m in module.named_modules()
        if re.search(r"(transformer_blocks|(^|\.)blocks)\.\d+$", n)
    ]
    found, top = [], main_blocks(module)
    for item in _items(layers):
        if item.isdigit():
            hits = [m for n, m in named if n == f"{top}.{item}"]
        else:
            hits = [m for n, m in named if re.search(item, n)]
        if not hits:
            count = sum(1 for n, _ in named if re.fullmatch(rf"{top}\.\d+", n))
            raise ValueError(
                f"{method} layer {item!r} matches no transformer block of {type(module).__name__} "
                f"({count} in {top}; names such as {named[0][0] if named else 'none'})"
            )
        found += [m for m in hits if m not in found]
    return found


def default_layers(module) -> str:
    """'mid' on a UNet (the PAG and SEG papers' choice for SD), else the middle transformer
    block."""
    if hasattr(module, "mid_block"):
        return "mid"
    top = main_blocks(module)
    n = sum(1 for name, _ in module.named_modules() if re.fullmatch(rf"{top}\.\d+", name))
    return str(n // 2)


def _where(rows, a, b):
    """Rows of a where rows is set, else b (batch first)."""
    return torch.where(rows.view(-1, *([1] * (a.ndim - 1))), a, b)


def _index(rows) -> torch.Tensor:
    """The set rows' indices: ``row_mask``'s own (no read of the mask), else read from it."""
    index = getattr(rows, "row_index", None)
    return index if index is not None else rows.nonzero()[:, 0]


def _take(rows, t):
    """t's rows ``rows`` (a gather by index: no data-dependent shape on the device)."""
    return t if getattr(rows, "all_rows", False) else t.index_select(0, _index(rows))


def _put(rows, new, out):
    """out with its rows ``rows`` replaced by ``new`` (computed for those rows only)."""
    every = getattr(rows, "all_rows", None)
    if every if every is not None else bool(rows.all()):
        return new.to(out.dtype)
    return out.index_copy(0, _index(rows), new.to(out.dtype))


def _split_inputs(args, kwargs):
    h = kwargs.get("hidden_states", args[0] if args else None)
    e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return h, e


# PAG on joint attention (SD3, Flux, Qwen-Image: text and image tokens in one attention, each stream
# with its own projections). The paper replaces self-attention, i.e. the image-image block of the
# joint map; "diagonal" does just that (StableDiffusion3PAGPipeline's mask), "values" makes every
# token of both streams output its own value (diffusers' modular PAG guider's rule).
JOINT_RULES = {
    "diagonal": "image tokens attend to themselves and to the text; text attention unchanged",
    "values": "every token of both streams outputs its own value projection",
}


def check_joint_rule(joint: str) -> None:
    if joint not in JOINT_RULES:
        rules = "; ".join(f"{k} ({v})" for k, v in JOINT_RULES.items())
        raise ValueError(f"PAG joint={joint!r} is not a rule; choose one of: {rules}")


@dataclass(frozen=True)
class IdentityAttention:
    """PAG's perturbation (Ahn et al. 2024): the chosen self-attention layers' attention maps
    replaced
    by the identity (each token outputs its value projection), as diffusers' PAG processors do. On
    joint attention ``joint`` picks the rule (``JOINT_RULES``): "diagonal" (the default) as
    StableDiffusion3PAGPipeline, "values" as diffusers' modular PAG guider."""

    layers: str = "auto"
    joint: str = "diagonal"
    rowwise = True

    def __post_init__(self):
        check_joint_rule(self.joint)

    def targets(self, denoiser) -> list:
        net = _module(denoiser, "PAG")
        found = _cached(
            net,
            ("attention", self.layers),
            lambda: self_attention_layers(
                net, default_layers(net) if self.layers == "auto" else self.layers, "PAG"
            ),
        )
        if self.joint == "diagonal":
            _check_streams_apart(net, found)
        return found

    def apply(self, denoiser, noise, rows):
        hook = _diagonal_hook if self.joint == "diagonal" else _values_hook
        return _hooked(self.targets(denoiser), ("pag", self.joint), _installer(hook), rows)


def _check_streams_apart(net, found) -> None:
    """The diagonal rule needs the text and image tokens in separate inputs; a single-stream block
    (Flux's single_transformer_blocks) attends over one sequence holding both."""
    mixed = _cached(
        net,
        ("single_stream",),
        lambda: {
            id(m): n
            for n, m in net.named_modules()
            if re.search(r"(^|\.)single_transformer_blocks\.", n)
        },
    )
    names = [mixed[id(m)] for m in found if id(m) in mixed]
    if names:
        raise ValueError(
            f"PAG joint=diagonal cannot tell text from image tokens in {names[0]} (a single-stream "
            "block: one sequence holds both); choose transformer_blocks layers, or joint=values"
        )


def _values_hook(attn, args, kwargs, out):
    """PAG, joint=values: the perturbed rows' outputs are their value paths, in both streams."""
    rows = _active(attn, ("pag", "values"))
    if rows is None:
        return None
    h, e = _split_inputs(args, kwargs)
    with _unperturbed():
        ident = _value_path(attn, _take(rows, h))  # only the perturbed rows
        if not isinstance(out, tuple):
            return _put(rows, ident, out)
        enc = out[1]  # joint attention: (image stream, text stream)
        if e is not None and enc is not None and hasattr(attn, "add_v_proj"):
            ev = attn.add_v_proj(_take(rows, e))
            to_add = getattr(attn, "to_add_out", None)
            if to_add is not None and not getattr(attn, "context_pre_only", False):
                ev = to_add(ev)
            enc = _put(rows, ev, enc)
    return (_put(rows, ident, out[0]), enc, *out[2:])


def _diagonal_hook(attn, args, kwargs, out):
    """PAG, joint=diagonal: the perturbed rows' self-attention is the identity; on joint attention
    only the image-image block is (StableDiffusion3PAGPipeline)."""
    rows = _active(attn, ("pag", "diagonal"))
    if rows is None:
        return None
    h, e = _split_inputs(args, kwargs)
    if not isinstance(out, tuple):  # plain self-attention: the identity map
        with _unperturbed():
            return _put(rows, _value_path(attn, _take(rows, h)), out)
    if kwargs.get("attention_mask") is not None:
        raise ValueError(
            "PAG joint=diagonal does not combine with an attention_mask given to a joint "
            "attention layer; use joint=values"
        )
    mask = kwargs.get("encoder_hidden_states_mask")  # Qwen-Image's text padding
    mask = None if mask is None else _take(rows, mask).bool()
    with _unperturbed():
        image = _diagonal_attention(
            attn, _take(rows, h), _take(rows, e), mask, kwargs.get("image_rotary_emb")
        )
    return (
        _put(rows, image, out[0]),
        *out[1:],
    )  # a text query's row of the mask is whole: unchanged


def _diagonal_attention(attn, h, e, text_mask, rope):
    """The image stream's joint-attention output with the image-image block of the map masked to its
    diagonal: each image token attends to itself and to every text token
    (StableDiffusion3PAGPipeline's PAG processor), computed as a softmax over 1 + text logits
    instead of a full masked map.
    The layer's q/k norms apply, as in its own processor (diffusers' PAG processor skips them on
    every row, which only matters on layers that have them, e.g. SD3.5's)."""
    q, k, v = (
        _heads(attn, f(h), norm)
        for f, norm in ((attn.to_q, "norm_q"), (attn.to_k, "norm_k"), (attn.to_v, None))
    )
    if getattr(attn, "add_k_proj", None) is None:  # one set of projections for both (CogVideoX)
        text_k, text_v = (attn.to_k, "norm_k"), (attn.to_v, None)
    else:
        text_k, text_v = (attn.add_k_proj, "norm_added_k"), (attn.add_v_proj, None)
    kt, vt = (_heads(attn, f(e), norm) for f, norm in (text_k, text_v))
    if rope is not None:
        text_angles, image_angles = _rotary_tables(rope, e.shape[1], h.shape[1])
        q, k = _rotate(q, *image_angles), _rotate(k, *image_angles)
        kt = kt if text_angles is None else _rotate(kt, *text_angles)
    own = (q * k).sum(-1, keepdim=True)  # (b, n, heads, 1): the diagonal
    text = torch.einsum("bnhd,bthd->bnht", q, kt)
    if text_mask is not None:
        text = text.masked_fill(~text_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(torch.cat([own, text], -1).float() * q.shape[-1] ** -0.5, -1).to(v.dtype)
    o = (p[..., :1] * v + torch.einsum("bnht,bthd->bnhd", p[..., 1:], vt)).flatten(2)
    for layer in attn.to_out:  # projection, dropout
        o = layer(o)
    return o


def _heads(attn, x, norm):
    """(b, s, heads * d) -> (b, s, heads, d), with the layer's per-head q/k normalisation if it has
    one."""
    x = x.unflatten(-1, (attn.heads, -1))
    norm = getattr(attn, norm, None) if norm else None
    return x if norm is None else norm(x)


def _rotary_tables(rope, n_text, n_image=None):
    """(text, image) (cos, sin) tables over interleaved channel pairs from a joint layer's rotary
    embedding: Flux's one real (cos, sin) pair over the text-then-image sequence, Qwen-Image's
    complex (image, text) tables, or CogVideoX's image-only pair (text None: not rotated)."""
    a, b = rope
    if a.is_complex():
        return _cos_sin(b), _cos_sin(a)
    if n_image is not None and a.shape[0] == n_image != n_text + n_image:
        return None, (a, b)
    return (a[:n_text], b[:n_text]), (a[n_text:], b[n_text:])


def _cos_sin(freqs):
    return freqs.real.repeat_interleave(2, -1), freqs.imag.repeat_interleave(2, -1)


def _rotate(x, cos, sin):
    """x (b, s, heads, d) with each channel pair (2i, 2i+1) turned by its angle (rotary
    embedding)."""
    if cos.ndim != 2 or cos.shape[0] != x.shape[1]:
        raise ValueError(
            f"PAG joint=diagonal expects a (tokens, channels) rotary table for {x.shape[1]} "
            f"tokens, got {tuple(cos.shape)}; use joint=values"
        )
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return (xf * cos[:, None] + turned * sin[:, None]).to(x.dtype)


def _value_path(attn, h):
    """to_out(to_v(h)) with the processor's input and output handling (4-D inputs, group norm,
    residual connection, output rescaling)."""
    residual = h
    four_d = h.ndim == 4
    if four_d:
        b, c, hh, ww = h.shape
        h = h.view(b, c, hh * ww).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    v = attn.to_v(h)
    out = getattr(attn, "to_out", None)
    if out is not None:
        v = out[0](v)
        if len(out) > 1:
            v = out[1](v)
    if four_d:
        v = v.transpose(-1, -2).reshape(b, c, hh, ww)
    if getattr(attn, "residual_connection", False):
        v = v + residual
    return v / getattr(attn, "rescale_output_factor", 1.0)


@dataclass(frozen=True)
class BlurredQuery:
    """SEG's perturbation (Hong 2024): the chosen self-attention layers' queries blurred over the
    token grid by a Gaussian of std ``sigma`` tokens (kernel ceil(6 sigma) + 1 made odd, capped at
    the grid, reflect padding), as the authors' code does; sigma above ``inf_threshold`` replaces
    every query by their mean (the limit of infinite blur)."""

    layers: str = "auto"
    sigma: float = 100.0
    inf_threshold: float = 9999.0
    rowwise = True

    def _layers(self, denoiser) -> list:
        net = _module(denoiser, "SEG")
        layers = default_layers(net) if self.layers == "auto" else self.layers
        return _cached(
            net, ("attention", self.layers), lambda: self_attention_layers(net, layers, "SEG")
        )

    def targets(self, denoiser) -> list:
        return [m.to_q for m in self._layers(denoiser)]

    def apply(self, denoiser, noise, rows):
        net = _module(denoiser, "SEG")
        stack = contextlib.ExitStack()
        stack.enter_context(  # a joint layer's text tokens ahead of the image ones (CogVideoX)
            _hooked(
                self._layers(denoiser),
                "seg-prefix",
                lambda m: m.register_forward_pre_hook(_prefix_hook, with_kwargs=True),
                rows,
            )
        )
        stack.enter_context(  # the network's input shape: the token grid's frames and sides
            _hooked(
                [net],
                "seg-grid",
                lambda m: m.register_forward_pre_hook(_grid_hook, with_kwargs=True),
                rows,
            )
        )
        stack.enter_context(
            _hooked(
                self.targets(denoiser),
                ("seg", self.sigma, self.inf_threshold),
                _installer(self._hook, with_kwargs=False),
                rows,
            )
        )
        return stack

    def _hook(self, proj, args, out):
        rows = _active(proj, ("seg", self.sigma, self.inf_threshold))
        if rows is None:
            return None
        grid, text = getattr(_LOCAL, "grid", None), getattr(_LOCAL, "prefix", 0)
        q = _take(rows, out)
        blurred = blur_tokens(q[:, text:], self.sigma, self.inf_threshold, grid)
        return _put(rows, torch.cat([q[:, :text], blurred], 1) if text else blurred, out)


def _prefix_hook(attn, args, kwargs):
    """The text tokens a layer's query projection sees ahead of the image ones: a joint layer with
    one set of projections (CogVideoX) concatenates them; SD3's and Flux's project them apart."""
    _, e = _split_inputs(args, kwargs)
    shared = getattr(attn, "add_q_proj", None) is None
    _LOCAL.prefix = e.shape[1] if e is not None and shared and e.ndim == 3 else 0
    return None


def _grid_hook(net, args, kwargs):
    """Keep the latent's (frames, height, width) of this forward (a video's or an image's; a
    video's frames after its channels, or before them as CogVideoX takes them)."""
    x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
    _LOCAL.grid = None
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        return None
    frames = 1
    if x.ndim == 5:
        channels = getattr(getattr(net, "config", None), "in_channels", None)
        frames = x.shape[1] if x.shape[2] == channels and x.shape[1] != channels else x.shape[2]
    _LOCAL.grid = (frames, x.shape[-2], x.shape[-1])
    return None


def token_grid(n: int, grid) -> tuple[int, int, int] | None:
    """(frames, rows, columns) of n tokens laid out as the latent ``grid`` (frames, height,
    width), at whatever patch or downsampling this layer works: the frames' sides in the latent's
    proportion; None where n does not fit it."""
    if grid is None:
        return None
    f, h, w = grid
    if n % f:
        return None
    m = n // f
    rows = round(math.sqrt(m * h / w))
    return (f, rows, m // rows) if rows and rows * (m // rows) == m else None


def blur_tokens(q, sigma: float, inf_threshold: float = 9999.0, grid=None) -> torch.Tensor:
    """Gaussian blur of (B, N, C) tokens over each frame of their grid (SEG, eq. 9 and the
    authors' code): the latent's layout where ``grid`` (frames, height, width) fits, else a square
    grid of one frame."""
    b, n, c = q.shape
    shape = token_grid(n, grid)
    if shape is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"SEG blurs queries on each frame's token grid; this layer has {n} tokens, "
                f"which fit neither the latent's layout {grid} nor a square (choose other layers)"
            )
        shape = (1, side, side)
    f, rows, cols = shape
    frames = q.reshape(b, f, rows * cols, c).transpose(2, 3).reshape(b * f, c, rows, cols)
    if sigma > inf_threshold:
        frames = frames.mean(dim=(-2, -1), keepdim=True).expand_as(frames)
    else:
        k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        side = min(rows, cols)
        k = min(k, side - (side % 2 - 1))
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
        pdf = torch.exp(-0.5 * (x / sigma) ** 2)
        k1 = constant(tuple((pdf / pdf.sum()).tolist()), str(q.device), q.dtype)
        kernel = (k1[:, None] * k1[None, :]).expand(c, 1, k, k)
        frames = F.conv2d(F.pad(frames, [k // 2] * 4, mode="reflect"), kernel, groups=c)
    return frames.reshape(b, f, c, rows * cols).transpose(2, 3).reshape(b, n, c)


@dataclass(frozen=True)
class SkipBlocks:
    """SLG's perturbation (Stability AI, SD3.5): the chosen transformer blocks pass their inputs
    through unchanged, as StableDiffusion3Pipeline's skip_layers does."""

    layers: str = "auto"
    rowwise = True

    def targets(self, denoiser) -> list:
        net = _module(denoiser, "SLG")
        return _cached(net, ("blocks", self.layers), lambda: self._find(net))

    def _find(self, net) -> list:
        layers = self.layers
        if layers == "auto":
            n = sum(
                1
                for name, _ in net.named_modules()
                if re.fullmatch(rf"{main_blocks(net)}\.\d+", name)
            )
            layers = "7;8;9" if n >= 10 else default_layers(net)
            layers = "mid_block" if layers == "mid" else layers
        return blocks(net, layers, "SLG")

    def apply(self, denoiser, noise, rows):
        return _hooked(self.targets(denoiser), "slg", _installer(_skip_hook), rows)


def _skip_hook(block, args, kwargs, out):
    rows = _active(block, "slg")
    if rows is None:
        return None
    h, e = _split_inputs(args, kwargs)
    hid, enc = _streams(block, out)  # dual-stream blocks: (text, image), or (image, text) for some
    hid = _where(rows, h.to(hid.dtype), hid)
    if not isinstance(out, tuple):
        return hid
    enc = enc if enc is None or e is None else _where(rows, e.to(enc.dtype), enc)
    return _pack(block, hid, enc, out) + out[2:]


def in_window(pt: Point, start: float, stop: float) -> bool:
    """Step i of n is inside when start n < i < stop n (StableDiffusion3Pipeline's rule for SLG),
    from the first step when start is 0; always inside where the sampler reports no steps."""
    if pt.step is None:
        return True
    i, n = pt.step, pt.steps
    return (start == 0 or i > start * n) and i < stop * n


@dataclass(frozen=True)
class PerturbedGuidance(Guidance):
    """C + scale (C - P), P the conditional prediction under a perturbation of the network (PAG,
    SEG, SLG, as in their papers and diffusers' pipelines); only C is evaluated outside the step
    window [start, stop] (fractions of the steps) and at scale 0. Composed with CFG by ``+`` it is
    U + g (C - U) + scale (C - P) with C shared, and P runs in the same forward as C and U."""

    scale: float = 3.0
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        if not 0 <= self.start <= self.stop <= 1:
            raise ValueError(
                f"need 0 <= start <= stop <= 1 (fractions of the steps), got {self.start!r}, "
                f"{self.stop!r}"
            )
        layers = getattr(self, "layers", None)
        if isinstance(layers, str) and not _items(
            layers
        ):  # P would equal C, at the cost of a branch
            raise ValueError(
                f"layers={layers!r} names no layer, so the perturbed branch would change nothing "
                f"and cost an evaluation; name layers (e.g. layers=mid) or leave layers=auto"
            )

    def perturbation(self):
        raise NotImplementedError

    @cached_property
    def _perturb(self):
        return self.perturbation()  # built once, not at every evaluation

    def check(self, models) -> None:
        """Find the layers now, so that a bad name fails before sampling, not at the first step
        inside the window."""
        self._perturb.targets(models["main"])

    def branches(self, pt: Point, state=None):
        if self.scale == 0 or not in_window(pt, self.start, self.stop):
            return {"c": Branch("pos")}
        return {"c": Branch("pos"), "p": Branch("pos", perturb=self._perturb)}

    def combine(self, x, pt, preds, state):
        c = preds["c"]
        if "p" not in preds:
            return c, state
        return c + self.scale * (c - preds["p"]), state
