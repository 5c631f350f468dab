"""Normalized Attention Guidance (Chen, Bandyopadhyay, Zou, Song 2025, arXiv 2505.21179)."""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from ..core.guided import Branch, Guidance, Point, _fit
from ..core.registry import register
from .perturb import (
    CACHE_LOCAL,
    _active,
    _cached,
    _hooked,
    _index,
    _module,
    _pack,
    _streams,
    _unperturbed,
)
from .perturb import in_window

# cross-attention networks, with the modules that turn a text encoding into what their attn2 reads
CROSS = {
    "UNet2DConditionModel": (),
    "PixArtTransformer2DModel": ("caption_projection",),
    "SanaTransformer2DModel": ("caption_projection", "caption_norm"),
}
JOINT = ("SD3Transformer2DModel", "FluxTransformer2DModel")  # text and image in one attention
EPS = 1e-6  # the authors' floor under both L1 norms (ComfyUI-NAG utils.nag)
BLOCK_INPUTS = ("hidden_states", "encoder_hidden_states", "temb")  # SD3's and Flux's blocks
_SINGLE: weakref.WeakSet = weakref.WeakSet()  # Flux's single-stream blocks
# this thread's negatives held for the next forward ("held") and a forward's negative activations
# ("state"), by perturbation: both let go when the forward leaves (``release``)
_LOCAL = threading.local()
# the condition NAG reads as its negative where a run has one apart from "neg": a pipeline's call
# without a negative prompt where "neg" also feeds a branch (nag:cfg= on SDXL, whose branch reads
# zeros while NAG reads the empty prompt's encoding, as the authors do)
NAG_NEGATIVE = "neg.nag"


