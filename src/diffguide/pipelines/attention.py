"""Attention maps of a diffusers network, captured through attention processors.

``capture(net, size)`` installs, for the duration of a ``with`` block, processors that compute the
attention probabilities explicitly at the layers whose query grid is ``size`` (h, w) and keep them
(differentiable); every other layer keeps its own processor. On exit the original processors are
restored, so the model is unchanged afterwards. No global patching.
"""

from __future__ import annotations

import contextlib

import torch


class _Keep:
    """An attention processor that records head-averaged probabilities at one query grid."""

    def __init__(self, inner, store: dict, n: int):
        self.inner, self.store, self.n = inner, store, n

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        q_len = (
            hidden_states.shape[2] * hidden_states.shape[3]
            if hidden_states.ndim == 4
            else hidden_states.shape[1]
        )
        if q_len != self.n:
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four = hidden_states.ndim == 4
        if four:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = (
            attn.head_to_batch_dim(f(s))
            for f, s in ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context))
        )
        probs = attn.get_attention_scores(q, k, mask)  # [batch * heads, queries, keys]
        heads = attn.heads
        kind = "self" if encoder_hidden_states is None else "cross"
        self.store[kind].append(probs.view(-1, heads, *probs.shape[1:]).float().mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if four:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def capture(net, size: tuple[int, int]):
    """Yields a dict {"self": [...], "cross": [...]} of [batch, h*w, keys] maps, one per layer and
    call, at the layers whose query grid is ``size``."""
    if not hasattr(net, "attn_processors") or not net.attn_processors:
        raise ValueError(f"{type(net).__name__} has no diffusers attention processors to capture")
    original = dict(net.attn_processors)
    store = {"self": [], "cross": []}
    n = size[0] * size[1]
    net.set_attn_processor({name: _Keep(p, store, n) for name, p in original.items()})
    try:
        yield store
    finally:
        net.set_attn_processor(original)


def resolutions(net, latent: tuple[int, int]) -> list[tuple[int, int]]:
    """Query grids (h, w) at which a UNet2DConditionModel has cross-attention, finest first."""
    cfg = net.config
    types = list(getattr(cfg, "down_block_types", ()) or ())
    grids = set()
    for i, t in enumerate(types):
        if "CrossAttn" in t:
            grids.add(i)
    if "CrossAttn" in str(getattr(cfg, "mid_block_type", "") or ""):
        grids.add(len(types) - 1)
    for i, t in enumerate(getattr(cfg, "up_block_types", ()) or ()):
        if "CrossAttn" in t:
            grids.add(len(types) - 1 - i)
    return [(latent[0] // 2**i, latent[1] // 2**i) for i in sorted(grids)]


def choose(net, latent: tuple[int, int]) -> tuple[int, int]:
    """InitNO's grid: a quarter of the latent's side (16x16 for SD at 512 px) where the network has
    cross-attention there, else the nearest grid it has."""
    grids = resolutions(net, latent)
    if not grids:
        raise ValueError(f"InitNO needs a UNet with cross-attention; {type(net).__name__} has none")
    target = latent[0] // 4
    return min(grids, key=lambda g: (abs(g[0] - target), g[0]))
