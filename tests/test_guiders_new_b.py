"""Mahiro, Skimmed CFG and FreSca against transcriptions of their ComfyUI nodes.

Each reference below is written in ComfyUI's own terms: its x (x / a on eps and v models, x itself
on flow models), its sigma and its denoised (x0) predictions, with its in-place edits, as the nodes
(comfy_extras/nodes_mahiro.py, comfy_extras/nodes_fresca.py, Extraltodeus/Skimmed_CFG's
skimmed_CFG.py) and ComfyUI's sampling_function / cfg_function run them."""

import pytest
import torch
import torch.fft as fft
import torch.nn.functional as F

import diffguide as dg
import diffguide.guidance.fresca  # noqa: F401  (registers the methods until __init__ imports them)
import diffguide.guidance.mahiro  # noqa: F401
import diffguide.guidance.skimmed  # noqa: F401
from diffguide.core.guided import Point
from diffguide.core.pred import Pred
from diffguide.core.registry import parse_spec

TS = (0.9, 0.6, 0.35, 0.1)  # a few steps (fractions of the schedule's time range)


def _setup(schedule, frac, shape, seed, dtype=torch.float64):
    """A state x and two Preds at time frac of the schedule, and ComfyUI's view of them."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(schedule.t_min + frac * (schedule.t_max - schedule.t_min), dtype=torch.float64)
    pt = Point(t, schedule)
    a, s = pt.a, pt.s
    x0c, x0u, e = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    x = a * x0c + s * e
    c, u = Pred.from_x0(x, x0c, a, s), Pred.from_x0(x, x0u, a, s)
    flow = isinstance(schedule, dg.FlowSchedule)
    comfy = dict(input=x if flow else x / a, sigma=s if flow else pt.ve)  # ComfyUI's x and sigma
    return x, pt, c, u, comfy


def _check(out: Pred, ref_x0, x, pt):
    """ours == ComfyUI's denoised, and its eps that of the reference made a diffguide Pred."""
    ref = Pred.from_x0(x, ref_x0, pt.a, pt.s)
    torch.testing.assert_close(out.x0, ref.x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.eps, ref.eps, rtol=1e-6, atol=1e-6)


def _comfy_cfg(cond_pred, uncond_pred, cond_scale):
    # comfy.samplers.cfg_function without a sampler_cfg_function
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


# --- Mahiro: comfy_extras/nodes_mahiro.py, a sampler_post_cfg_function ---


def comfy_mahiro(args):
    scale = args["cond_scale"]
    cond_p = args["cond_denoised"]
    uncond_p = args["uncond_denoised"]
    leap = cond_p * scale
    u_leap = uncond_p * scale
    cfg = args["denoised"]
    merge = (leap + cfg) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    sim = F.cosine_similarity(normu, normm).mean()
    simsc = 2 * (sim + 1)
    wm = (simsc * cfg + (4 - simsc) * leap) / 4
    return wm


def comfy_mahiro_run(cond_pred, uncond_pred, cond_scale):
    """One latent at a time: the node's mean runs over the batch, ours per sample."""
    rows = []
    for i in range(cond_pred.shape[0]):
        c, u = cond_pred[i : i + 1], uncond_pred[i : i + 1]
        denoised = _comfy_cfg(c, u, cond_scale)
        args = dict(denoised=denoised, cond_denoised=c, uncond_denoised=u, cond_scale=cond_scale)
        rows.append(comfy_mahiro(args))
    return torch.cat(rows)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 2), (2, 4, 3, 6, 6)])
@pytest.mark.parametrize("scale", [8.0, 3.5])
def test_mahiro_matches_the_node(sd, shape, scale):
    g = parse_spec("guidance", f"mahiro:scale={scale}")
    for i, frac in enumerate(TS):
        x, pt, c, u, _ = _setup(sd, frac, shape, seed=i)
        out, _ = g.combine(x, pt, {"c": c, "u": u}, None)
        _check(out, comfy_mahiro_run(c.x0, u.x0, scale), x, pt)


def test_mahiro_is_per_sample(sd):
    g = parse_spec("guidance", "mahiro")
    x, pt, c, u, _ = _setup(sd, 0.5, (4, 4, 8, 8), seed=3)
    whole, _ = g.combine(x, pt, {"c": c, "u": u}, None)
    one, _ = g.combine(x[1:2], pt, {"c": c.split(4)[1], "u": u.split(4)[1]}, None)
    torch.testing.assert_close(whole.x0[1:2], one.x0, rtol=1e-12, atol=1e-12)


