"""NAG (issue 37) against the authors' attention processors written out by hand: their batching
(the negative prompt's encoding appended to the prompt batch; on SD3 and Flux the adaLN of the
image stream truncated to the prompt rows, the timestep repeated for the negative rows, Flux's
image tokens tiled before the single-stream blocks) and their NAG step (ComfyUI-NAG utils.nag,
L1 norms). The reference is a plain conditional run of the network under those processors; ours is
diffguide's NAG on the untouched network, the same sampler and steps."""

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import diffguide as dg
from diffguide.guidance import nag as nag_module
from diffguide.guidance.nag import NAG_NEGATIVE, normalized
from diffguide.pipelines import GuidedPipeline, conditions, tiny

P = ["a red circle", "a blue square"]
N = ["blurry", "a green triangle"]
TOL = 1e-5
STEPS = 4
SCALE, TAU, ALPHA = 4.0, 1.5, 0.5  # tau low enough that the norm cap acts


def authors_nag(z_positive, z_negative, scale, tau, alpha):
    """ComfyUI-NAG utils.nag (the authors'), written out."""
    z_guidance = z_positive * scale - z_negative * (scale - 1)
    norm_positive = torch.norm(z_positive, p=1, dim=-1, keepdim=True).clamp_min(1e-6)
    norm_guidance = torch.norm(z_guidance, p=1, dim=-1, keepdim=True).clamp_min(1e-6)
    s = norm_guidance / norm_positive
    z_guidance = z_guidance * torch.minimum(s, s.new_full((1,), tau)) / s
    return z_guidance * alpha + z_positive * (1 - alpha)