@register("guidance", "nag")
@dataclass(frozen=True)
class NAG(Guidance):
    """NAG (Chen et al. 2025): one conditional branch, inside whose cross-attention (or joint
    attention's image part) the negative prompt's output Z- is computed beside Z+;
    Z~ = Z+ + phi (Z+ - Z-) with phi = scale - 1 (the authors' code's nag_scale: 1 is neutral),
    shrunk per token to tau times Z+'s L1 norm, and alpha Z~ + (1 - alpha) Z+ replaces Z+
    (``normalized``). ``cfg`` != 1 adds an unconditional branch without NAG: U + cfg (C_nag - U),
    the authors' NAG with CFG, in the same forward. Defaults: the authors' ComfyUI nodes (their
    diffusers pipelines use alpha 0.5 on SDXL, 0.125 on SD3, 0.25 on Flux); all layers, during
    steps start n < i < stop n (all by default)."""

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    cfg: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    reads_negative = True  # the negative prompt is read inside C's forward, not as a branch

    def __post_init__(self):
        for name in ("scale", "cfg"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"NAG {name} must be a finite number, got {getattr(self, name)!r}")
        if not 0 < self.tau < math.inf:
            raise ValueError(f"NAG tau must be > 0 (a cap on the L1 norm ratio), got {self.tau!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"NAG alpha must be in [0, 1], got {self.alpha!r}")
        if not 0 <= self.start <= self.stop <= 1:
            raise ValueError(f"need 0 <= start <= stop <= 1, got {self.start!r}, {self.stop!r}")

    @cached_property
    def _perturb(self):
        return NormalizedAttention(self.scale, self.tau, self.alpha)

    def check(self, models) -> None:
        self._perturb.layout(models["main"])  # an unsupported network fails before sampling

    def _on(self, pt: Point) -> bool:  # scale 1 or alpha 0 leave Z+ as it is: skip the work
        return self.scale != 1 and self.alpha != 0 and in_window(pt, self.start, self.stop)

    def init_state(self):
        self._perturb.release()  # nothing of an earlier run of this thread stays held
        return None

    def conditions(self, pt, conds, x, noise):
        if self._on(pt):  # the hooks read the negative of each conditional row from here
            neg = conds.get(NAG_NEGATIVE)
            self._perturb.hold(conds.get("neg") if neg is None else neg, x.shape[0])
        return {}

    def branches(self, pt: Point, state=None):
        c = Branch("pos", perturb=self._perturb) if self._on(pt) else Branch("pos")
        return {"c": c} if self.cfg == 1 else {"c": c, "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        self._perturb.release()  # where no forward held NAG's rows (another process's share)
        c, u = preds["c"], preds.get("u")
        return (c if u is None else u + self.cfg * (c - u)), state


def normalized(pos, neg, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG on attention outputs [..., tokens, channels] (heads merged, before the output
    projection): Z~ = scale Z+ - (scale - 1) Z-, scaled by min(r, tau) / r with r the ratio of the
    L1 norms over channels of Z~ and Z+ (each floored at 1e-6), then alpha Z~ + (1 - alpha) Z+."""
    p, n = pos.float(), neg.float()
    g = scale * p - (scale - 1) * n
    r = g.norm(p=1, dim=-1, keepdim=True).clamp_min(EPS) / p.norm(
        p=1, dim=-1, keepdim=True
    ).clamp_min(EPS)
    g = g * (r.clamp(max=tau) / r)
    return (alpha * g + (1 - alpha) * p).to(pos.dtype)


def _field(cond, key: str):
    """A condition's entry: a bare tensor is the text encoding (encoder_hidden_states)."""
    if isinstance(cond, torch.Tensor):
        return cond if key == "text" else None
    return cond.get(key) if isinstance(cond, dict) else None


def _state(key) -> dict:
    return _LOCAL.__dict__.setdefault("state", {}).setdefault(key, {})


def _rows_of(rows, t, extra: int = 0):
    """(b, indices of the NAG rows) of this forward, checking that t holds b + extra rows."""
    b = len(rows.flags)
    if t.shape[0] != b + extra:
        raise ValueError(
            f"NAG expected {b + extra} rows in a layer of a {b}-row forward, got {t.shape[0]}: "
            "another method on the same layers changes their batch"
        )
    return b, _index(rows)


def _batched(a, b: int) -> bool:
    return torch.is_tensor(a) and a.ndim > 0 and a.shape[0] == b


def _bind(args, kwargs, names):
    """The first inputs of a call by name, positional or keyword."""
    return [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]


def _rebind(args, kwargs, names, values):
    """args and kwargs with the inputs ``names`` replaced by ``values``, where they were given."""
    args, kwargs = list(args), dict(kwargs)
    for i, (n, v) in enumerate(zip(names, values)):
        if i < len(args):
            args[i] = v
        else:
            kwargs[n] = v
    return tuple(args), kwargs


@dataclass(frozen=True)
class NormalizedAttention:
    """NAG's perturbation of the conditional rows (rowwise: U and other branches share the
    forward). Cross-attention (UNet attn2, PixArt, Sana): each layer runs k extra rows, the NAG
    rows' queries against the negative context as that layer reads it. Joint attention (SD3,
    Flux): as the authors' code, the negative text runs as its own text stream, k extra rows of
    every block (its adaLN from the negative's pooled embedding), with the image queries of its
    row's conditional image in the joint blocks; in Flux's single-stream blocks the extra rows
    carry their own sequence from the last joint block's image on, their image attention output
    set to the guided one too. ``normalized`` mixes each pair before the output projection."""

    scale: float
    tau: float
    alpha: float
    rowwise = True
    # all its rows in one forward (pipelines.parallel_layout refuses a layout of processes that
    # could split them, before sampling; max_batch at the first forward)
    one_process = "NAG's conditional rows"

    def hold(self, neg, b: int) -> None:
        """The run's negative condition (b rows) for this thread's next forward with NAG's rows
        (its conditional rows are all in one: the forward lets it go, ``release``)."""
        held = _LOCAL.__dict__.setdefault("held", {})
        held[self] = (None if neg is None else _fit(neg, b, "neg"), b)

    def release(self) -> None:
        """This thread's held negative and the negative's activations let go: when a forward with
        NAG's rows leaves, having run or raised, and when a run starts."""
        for name in ("held", "state"):
            getattr(_LOCAL, name, {}).pop(self, None)

    def _negative(self, rows):
        neg, b = getattr(_LOCAL, "held", {}).get(self, (None, 0))
        if neg is None:
            raise ValueError(
                "NAG reads the negative prompt inside the conditional forward: give a negative "
                "prompt (uncond= with a bare denoiser)"
            )
        if sum(rows.flags) != b:
            raise ValueError(
                f"NAG needs its {b} conditional rows in one forward, got {sum(rows.flags)}: raise "
                "max_batch, and run it without parallel branches or a step cache"
            )
        return neg

    def layout(self, denoiser) -> dict:
        net = _module(denoiser, "NAG")
        return _cached(net, ("nag",), lambda: _layout(net))

    targets = layout

    def apply(self, denoiser, noise, rows):
        net, lay = _module(denoiser, "NAG"), self.layout(denoiser)
        stack = contextlib.ExitStack()
        stack.callback(self.release)  # last out: after the hooks, whether the forward ran or raised

        def hook(mods, role, fn, pre=False):
            if pre:
                install = lambda m: m.register_forward_pre_hook(fn, with_kwargs=True)  # noqa: E731
            else:
                install = lambda m: m.register_forward_hook(fn, with_kwargs=True)  # noqa: E731
            stack.enter_context(_hooked(mods, (role, self), install, rows))

        hook([net], "nag-net", self._start, pre=True)
        if "attn" in lay:
            hook(lay["attn"], "nag-in", self._cross_in, pre=True)
            hook([a.to_out[0] for a in lay["attn"]], "nag-mix", self._mix, pre=True)
            hook(lay["attn"], "nag-out", self._cross_out)
            return stack
        joint, blocks = lay["joint"], lay["joint"] + lay["single"]
        hook([net.context_embedder], "nag-text", self._text)
        hook([net.time_text_embed], "nag-temb", self._temb)
        hook(blocks, "nag-block-in", self._block_in, pre=True)
        hook(blocks, "nag-block-out", self._block_out)
        hook([b.attn for b in joint], "nag-tie", self._tie, pre=True)
        hook([b.attn.to_out[0] for b in joint], "nag-mix", self._mix, pre=True)
        hook([b.attn for b in lay["single"]], "nag-single", self._single)
        return stack

    # -- the network's entry: the negative as the layers read it -----------------------------
    def _start(self, net, args, kwargs):
        rows = _active(net, ("nag-net", self))
        if rows is None:
            return None
        st = _LOCAL.__dict__.setdefault("state", {})[self] = {"neg": self._negative(rows)}
        prep = _cached(net, ("nag",), lambda: _layout(net)).get("prep")
        if prep is None:  # joint attention: the embedders' hooks start the negative text stream
            if getattr(CACHE_LOCAL, "forward", None) is not None:
                raise ValueError("NAG on SD3 and Flux runs without a step cache (cache=None)")
            return None
        # the forward's signature, read once per network (not at every step)
        sig = _cached(net, ("nag-signature",), lambda: inspect.signature(net.forward))
        given = sig.bind_partial(*args, **kwargs).arguments
        pos = given.get("encoder_hidden_states")
        if pos is None:
            raise ValueError(f"NAG found no encoder_hidden_states given to {type(net).__name__}")
        ctx = _field(st["neg"], "text").to(pos.device, pos.dtype)
        with _unperturbed():
            for name in prep:  # PixArt's and Sana's caption projection (and norm)
                ctx = getattr(net, name)(ctx)
        mask = _field(st["neg"], "mask")
        if mask is not None and mask.ndim == 2:  # a padding mask made a bias as PixArt and Sana do
            mask = ((1 - mask.to(pos.dtype)) * -10000.0).unsqueeze(1)
        st["ctx"], st["bias"] = ctx, mask
        return None

    # -- cross-attention --------------------------------------------------------------------
    def _cross_in(self, attn, args, kwargs):
        rows = _active(attn, ("nag-in", self))
        if rows is None:
            return None
        names = ("hidden_states", "encoder_hidden_states", "attention_mask")
        h, e, mask = _bind(args, kwargs, names)
        b, idx = _rows_of(rows, h)
        st = _state(self)
        ctx, bias = st["ctx"], st["bias"]
        if len(ctx) != idx.numel():  # a step cache ran this layer on some of the rows
            raise ValueError("NAG needs all its conditional rows in every layer; use no step cache")
        if e is None or e.shape[1:] != ctx.shape[1:]:
            raise ValueError(
                f"NAG needs the negative prompt encoded like the prompt, {tuple(ctx.shape[1:])} "
                f"vs {None if e is None else tuple(e.shape[1:])} in a cross-attention layer"
            )
        if mask is not None or bias is not None:  # each part's padding bias (zeros: none)
            zeros = e.new_zeros(b, 1, e.shape[1]) if mask is None else mask
            mask = torch.cat(
                [zeros, ctx.new_zeros(len(ctx), 1, ctx.shape[1]) if bias is None else bias]
            )
        new = (torch.cat([h, h.index_select(0, idx)]), torch.cat([e, ctx]), mask)
        return _rebind(args, kwargs, names, new)

    def _cross_out(self, attn, args, kwargs, out):
        rows = _active(attn, ("nag-out", self))
        return None if rows is None else out[: len(rows.flags)]

    def _mix(self, proj, args, kwargs):
        """Before the output projection: Z+ of the NAG rows mixed with Z- of the extra rows."""
        rows = _active(proj, ("nag-mix", self))
        if rows is None:
            return None
        z = args[0]
        b, idx = _rows_of(rows, z, sum(rows.flags))
        guided = normalized(z.index_select(0, idx), z[b:], self.scale, self.tau, self.alpha)
        return (z.index_copy(0, idx, guided), *args[1:]), kwargs

    # -- joint attention: the negative's own text stream --------------------------------------
    def _text(self, embedder, args, kwargs, out):
        if _active(embedder, ("nag-text", self)) is None:
            return None
        st = _state(self)
        with _unperturbed():
            st["e"] = embedder(_field(st["neg"], "text").to(args[0].device, args[0].dtype))
        st["image"] = None
        return None

    def _temb(self, embedder, args, kwargs, out):
        """The negative rows' adaLN input: their row's time (and guidance), the negative's pooled
        text embedding (the authors concatenate the pooled embeddings)."""
        rows = _active(embedder, ("nag-temb", self))
        if rows is None:
            return None
        st, b, idx = _state(self), len(rows.flags), _index(rows)
        pooled = _field(st["neg"], "pooled")
        if pooled is None or len(args) < 2:
            raise ValueError("NAG on SD3 and Flux needs the negative's pooled text embedding")
        same = [a.index_select(0, idx) if _batched(a, b) else a for a in args]
        with _unperturbed():
            st["temb"] = embedder(*same[:-1], pooled.to(args[-1].device, args[-1].dtype), **kwargs)
        return None

    def _block_in(self, block, args, kwargs):
        rows = _active(block, ("nag-block-in", self))
        if rows is None:
            return None
        h, e, temb = _bind(args, kwargs, BLOCK_INPUTS)
        b, idx = _rows_of(rows, h)
        if _active(block, "slg") is not None:  # its hook reads the block's batch as the forward's
            raise ValueError(
                "NAG on SD3 and Flux does not combine with skipped blocks (SLG, STG-R)"
            )
        st = _state(self)
        if st.get("e") is None or e is None or st["e"].shape[1:] != e.shape[1:]:
            raise ValueError(
                "NAG needs the negative prompt encoded to the prompt's length in every block "
                f"({None if e is None else e.shape[1]} tokens)"
            )
        single = block in _SINGLE
        image = st["image"] if single and st["image"] is not None else h.index_select(0, idx)
        st["text_len"] = e.shape[1]
        new = (torch.cat([h, image]), torch.cat([e, st["e"]]), torch.cat([temb, st["temb"]]))
        return _rebind(args, kwargs, BLOCK_INPUTS, new)

    def _block_out(self, block, args, kwargs, out):
        rows = _active(block, ("nag-block-out", self))
        if rows is None:
            return None
        b, st = len(rows.flags), _state(self)
        image, text = _streams(block, out)
        st["e"] = None if text is None else text[b:]  # the negative text stream goes on
        st["image"] = image[b:] if block in _SINGLE else None
        return _pack(block, image[:b], None if text is None else text[:b], out)

    def _tie(self, attn, args, kwargs):
        """Joint attention: the extra rows' image queries, keys and values are their NAG row's
        (normalised with its own adaLN), as the authors tile them."""
        rows = _active(attn, ("nag-tie", self))
        if rows is None:
            return None
        (h,) = _bind(args, kwargs, ("hidden_states",))
        b, idx = _rows_of(rows, h, sum(rows.flags))
        return _rebind(
            args, kwargs, ("hidden_states",), (torch.cat([h[:b], h.index_select(0, idx)]),)
        )

    def _single(self, attn, args, kwargs, out):
        """Flux's single-stream attention (no output projection): the image part of both rows of
        a pair becomes the guided one."""
        rows = _active(attn, ("nag-single", self))
        if rows is None:
            return None
        b, idx = _rows_of(rows, out, sum(rows.flags))
        n = _state(self)["text_len"]
        image = out[:, n:]
        guided = normalized(image.index_select(0, idx), image[b:], self.scale, self.tau, self.alpha)
        image = torch.cat([image[:b].index_copy(0, idx, guided), guided])
        return torch.cat([out[:, :n], image], dim=1)


def _layout(net) -> dict:
    """The layers NAG acts on: every cross-attention (attn2) with the modules preparing its
    context, or SD3's and Flux's joint blocks (and Flux's single-stream ones)."""
    names = {c.__name__ for c in type(net).__mro__}
    for cls, prep in CROSS.items():
        if cls in names:
            if getattr(net, "encoder_hid_proj", None) is not None:
                raise ValueError("NAG is not built for a UNet with encoder_hid_proj (IP-Adapter)")
            attn = [
                m
                for n, m in net.named_modules()
                if n.rsplit(".", 1)[-1] == "attn2" and getattr(m, "is_cross_attention", False)
            ]
            if not attn:
                raise ValueError(f"NAG found no cross-attention layer in {type(net).__name__}")
            return {"attn": attn, "prep": prep}
    if names & set(JOINT):
        single = list(getattr(net, "single_transformer_blocks", []))
        _SINGLE.update(single)
        return {"joint": list(net.transformer_blocks), "single": single}
    raise ValueError(
        "NAG is built for the cross-attention of UNets (SD, SDXL), PixArt and Sana and the joint "
        f"attention of SD3 and Flux, not for {type(net).__name__}"
    )