# --- Skimmed CFG: Extraltodeus/Skimmed_CFG skimmed_CFG.py, node "Skimmed CFG" (pre-CFG) ---


def get_skimming_mask(
    x_orig, cond, uncond, cond_scale, return_denoised=False, disable_flipping_filter=False
):
    denoised = x_orig - ((x_orig - uncond) + cond_scale * ((x_orig - cond) - (x_orig - uncond)))
    matching_pred_signs = (cond - uncond).sign() == cond.sign()
    matching_diff_after = cond.sign() == (cond * cond_scale - uncond * (cond_scale - 1)).sign()
    if disable_flipping_filter:
        outer_influence = matching_pred_signs & matching_diff_after
    else:
        deviation_influence = denoised.sign() == (denoised - x_orig).sign()
        outer_influence = matching_pred_signs & matching_diff_after & deviation_influence
    if return_denoised:
        return outer_influence, denoised
    return outer_influence


def skimmed_CFG(x_orig, cond, uncond, cond_scale, skimming_scale, disable_flipping_filter=False):
    outer_influence, denoised = get_skimming_mask(
        x_orig, cond, uncond, cond_scale, True, disable_flipping_filter
    )
    low_cfg_denoised_outer = x_orig - (
        (x_orig - uncond) + skimming_scale * ((x_orig - cond) - (x_orig - uncond))
    )
    low_cfg_denoised_outer_difference = denoised - low_cfg_denoised_outer
    cond[outer_influence] = cond[outer_influence] - (
        low_cfg_denoised_outer_difference[outer_influence] / cond_scale
    )
    return cond


def comfy_skimmed_run(comfy, cond_pred, uncond_pred, cond_scale, skim, full_neg, no_flip):
    """The node's pre_cfg_patch at its defaults start 0, end 1, flip 0, then ComfyUI's CFG."""
    start_at_sigma, end_at_sigma = 999999999.9, 0.0  # percent_to_sigma(0), percent_to_sigma(1)
    conds_out = [cond_pred.clone(), uncond_pred.clone()]  # the node edits them in place
    x_orig = comfy["input"]
    sigma = float(comfy["sigma"])
    if torch.any(conds_out[1]) and not (sigma <= end_at_sigma or sigma > start_at_sigma):
        practical_scale = cond_scale if skim < 0 else skim
        flip_filter = no_flip
        conds_out[1] = skimmed_CFG(
            x_orig,
            conds_out[1],
            conds_out[0],
            cond_scale,
            practical_scale if not full_neg else 0,
            flip_filter,
        )
        conds_out[0] = skimmed_CFG(
            x_orig, conds_out[0], conds_out[1], cond_scale - 1, practical_scale, flip_filter
        )
    return _comfy_cfg(conds_out[0], conds_out[1], cond_scale)


SKIM_CASES = [
    (8.0, 7.0, False, False),  # the node's defaults
    (12.0, 3.0, False, False),
    (12.0, 3.0, True, False),
    (6.0, 2.5, True, True),
]


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("case", SKIM_CASES)
def test_skimmed_cfg_matches_the_node(sd, flow, case):
    scale, skim, full_neg, no_flip = case
    schedule = dg.FlowSchedule(shift=3.0) if flow else sd
    g = dg.get_guidance(
        "skimmed_cfg",
        scale=scale,
        skimming_cfg=skim,
        full_skim_negative=full_neg,
        disable_flipping_filter=no_flip,
    )
    changed = 0
    for i, frac in enumerate(TS):
        x, pt, c, u, comfy = _setup(schedule, frac, (2, 4, 8, 8), seed=10 + i)
        out, _ = g.combine(x, pt, {"c": c, "u": u}, None)
        ref = comfy_skimmed_run(comfy, c.x0, u.x0, scale, skim, full_neg, no_flip)
        _check(out, ref, x, pt)
        changed += (ref - _comfy_cfg(c.x0, u.x0, scale)).abs().gt(1e-3).sum().item()
    assert changed > 0  # the skimming did act


def test_skimmed_cfg_reads_comfys_x(sd):
    """On eps and v models ComfyUI's x is x / a, not diffguide's x: the flipping filter sees it."""
    x, pt, c, u, comfy = _setup(sd, 0.9, (2, 4, 8, 8), seed=5)
    out, _ = dg.get_guidance("skimmed_cfg").combine(x, pt, {"c": c, "u": u}, None)
    wrong = comfy_skimmed_run(dict(comfy, input=x), c.x0, u.x0, 8.0, 7.0, False, False)
    assert (out.x0 - wrong).abs().max() > 1e-3


# --- FreSca: comfy_extras/nodes_fresca.py (pre-CFG) ---