class CrossNAG:
    """NAGAttnProcessor2_0 (nag/attention_nag.py): the context batch is [prompts, negatives] (or
    [uncond, prompts, negatives] with CFG); ``negative`` appends the negative's context and bias
    here instead (PixArt and Sana, whose forwards cannot take a longer text batch)."""

    def __init__(self, negative=None):
        self.negative = negative

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if self.negative is not None:
            ctx, bias = self.negative
            encoder_hidden_states = torch.cat([encoder_hidden_states, ctx])
            attention_mask = torch.cat([attention_mask, bias])
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        origin = batch_size - len(hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        if batch_size == 2 * origin:
            query = query.tile(2, 1, 1)
        else:
            query = torch.cat((query, query[origin : 2 * origin]), dim=0)
        query, key, value = (
            t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            for t in (query, key, value)
        )
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        negative = out[-origin:]
        positive = out[:origin] if batch_size == 2 * origin else out[origin : 2 * origin]
        guided = authors_nag(positive, negative, SCALE, TAU, ALPHA)
        out = guided if batch_size == 2 * origin else torch.cat((out[:origin], guided))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class JointNAG:
    """NAGJointAttnProcessor2_0 (the authors' SD3 processor): text batch [prompts, negatives],
    the image's queries, keys and values tiled for the negative rows."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        origin = len(encoder_hidden_states) - batch_size
        query, key, value = (
            attn.to_q(hidden_states),
            attn.to_k(hidden_states),
            attn.to_v(hidden_states),
        )
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        batch_size += origin
        query, key, value = (t.tile(2, 1, 1, 1) for t in (query, key, value))
        eq, ek, ev = (
            f(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        query, key, value = (torch.cat(p, dim=2) for p in ((query, eq), (key, ek), (value, ev)))
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden, context = out[:, : residual.shape[1]], out[:, residual.shape[1] :]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden = authors_nag(hidden[:origin], hidden[-origin:], SCALE, TAU, ALPHA)
        return attn.to_out[1](attn.to_out[0](hidden)), context


class FluxNAG:
    """NAGFluxAttnProcessor2_0 (src/attention_flux_nag.py) with the L1 step of the authors' later
    code: joint blocks as SD3's (text first); single-stream blocks hold [prompt rows, negative
    rows], whose image parts both become the guided one."""

    def __init__(self, text_len):
        self.text_len = text_len

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        joint = encoder_hidden_states is not None
        batch_size = (encoder_hidden_states if joint else hidden_states).shape[0]
        query, key, value = (
            attn.to_q(hidden_states),
            attn.to_k(hidden_states),
            attn.to_v(hidden_states),
        )
        if joint:
            query, key, value = (t.tile(2, 1, 1) for t in (query, key, value))
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            for t in (query, key, value)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        if joint:
            eq, ek, ev = (
                f(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = (torch.cat(p, dim=2) for p in ((eq, query), (ek, key), (ev, value)))
        query, key = (
            apply_rotary_emb(query, image_rotary_emb),
            apply_rotary_emb(key, image_rotary_emb),
        )
        origin = batch_size // 2
        halves = []
        for q, k, v in zip(query.chunk(2), key.chunk(2), value.chunk(2)):
            o = F.scaled_dot_product_attention(q, k, v)
            halves.append(o.transpose(1, 2).reshape(origin, -1, attn.heads * head_dim))
        positive, negative = halves
        n = encoder_hidden_states.shape[1] if joint else self.text_len
        image = authors_nag(positive[:, n:], negative[:, n:], SCALE, TAU, ALPHA)
        if joint:
            context = attn.to_add_out(torch.cat((positive[:, :n], negative[:, :n])))
            return attn.to_out[1](attn.to_out[0](image)), context
        positive[:, n:], negative[:, n:] = image, image
        return torch.cat((positive, negative))


TRUNC_X = "SD35AdaLayerNormZeroX"


def _truncate(module, args, kwargs):
    """The authors' Trunc* adaLN layers (src/normalization.py): the image stream's modulation
    reads the first (prompt) rows of temb."""
    x = args[0]
    emb = kwargs.get("emb", args[1] if len(args) > 1 else None)
    if emb is None or emb.shape[0] == x.shape[0]:
        return None
    if "emb" in kwargs:
        return args, {**kwargs, "emb": emb[: x.shape[0]]}
    return (x, emb[: x.shape[0]], *args[2:]), kwargs


def _repeat_time(module, args, kwargs):
    """Their pipelines expand the timestep (and guidance) to the text batch."""
    rows = args[-1].shape[0]
    return (*(a.repeat(rows // a.shape[0]) for a in args[:-1]), args[-1]), kwargs


def _tile_image(module, args, kwargs):
    """Flux: the image tokens tiled before the single-stream blocks (.tile(2, 1, 1))."""
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].tile(2, 1, 1)}


@contextlib.contextmanager
def authors(gp, neg, x):
    """The network under the authors' processors and hooks; yields the reference forward."""
    net, fam = gp.family.net, gp.family
    saved = {n: m.processor for n, m in net.named_modules() if hasattr(m, "processor")}
    handles = []
    forward = fam.forward
    if fam.name in ("sd", "sdxl"):
        for n, m in net.named_modules():
            if n.endswith("attn2"):
                m.processor = CrossNAG()

        def forward(x, tm, c):
            return fam.forward(x, tm, {**c, "text": torch.cat([c["text"], neg["text"]])})

    elif fam.name in ("pixart", "sana"):
        ctx = net.caption_projection(neg["text"])
        ctx = net.caption_norm(ctx) if fam.name == "sana" else ctx
        bias = ((1 - neg["mask"].float()) * -10000.0).unsqueeze(1)
        for n, m in net.named_modules():
            if n.endswith("attn2"):
                m.processor = CrossNAG((ctx, bias))
    else:
        flux = fam.name == "flux"
        for n, m in net.named_modules():
            if n.endswith(".attn"):
                m.processor = FluxNAG(neg["text"].shape[1]) if flux else JointNAG()
            if type(m).__name__ in ("AdaLayerNormZero", "AdaLayerNormContinuous", TRUNC_X):
                handles.append(m.register_forward_pre_hook(_truncate, with_kwargs=True))
        handles.append(
            net.time_text_embed.register_forward_pre_hook(_repeat_time, with_kwargs=True)
        )
        if flux:
            first = net.single_transformer_blocks[0]
            handles.append(first.register_forward_pre_hook(_tile_image, with_kwargs=True))

        def forward(x, tm, c):
            both = {**c, "text": torch.cat([c["text"], neg["text"]])}
            both["pooled"] = torch.cat([c["pooled"], neg["pooled"]])
            return fam.forward(x, tm, both)[: len(x)]

    try:
        yield forward
    finally:
        for h in handles:
            h.remove()
        for n, m in net.named_modules():
            if n in saved:
                m.processor = saved[n]


