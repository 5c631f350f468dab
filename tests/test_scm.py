"""sCM's pieces (Lu & Song 2024): the TrigFlow view of any denoiser, the student's time derivative
by forward-mode AD against a finite difference, the loss on a fixed batch."""

import math

import pytest
import torch

import diffguide as dg
from diffguide.core.denoiser import NetDenoiser, TrigFlowTime
from diffguide.distill.scm import (
    AdaptiveWeight,
    SCMLoss,
    TrigFlowView,
    index_neighbours,
    sample_times,
    secant,
    time_derivative,
    trig_output,
    trig_pred,
)
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm

SD = 0.5


def _trig_point(b=6, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 1.4 + 0.05
    x0 = torch.randn(b, dim, generator=g, dtype=torch.float64)
    z = torch.randn(b, dim, generator=g, dtype=torch.float64)
    return t, torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * SD * z


def test_the_trigflow_view_is_the_same_model_on_any_schedule():
    """One Gaussian mixture's exact denoiser on a VP table and on a rectified flow: their TrigFlow
    views agree (each converts to its own coordinates and back), and f = x0 holds."""
    vp, flow = dg.VPSchedule.from_betas(), dg.FlowSchedule()
    t, x_t = _trig_point()
    t = t.clamp(max=math.atan(float(vp.sigma_max) / SD) - 1e-3)
    outs = []
    for sched in (vp, flow):
        view = TrigFlowView(dg.GaussianMixture.ring(sched), SD)
        F = view(x_t / SD, t, None)
        p = trig_pred(F, x_t, t, SD)
        assert torch.allclose(p.x0, view.pred(x_t, t, None).x0, atol=1e-6)  # f(x_t, t) = x0
        outs.append(F)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    # and back: a Pred at TrigFlow time t, as F, gives the same Pred
    x0, eps = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    x = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * SD * eps
    back = trig_pred(trig_output(dg.Pred(x0, eps), t, SD), x, t, SD)
    assert torch.allclose(back.x0, x0, atol=1e-9) and torch.allclose(back.eps, eps, atol=1e-9)


def _view(name):
    """A tiny network's TrigFlow view in float64 (a finite difference in float32 is too noisy to
    check against)."""
    gp = GuidedPipeline.from_pipe(tm.BUILDERS[name](), progress=False)
    net = gp.family.net.double()
    den = NetDenoiser(
        gp.family.forward,
        gp.info.schedule,
        gp.info.kind,
        dtype=torch.float64,
        module=net,
        learned_sigma=name == "dit",
    )
    if name == "dit":
        cond, _ = gp.family.encode([1, 2], None, 1, "cpu")
    else:
        cond, _ = gp.family.encode(["a red circle"] * 2, [""] * 2, 1, "cpu")
        cond = (
            {
                k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in cond.items()
            }
            if isinstance(cond, dict)
            else cond.double()
        )
    return TrigFlowView(den, SD), cond, (2, 4 if name == "dit" else 3, 8, 8)


@pytest.mark.parametrize("name", ["pixel_sd", "dit"])
def test_the_time_derivative_by_jvp_matches_a_finite_difference(name):
    view, cond, shape = _view(name)
    g = torch.Generator().manual_seed(0)
    # channels-last, as data batches permuted from HWC images are (forward-mode group norm failed on
    # them)
    x_in = torch.randn(shape, generator=g, dtype=torch.float64).to(
        memory_format=torch.channels_last
    )
    dx = torch.randn(shape, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    t = torch.tensor([0.7, 1.1], dtype=torch.float64)
    with torch.no_grad():
        F, dF = time_derivative(view, x_in, t, dx, cond, "jvp")
        F2, fd = time_derivative(view, x_in, t, dx, cond, "finite_difference", h=1e-4)
    assert torch.allclose(F, F2)
    scale = float(fd.abs().max())
    assert scale > 1 and float((dF - fd).abs().max()) <= 1e-3 * scale


@pytest.mark.parametrize("schedule,steps", [("vp", 1), ("vp", 8), ("flow", 3)])
def test_the_secant_spans_training_timesteps_either_side(schedule, steps):
    """index_neighbours: TrigFlow times whose teacher levels are exactly ``steps`` training indices
    below and above (read back through the schedule's own ve and index tables), clamped to the data
    end and to the largest level."""
    sc = dg.VPSchedule.from_betas() if schedule == "vp" else dg.FlowSchedule()
    top = math.atan(float(sc.sigma_max) / SD) if schedule == "vp" else math.pi / 2
    t = torch.tensor([0.3, 0.9, 1.3, 1.5], dtype=torch.float64).clamp(max=top - 0.01)
    lo, hi = index_neighbours(sc, t, SD, steps)
    one = steps * float(sc.index_time(1) - sc.index_time(0))
    here = sc.t_of_ve(SD * torch.tan(t))
    for side, sign in ((lo, -1), (hi, 1)):
        back = sc.t_of_ve(SD * torch.tan(side))
        assert torch.allclose(back, here + sign * one, atol=1e-6 * max(1.0, float(sc.t_max)))
    end = torch.tensor([1e-6, top], dtype=torch.float64)
    lo, hi = index_neighbours(sc, end, SD, steps)
    assert float(lo[0]) == 0.0 and abs(float(hi[1]) - top) < 1e-9


def test_the_secant_is_the_slope_between_its_two_times():
    """secant(F, x, t, dx, lo, hi): for F linear in (x, t) the exact directional derivative
    whatever the times; for a curved F, (F(hi) - F(lo)) / (hi - lo) along the line, and at t -+ h
    the central difference of time_derivative."""
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x, dx = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g)
    dx = dx.double()
    t = torch.tensor([0.2, 0.5, 0.9, 1.2], dtype=torch.float64)
    lo, hi = t - torch.tensor([0.1, 0.0, 0.05, 0.3]), t + torch.tensor([0.2, 0.1, 0.0, 0.01])

    def linear(x, s, c):
        return x @ A.T + s[:, None] * b

    assert torch.allclose(secant(linear, x, t, dx, None, lo, hi), dx @ A.T + b)

    def curved(x, s, c):
        return torch.sin(x) * s[:, None] ** 2

    exact = (
        curved(x + (hi - t)[:, None] * dx, hi, None) - curved(x - (t - lo)[:, None] * dx, lo, None)
    ) / (hi - lo)[:, None]
    assert torch.allclose(secant(curved, x, t, dx, None, lo, hi), exact)
    _, central = time_derivative(curved, x, t, dx, None, "finite_difference", h=1e-3)
    assert torch.allclose(secant(curved, x, t, dx, None, t - 1e-3, t + 1e-3), central)


def test_time_sampling_and_weight():
    t = sample_times(10000, torch.Generator().manual_seed(0), -0.8, 1.6, SD, math.pi / 2)
    tau = torch.log(SD * torch.tan(t))  # tan t = e^tau / sigma_d: tau ~ N(-0.8, 1.6^2)
    assert abs(float(tau.mean()) + 0.8) < 0.05 and abs(float(tau.std()) - 1.6) < 0.05
    assert sample_times(100, torch.Generator().manual_seed(0), -0.8, 1.6, SD, 1.2).max() <= 1.2
    w = AdaptiveWeight()
    assert torch.equal(w(t[:5]), torch.zeros(5))


@pytest.mark.parametrize("method", ["jvp", "secant"])
def test_scm_loss_trains_the_student_towards_consistency(method):
    """On a fixed batch with the teacher as the student's start, the loss (with its learned weight)
    falls and the normalised tangent shrinks, with either time derivative."""
    import copy

    gp = GuidedPipeline.from_pipe(tm.pixel_sd(), progress=False)
    teacher = gp.net_denoiser
    net = copy.deepcopy(gp.family.net).train()
    student = NetDenoiser(
        lambda x, tm_, c: gp.family.forward(x, tm_, c, net=net),
        gp.info.schedule,
        gp.info.kind,
        module=net,
    )
    weight = AdaptiveWeight()
    loss = SCMLoss(teacher, student, weight, guidance="cfg:scale=3", warmup=0, method=method)
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        pos, neg = gp.family.encode(["a red circle"] * 4, [""] * 4, 1, "cpu")
    opt = torch.optim.Adam(list(net.parameters()) + list(weight.parameters()), lr=1e-3)
    values = []
    for _ in range(30):
        value, logs = loss(x0, pos, neg, 100, torch.Generator().manual_seed(1))
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < values[0] - 0.1, values


@pytest.mark.parametrize("time_input", ["index", "dense"])
def test_scm_trainer_resumes_bit_identically_and_its_student_samples_in_two_steps(
    tmp_path, time_input
):
    """Both time inputs: the default (the teacher's timestep, the secant, no fit) and the dense one
    (a first step fitting it, recorded in the student folder and applied on loading)."""
    import json

    import numpy as np

    from diffguide.distill import checkpoint
    from diffguide.distill.trainer import DistillConfig, train
    from helpers import caption_folder, states_equal

    teacher = tm.save(str(tmp_path / "t"), "pixel_sd")
    data = caption_folder(tmp_path / "data", 16)
    base = dict(
        teacher=teacher,
        data=data,
        batch=4,
        log_every=1,
        checkpoint_every=2,
        validate_n=1,
        lr=1e-4,
        method="scm",
        student_steps=2,
        scm_warmup=2,
        guidance="cfg:scale=4",
        scale_min=2.0,
        scale_max=6.0,
        scm_time=time_input,
        # dense: step 1 fits the time input, steps 2-4 are sCM's; index: the default, no fit
        **({"scm_fit_steps": 1} if time_input == "dense" else {}),
    )
    train(DistillConfig(out=str(tmp_path / "whole"), max_steps=4, **base), progress=False)
    train(DistillConfig(out=str(tmp_path / "part"), max_steps=2, **base), progress=False)
    folder = train(
        DistillConfig(out=str(tmp_path / "part"), max_steps=4, resume=True, **base), progress=False
    )
    a, b = (checkpoint.load(str(tmp_path / r / "checkpoint.pt")) for r in ("whole", "part"))
    assert states_equal(a, b) and "weight" in a
    log = [json.loads(x) for x in open(tmp_path / "whole" / "loss.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    fits = 1 if time_input == "dense" else 0
    assert all(("fit" in r) == (i < fits) for i, r in enumerate(log))
    assert all("tangent_norm" in r for r in log[fits:])
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    assert gp.defaults["spacing"] == "scm" and gp.embedded_guidance == 4.0
    # the student sees the time it was trained on: the dense one, or its scheduler's timesteps
    dense = TrigFlowTime(0.5) if time_input == "dense" else None
    assert gp.net_denoiser.time_input == dense
    out = gp("a red circle", seed=0, output_type="np")
    assert out.nfe == 2 and np.isfinite(out.images).all()
    ts = gp.info.timesteps(2, "scm")
    ve = gp.info.schedule.ve(ts[1])
    assert (
        abs(float(ve) - 0.5 * math.tan(1.3)) < 1e-6
    )  # SCMScheduler's intermediate time, as a VE level


def test_jvp_falls_back_to_a_finite_difference_and_says_so(monkeypatch):
    import diffguide.distill.scm as scm

    view, cond, shape = _view("pixel_sd")
    x_in, dx = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    t = torch.tensor([0.7, 1.1], dtype=torch.float64)

    def no_forward_mode(*a, **k):
        raise NotImplementedError(
            "Trying to use forward AD with some_kernel that does not support it"
        )

    monkeypatch.setattr(torch.func, "jvp", no_forward_mode)
    monkeypatch.setattr(scm, "_warned", [])
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="some_kernel.*central difference"):
        F, dF = time_derivative(view, x_in, t, dx, cond, "jvp")
    with torch.no_grad():
        _, fd = time_derivative(view, x_in, t, dx, cond, "finite_difference")
    assert torch.equal(dF, fd)


@pytest.mark.parametrize("name", ["pixel_sd", "dit", "sd3", "flux"])
def test_ladd_heads_read_the_teachers_image_features_and_learn(name):
    """LADD on each network kind: per-token heads (SANA-Sprint's, StyleGAN-T's: spectral-norm
    convolutions over the tokens) give one logit per token of the image stream of the teacher's
    blocks (a UNet block's H*W, a transformer's N; dual-stream blocks return text and image), the
    head loss falls on a fixed real/fake pair, the student's adversarial gradient passes through
    the frozen teacher without touching its weights."""
    from torch.nn.utils import parametrize

    from diffguide.distill.ladd import LADD, TokenHead, feature_modules, feature_widths

    gp = GuidedPipeline.from_pipe(tm.BUILDERS[name](), progress=False)
    net = gp.family.net.requires_grad_(False)
    mods = feature_modules(net)
    assert 1 <= len(mods) <= 5 and len(feature_widths(net)) == len(mods)
    heads = torch.nn.ModuleList(TokenHead(w) for w in feature_widths(net))
    convs = [m for m in heads.modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) == 3 * len(heads)  # kernel-1 block, kernel-9 block, classifier
    for conv in convs:  # every head layer spectral-normalised: largest singular value 1
        assert parametrize.is_parametrized(conv, "weight")
        assert "SpectralNorm" in type(conv.parametrizations.weight[0]).__name__
        assert 0.9 < float(torch.linalg.matrix_norm(conv.weight.detach().flatten(1), 2)) < 1.1
    ladd = LADD(gp.net_denoiser, mods, heads)
    c = gp.info.latent_channels if hasattr(gp.info, "latent_channels") else None
    size = gp.family.default_size // gp.family.factor
    shape = (2, c or net.config.in_channels, size, size)
    if name == "flux":
        shape = (2, net.config.in_channels // 4, size, size)
    with torch.no_grad():
        if name == "dit":
            cond, _ = gp.family.encode([1, 2], None, 1, "cpu")
        else:
            cond, _ = gp.family.encode(["a red circle"] * 2, [""] * 2, 1, "cpu")
            cond = gp.family.extra(cond, gp.family.default_size, gp.family.default_size)
            if (
                gp.embedded_guidance is not None
            ):  # Flux.1-dev's guidance input, as the trainer gives it
                cond = gp.family.embed_guidance(cond, gp.embedded_guidance, 2)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(shape, generator=g) * 0.5
    fake = torch.zeros(shape, requires_grad=True)
    # one logit per token: the image features' positions (H*W of a UNet block's map, a
    # transformer's N image tokens), read off the blocks by hooks of the test's own
    feats: list = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o)) for m in mods]
    with torch.no_grad():
        logits = ladd.logits(real, cond, torch.Generator().manual_seed(3))
    for h in hooks:
        h.remove()
    tokens = []
    for o in feats:
        o = [x for x in o if torch.is_tensor(x)][-1] if isinstance(o, tuple) else o
        tokens.append(o.shape[2] * o.shape[3] if o.ndim == 4 else o.shape[1])
    assert [tuple(x.shape) for x in logits] == [(2, n) for n in tokens]
    patch = 2 if name == "flux" else getattr(net.config, "patch_size", None) or 1  # Flux packs 2x2
    n_image = (size // patch) ** 2
    if name == "pixel_sd":  # the mid block at a coarser grid than the last up block's
        assert tokens[0] < tokens[-1] == size * size
    else:  # the image tokens, not the text's
        assert set(tokens) == {n_image}

    def vectors():  # spectral norm's power-iteration state
        return [conv.parametrizations.weight[0]._u.clone() for conv in convs]

    before = vectors()
    adv = ladd.generator_loss(fake, cond, torch.Generator().manual_seed(1))
    # the generator's pass leaves the heads as it found them (evaluation mode inside)
    assert heads.training and all(torch.equal(a, b) for a, b in zip(before, vectors()))
    adv.backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0
    assert all(p.grad is None for p in net.parameters())
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
    values = []
    for _ in range(15):
        d = ladd.discriminator_loss(fake.detach(), real, cond, torch.Generator().manual_seed(2))
        opt.zero_grad()
        d.backward()
        opt.step()
        values.append(d.item())
    assert values[-1] < values[0] - 0.1, values
    assert not all(torch.equal(a, b) for a, b in zip(before, vectors()))  # the heads' own steps


def test_scm_with_ladd_resumes_bit_identically(tmp_path):
    from diffguide.distill import checkpoint
    from diffguide.distill.trainer import DistillConfig, train
    from helpers import caption_folder, states_equal

    teacher = tm.save(str(tmp_path / "t"), "pixel_sd")
    data = caption_folder(tmp_path / "data", 8)
    base = dict(
        teacher=teacher,
        data=data,
        batch=2,
        log_every=1,
        checkpoint_every=1,
        validate_n=1,
        lr=1e-4,
        method="scm",
        student_steps=1,
        scm_warmup=2,
        guidance="cfg:scale=3",
        ladd=True,
        scm_prior_weight=True,
        clip=0.1,
        scm_fit_steps=1,  # no LADD update while the student fits its time input
        # SANA-Sprint's LADD (the defaults): the fresh estimate with half its times at t_max, the
        # real images under each other's captions among the heads' fakes
        ladd_start_share=0.5,
        ladd_misaligned=True,
    )
    train(DistillConfig(out=str(tmp_path / "whole"), max_steps=3, **base), progress=False)
    train(DistillConfig(out=str(tmp_path / "part"), max_steps=2, **base), progress=False)
    train(
        DistillConfig(out=str(tmp_path / "part"), max_steps=3, resume=True, **base), progress=False
    )
    a, b = (checkpoint.load(str(tmp_path / r / "checkpoint.pt")) for r in ("whole", "part"))
    assert states_equal(a, b) and "head" in a and "fake_opt" in a
    # the per-token heads' spectral-norm vectors (moved by the heads' own steps) resume with them
    assert any(k.endswith("parametrizations.weight.0._u") for k in a["head"])
    import json

    log = [json.loads(x) for x in open(tmp_path / "whole" / "loss.jsonl")]
    assert all(k in log[-1] for k in ("adv_g", "adv_d")) and "adv_d" not in log[0]
    with pytest.raises(ValueError, match="ladd is an sCM option"):
        DistillConfig(out=str(tmp_path / "x"), method="dmd2", ladd=True).check()
    with pytest.raises(ValueError, match="gan is a DMD2 option"):
        DistillConfig(out=str(tmp_path / "x"), method="scm", gan=True).check()