def Fourier_filter(x, scale_low=1.0, scale_high=1.5, freq_cutoff=20):
    dtype, device = x.dtype, x.device
    x = x.to(torch.float32)
    x_freq = fft.fftn(x, dim=(-2, -1))
    x_freq = fft.fftshift(x_freq, dim=(-2, -1))
    mask = torch.ones(x_freq.shape, device=device) * scale_high
    m = mask
    for d in range(len(x_freq.shape) - 2):
        dim = d + 2
        cc = x_freq.shape[dim] // 2
        f_c = min(freq_cutoff, cc)
        m = m.narrow(dim, cc - f_c, f_c * 2)
    m[:] = scale_low
    x_freq = x_freq * mask
    x_freq = fft.ifftshift(x_freq, dim=(-2, -1))
    x_filtered = fft.ifftn(x_freq, dim=(-2, -1)).real
    x_filtered = x_filtered.to(dtype)
    return x_filtered


def comfy_fresca_run(cond_pred, uncond_pred, cond_scale, scale_low, scale_high, freq_cutoff):
    conds_out = [cond_pred, uncond_pred]
    cond, uncond = conds_out[0], conds_out[1]
    guidance = cond - uncond
    filtered_guidance = Fourier_filter(
        guidance, scale_low=scale_low, scale_high=scale_high, freq_cutoff=freq_cutoff
    )
    filtered_cond = filtered_guidance + uncond
    out = [filtered_cond, uncond] + conds_out[2:]
    return _comfy_cfg(out[0], out[1], cond_scale)


FRESCA_CASES = [
    ("fresca", (2, 4, 64, 64), (8.0, 1.0, 1.25, 20)),  # the node's defaults
    (
        "fresca:scale=5,scale_low=0.8,scale_high=1.6,freq_cutoff=5",
        (2, 4, 32, 24),
        (5.0, 0.8, 1.6, 5),
    ),
    ("fresca:scale=4,scale_low=0.5,freq_cutoff=3", (2, 3, 9, 7), (4.0, 0.5, 1.25, 3)),  # odd sides
    (
        "fresca:scale=4,scale_low=0.5,scale_high=2,freq_cutoff=20",
        (1, 4, 16, 16),
        (4.0, 0.5, 2.0, 20),
    ),
    # a video: for an even frame count at most 2 freq_cutoff the node's mask covers every frame
    ("fresca:scale=6,scale_low=0.7,freq_cutoff=4", (2, 4, 4, 16, 16), (6.0, 0.7, 1.25, 4)),
]