def _conds(gp, size=8):
    fam = gp.family
    pos, neg = fam.encode(P, N, 1, "cpu")
    pos, neg = fam.extra(pos, size * 2, size * 2), fam.extra(neg, size * 2, size * 2)
    if fam.name == "flux":  # Flux.1-dev's embedded guidance, in both
        pos, neg = fam.embed_guidance(pos, 3.5, 2), fam.embed_guidance(neg, 3.5, 2)
    return pos, neg


def _x(gp, size=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, gp.family.channels, size, size, generator=g)


SD35 = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}  # SD3.5's layers


@pytest.fixture(scope="module", params=["sd", "sdxl", "pixart", "sana", "sd3", "sd3.5", "flux"])
def family(request):
    if request.param == "sd3.5":
        return GuidedPipeline(tiny.sd3(net=SD35), progress=False)
    return GuidedPipeline(tiny.BUILDERS[request.param](), progress=False)


def test_nag_equals_the_authors_processors(family):
    gp = family
    den, (pos, neg), x = gp.net_denoiser, _conds(gp), _x(gp)
    ts = dg.timesteps(den.schedule, STEPS)
    nag = dg.get_guidance("nag", scale=SCALE, tau=TAU, alpha=ALPHA)
    with torch.no_grad():
        ours = dg.sample(dg.guide(den, nag, pos, neg), "euler", ts, x)
        plain = dg.sample(dg.guide(den, None, pos), "euler", ts, x)
        with authors(gp, neg, x) as forward:
            theirs = dg.sample(
                dg.guide(dataclasses.replace(den, forward=forward), None, pos), "euler", ts, x
            )
    scale = theirs.abs().max().clamp_min(1)  # the tiny PixArt's samples reach 250
    assert (ours - theirs).abs().max() < TOL * scale
    assert (plain - theirs).abs().max() > 10 * TOL * scale  # NAG's own effect: the test can fail


def test_nag_with_cfg_equals_the_authors_three_row_batch():
    """The authors' SDXL pipeline with CFG: latents [x, x], prompts [uncond, prompt, negative],
    NAG on the prompt row only, then u + g (c - u)."""
    gp = GuidedPipeline(tiny.sd(), progress=False)
    den, (pos, neg), x = gp.net_denoiser, _conds(gp), _x(gp)
    ts, g = dg.timesteps(den.schedule, STEPS), 3.0
    nag = dg.get_guidance("nag", scale=SCALE, tau=TAU, alpha=ALPHA, cfg=g)
    fam = gp.family

    def forward(x, tm, c):
        text = torch.cat([neg["text"], c["text"], neg["text"]])
        u, c = fam.forward(torch.cat([x, x]), torch.cat([tm, tm]), {**c, "text": text}).chunk(2)
        return u + g * (c - u)

    with torch.no_grad():
        guided = dg.guide(den, nag, pos, neg)
        ours = dg.sample(guided, "euler", ts, x)
        cfg = dg.sample(dg.guide(den, f"cfg:scale={g}", pos, neg), "euler", ts, x)
        with authors(gp, neg, x):
            theirs = dg.sample(
                dg.guide(dataclasses.replace(den, forward=forward), None, pos), "euler", ts, x
            )
    scale = theirs.abs().max().clamp_min(1)
    assert (ours - theirs).abs().max() < TOL * scale < 10 * TOL * scale < (cfg - theirs).abs().max()
    assert guided.nfe == 2 * STEPS and guided.forwards == STEPS  # U and C_nag in one forward


def test_the_step_is_the_authors_and_neutral_at_scale_1_or_alpha_0():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 3, 7, 16, generator=g), torch.randn(2, 3, 7, 16, generator=g)
    for scale, tau, alpha in [(5.0, 2.5, 0.25), (4.0, 1.0, 1.0), (2.0, 10.0, 0.5), (0.0, 1.5, 0.7)]:
        torch.testing.assert_close(
            normalized(pos, neg, scale, tau, alpha), authors_nag(pos, neg, scale, tau, alpha)
        )
    assert torch.equal(normalized(pos, neg, 3.0, 2.5, 0.0), pos)
    torch.testing.assert_close(normalized(pos, neg, 1.0, 2.5, 0.5), pos)


@pytest.fixture(scope="module")
def sd():
    return GuidedPipeline(tiny.sd(), progress=False)


def _run(gp, guidance, **kw):
    base = dict(prompt=P, negative_prompt=N, steps=3, seed=[0, 1], output_type="latent")
    return gp(**{**base, **kw}, guidance=guidance)


def test_one_branch_per_step_and_neutral_settings_are_plain_sampling(sd):
    plain, nag = _run(sd, "none"), _run(sd, "nag")
    assert nag.nfe == 3 and nag.forwards == 3  # the negative is read inside C's forward
    assert (nag.images - plain.images).abs().max() > 1e-3
    for neutral in ("nag:scale=1", "nag:alpha=0", "nag:start=1,stop=1"):
        out = _run(sd, neutral)
        torch.testing.assert_close(out.images, plain.images, rtol=0, atol=0)
        assert out.nfe == 3
    # no negative prompt: the pipeline encodes the empty one for NAG, as the authors' do
    empty = _run(sd, "nag", negative_prompt=None)
    assert empty.nfe == 3 and (empty.images - plain.images).abs().max() > 1e-3