@pytest.mark.parametrize("spec,shape,opts", FRESCA_CASES)
def test_fresca_matches_the_node(sd, spec, shape, opts):
    g = parse_spec("guidance", spec)
    for i, frac in enumerate(TS):
        x, pt, c, u, _ = _setup(sd, frac, shape, seed=20 + i)
        out, _ = g.combine(x, pt, {"c": c, "u": u}, None)
        ref = comfy_fresca_run(c.x0, u.x0, *opts)  # its FFT in float32, ours in float64
        torch.testing.assert_close(out.x0, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
        # eps: the same filter on the eps delta, so that x = a x0 + s eps still holds
        consistent = Pred.from_x0(x, out.x0, pt.a, pt.s)
        torch.testing.assert_close(out.eps, consistent.eps, rtol=1e-9, atol=1e-9)
        assert (ref - _comfy_cfg(c.x0, u.x0, opts[0])).abs().max() > 1e-2  # the filter acted


def test_fresca_filters_each_frame_of_a_video(sd):
    """Frames are filtered as images of their own, whatever their count."""
    g = parse_spec("guidance", "fresca:scale=3,scale_low=0.5,scale_high=1.5,freq_cutoff=2")
    x, pt, c, u, _ = _setup(sd, 0.5, (2, 3, 5, 8, 8), seed=7)
    out, _ = g.combine(x, pt, {"c": c, "u": u}, None)
    for f in range(5):
        cf, uf = (Pred(p.x0[:, :, f], p.eps[:, :, f]) for p in (c, u))
        one, _ = g.combine(x[:, :, f], pt, {"c": cf, "u": uf}, None)
        torch.testing.assert_close(out.x0[:, :, f], one.x0, rtol=1e-9, atol=1e-9)
    ref = comfy_fresca_run(c.x0[:, :, 0], u.x0[:, :, 0], 3.0, 0.5, 1.5, 2)
    torch.testing.assert_close(out.x0[:, :, 0], ref, rtol=1e-6, atol=1e-5)


def test_fresca_with_unit_scales_is_cfg(sd):
    x, pt, c, u, _ = _setup(sd, 0.5, (2, 4, 16, 16), seed=8)
    out, _ = parse_spec("guidance", "fresca:scale=6,scale_high=1").combine(
        x, pt, {"c": c, "u": u}, None
    )
    cfg = u + 6.0 * (c - u)
    torch.testing.assert_close(out.x0, cfg.x0)
    torch.testing.assert_close(out.eps, cfg.eps)


# --- sampling loops on the exact Gaussian mixture ---


class Shaped:
    """The ring mixture in dim prod(shape), seen as images or videos of that shape."""

    def __init__(self, schedule, shape):
        n = 1
        for v in shape:
            n *= v
        self.mixture = dg.GaussianMixture.ring(schedule, dim=n)
        self.schedule, self.shape = schedule, shape

    def __call__(self, x, t, cond=None):
        p = self.mixture(x.flatten(1), t, cond)
        return Pred(p.x0.view_as(x), p.eps.view_as(x))


def _run(denoiser, schedule, spec, shape, steps=6, sampler="euler"):
    labels = torch.tensor([0, 1, 2, 3])
    den = dg.guide(denoiser, spec, labels, torch.full_like(labels, -1))
    ts = dg.timesteps(schedule, steps, "karras")
    noise = dg.SeededNoise(range(len(labels)))
    x = noise.randn((len(labels), *shape)) * float(schedule.sigma(ts[0]))
    out = dg.sample(den, dg.get_sampler(sampler), ts, x, noise)
    return out, den.nfe


@pytest.mark.parametrize(
    "spec,nfe",
    [
        ("mahiro", 12),
        ("mahiro:scale=1", 6),
        ("skimmed_cfg", 12),
        ("skimmed_cfg:scale=12,skimming_cfg=3,full_skim_negative=true", 12),
        ("skimmed_cfg:scale=1", 6),
    ],
)
def test_sampling_on_the_mixture(gmm, sd, spec, nfe):
    out, used = _run(gmm, sd, spec, (2,), sampler="dpmpp_2m")
    assert torch.isfinite(out).all() and used == nfe


def test_skimmed_cfg_samples_on_a_flow_schedule():
    flow = dg.FlowSchedule(shift=3.0)
    out, used = _run(dg.GaussianMixture.ring(flow), flow, "skimmed_cfg:scale=6", (2,))
    assert torch.isfinite(out).all() and used == 12


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 3, 8, 8)])
@pytest.mark.parametrize("spec,nfe", [("fresca", 12), ("fresca:scale=1", 6), ("mahiro", 12)])
def test_sampling_images_and_videos(sd, shape, spec, nfe):
    out, used = _run(Shaped(sd, shape), sd, spec, shape)
    assert out.shape == (4, *shape) and torch.isfinite(out).all() and used == nfe


def test_fresca_refuses_points(gmm, sd):
    with pytest.raises(ValueError, match="image-shaped"):
        _run(gmm, sd, "fresca", (2,))


# --- options ---


@pytest.mark.parametrize(
    "spec,match",
    [
        ("mahiro:scale=inf", "finite"),
        ("mahiro:strength=2", "no option"),
        ("skimmed_cfg:scale=nan", "finite"),
        ("skimmed_cfg:scale=0", "other than 0"),
        ("skimmed_cfg:skimming_cfg=-1", r"in \[0, 10\]"),
        ("skimmed_cfg:skimming_cfg=11", r"in \[0, 10\]"),
        ("skimmed_cfg:full_skim_negative=maybe", "true or false"),
        ("fresca:scale=inf", "finite"),
        ("fresca:scale_low=-0.1", r"scale_low must be in \[0, 10\]"),
        ("fresca:scale_high=11", r"scale_high must be in \[0, 10\]"),
        ("fresca:freq_cutoff=0", "freq_cutoff must be an integer"),
        ("fresca:freq_cutoff=2.5", "freq_cutoff must be an integer"),
        ("fresca:freq_cutoff=10001", "freq_cutoff must be an integer"),
    ],
)
def test_option_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec("guidance", spec)


def test_defaults():
    from diffguide.core.registry import options

    assert options("guidance", "mahiro") == {"scale": 8.0}
    assert options("guidance", "skimmed_cfg") == {
        "scale": 8.0,
        "skimming_cfg": 7.0,
        "full_skim_negative": False,
        "disable_flipping_filter": False,
    }
    assert options("guidance", "fresca") == {
        "scale": 8.0,
        "scale_low": 1.0,
        "scale_high": 1.25,
        "freq_cutoff": 20,
    }