def test_nag_composes_with_a_perturbed_branch_in_one_forward(sd):
    out = _run(sd, "nag+pag:scale=2")
    assert out.nfe == 9 and out.forwards == 3  # C, C_nag and P


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(tau=0), r"NAG tau must be > 0"),
        (dict(alpha=1.5), r"NAG alpha must be in \[0, 1\]"),
        (dict(scale=float("inf")), r"NAG scale must be a finite number"),
        (dict(start=0.8, stop=0.2), r"need 0 <= start <= stop <= 1"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as err:
        dg.get_guidance("nag", **options)
    assert "\n" not in str(err.value)


def test_what_nag_cannot_run_is_refused_in_one_line(sd):
    refusals = []
    with pytest.raises(ValueError, match=r"NAG is built for .* not for DiTTransformer2DModel"):
        try:
            GuidedPipeline(tiny.dit(), progress=False)("circle", guidance="nag", steps=2)
        except ValueError as e:
            refusals.append(e)
            raise
    den, (pos, neg), x = sd.net_denoiser, _conds(sd), _x(sd)
    ts = dg.timesteps(den.schedule, 2)
    with pytest.raises(ValueError, match=r"NAG reads the negative prompt .*uncond=") as err:
        dg.sample(dg.guide(den, "nag", pos), "euler", ts, x)
    refusals.append(err.value)
    with pytest.raises(ValueError, match=r"NAG needs its 2 conditional rows in one forward, got 1"):
        try:
            dg.sample(dg.guide(den, "nag:cfg=3", pos, neg, max_batch=1), "euler", ts, x)
        except ValueError as e:
            refusals.append(e)
            raise
    assert all("\n" not in str(e) for e in refusals)
    assert _left() == ({}, {})  # a refused run holds nothing either


def test_on_joint_attention_what_changes_a_blocks_batch_is_refused():
    gp = GuidedPipeline(tiny.sd3(), progress=False)
    kw = dict(prompt=P, negative_prompt=N, steps=3, seed=[0, 1], height=16, width=16)
    with pytest.raises(ValueError, match=r"^NAG on SD3 and Flux runs without a step cache"):
        gp(**kw, guidance="nag", cache="first_block", output_type="latent")
    assert _left() == ({}, {})  # the negative's activations of the refused forward went too
    with pytest.raises(ValueError, match=r"^NAG on SD3 and Flux does not combine with skipped"):
        gp(**kw, guidance="nag+slg:stop=1", output_type="latent")


def _left():
    """What this thread's NAG still holds: (negatives, a forward's activations)."""
    local = nag_module._LOCAL.__dict__
    return dict(local.get("held", {})), dict(local.get("state", {}))


def test_nothing_is_held_after_a_run(sd):
    for scale in (2, 3):  # one entry per setting was kept for the thread's life
        _run(sd, f"nag:scale={scale}")
        assert _left() == ({}, {})
    _run(sd, "nag:cfg=3")
    assert _left() == ({}, {})


@pytest.fixture(scope="module")
def sdxl():
    return GuidedPipeline(tiny.sdxl(), progress=False)


def _empty(gp):
    """The empty prompt's encoding, as a negative, for P."""
    fam = gp.family
    return fam.extra(fam.encode(P, ["", ""], 1, "cpu")[1], 16, 16)


def test_without_a_negative_nag_reads_the_empty_prompt_not_sdxls_zeros(sdxl, monkeypatch):
    """SDXL zeroes an empty negative (force_zeros_for_empty_prompt): NAG would then rescale every
    cross-attention output by a constant. NAG reads the encoding of "", as the authors
    (nag_negative_prompt = ""); CFG's unconditional branch keeps the zeros (diffusers')."""
    assert sdxl.family.pipe.config.force_zeros_for_empty_prompt
    kw = dict(prompt=P, steps=2, seed=[0, 1], height=16, width=16, output_type="latent")
    empty = _empty(sdxl)
    assert empty["text"].abs().max() > 0.1
    held, hold = [], nag_module.NormalizedAttention.hold
    monkeypatch.setattr(
        nag_module.NormalizedAttention,
        "hold",
        lambda self, neg, b: (held.append(neg), hold(self, neg, b))[1],
    )
    for spec in ("nag", "nag:cfg=3"):
        held.clear()
        sdxl(**kw, guidance=spec)
        for name in ("text", "added"):
            torch.testing.assert_close(held[0][name], empty[name], rtol=0, atol=0)
    # the conditions: "neg" is NAG's alone at CFG 1; beside CFG's branch it stays SDXL's zeros
    alone = conditions.encode(sdxl, sdxl.plan(P, None, "nag", steps=2, height=16, width=16))
    torch.testing.assert_close(alone.tree["neg"]["text"], empty["text"], rtol=0, atol=0)
    assert NAG_NEGATIVE not in alone.tree["extra"]
    both = conditions.encode(sdxl, sdxl.plan(P, None, "nag:cfg=3", steps=2, height=16, width=16))
    assert both.tree["neg"]["text"].abs().max() == 0
    assert both.tree["neg"]["added"]["text_embeds"].abs().max() == 0
    torch.testing.assert_close(both.tree["extra"][NAG_NEGATIVE]["text"], empty["text"])
    # neutral NAG with CFG is the zero-negative CFG of diffusers' SDXL pipeline
    neutral = sdxl(**kw, guidance="nag:cfg=3,scale=1").images
    torch.testing.assert_close(neutral, sdxl(**kw, guidance="cfg:scale=3").images, rtol=0, atol=0)
    # a negative prompt given is what NAG reads, with or without CFG
    given = conditions.encode(sdxl, sdxl.plan(P, N, "nag:cfg=3", steps=2, height=16, width=16)).tree
    assert NAG_NEGATIVE not in given["extra"] and given["neg"]["text"].abs().max() > 0.1
