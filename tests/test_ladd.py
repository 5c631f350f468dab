"""LADD as SANA-Sprint trains it (issue 33): the hinge per token, the generator's estimate from a
fresh x_t with a share of its times at t_max, and real images under other examples' captions among
the heads' fakes. (The heads on each network kind and the resumed run: tests/test_scm.py.)"""

import math

import pytest
import torch

import diffguide as dg
from diffguide.core.denoiser import NetDenoiser
from diffguide.distill.ladd import LADD
from diffguide.distill.scm import AdaptiveWeight, SCMLoss, TrigFlowView, noised

SD = 0.5
VP = dg.VPSchedule.from_betas(0.0001, 0.02, "linear")
T_MAX = math.atan(float(VP.sigma_max) / SD)


def _term(misaligned=True):
    """A LADD term with no teacher: its logits are patched in by each test."""
    return LADD(None, [], torch.nn.ModuleList(), t_max=T_MAX, misaligned=misaligned)


def _relu(v):
    return max(0.0, v)


def test_the_hinge_is_per_token_then_averaged():
    """Fixed per-token logits of two heads: the losses are the hand computation of SANA-Sprint's
    hinge on every token (heads averaged; the heads' loss halved), not the hinge of the mean
    logit, which differs where some tokens are beyond the margin."""
    real = [torch.tensor([[2.0, -0.5, 0.3]]), torch.tensor([[1.5, 0.5]])]
    fake = [torch.tensor([[-3.0, 0.2, -0.4]]), torch.tensor([[0.0, -2.0]])]
    ladd = _term()
    calls = iter([real, fake])
    ladd.logits = lambda x0, cond, g: next(calls)
    d = ladd.discriminator_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, None)  # one example
    real_h = (
        (_relu(1 - 2.0) + _relu(1 + 0.5) + _relu(1 - 0.3)) / 3
        + (_relu(1 - 1.5) + _relu(1 - 0.5)) / 2
    ) / 2
    fake_h = (
        (_relu(1 - 3.0) + _relu(1 + 0.2) + _relu(1 - 0.4)) / 3
        + (_relu(1 + 0.0) + _relu(1 - 2.0)) / 2
    ) / 2
    assert float(d) == pytest.approx(0.5 * (real_h + fake_h), abs=1e-6)
    # the hinge of each head's mean logit (the old head's loss) is another number
    of_mean = sum(_relu(1 - float(x.mean())) for x in real) / 2
    of_mean += sum(_relu(1 + float(x.mean())) for x in fake) / 2
    assert abs(0.5 * of_mean - float(d)) > 0.1 and abs(of_mean - float(d)) > 0.1
    ladd.logits = lambda x0, cond, g: fake
    g = ladd.generator_loss(torch.zeros(1, 2), None, None)
    assert float(g) == pytest.approx(-((-3.0 + 0.2 - 0.4) / 3 + (0.0 - 2.0) / 2) / 2, abs=1e-6)


def test_the_heads_also_see_real_images_under_other_captions_as_fakes():
    """With misaligned pairs (SANA-Sprint's misaligned_pairs_D) the heads judge the real batch
    rolled by one against its captions as fake, beside the student's estimates, half each; without
    them, or with one example, only real and fake."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    cond = {"prompt_embeds": torch.arange(4.0)[:, None]}
    per_call = {"real": 0.8, "fake": -0.3, "rolled": 0.5}  # a logit per kind of input

    def run(misaligned, n=4):
        seen = []

        def logits(x0, c, gen):
            assert c is cond  # the captions stay in place: the images are rolled against them
            refs = (("real", real[:n]), ("fake", fake[:n]), ("rolled", real[:n].roll(1, 0)))
            kind = next(k for k, ref in refs if torch.equal(x0, ref))
            seen.append(kind)
            return [torch.full((n, 5), per_call[kind]), torch.full((n, 2), per_call[kind])]

        ladd = _term(misaligned)
        ladd.logits = logits
        d = ladd.discriminator_loss(fake[:n], real[:n], cond, None)
        return sorted(seen), float(d)

    seen, d = run(True)
    assert seen == ["fake", "real", "rolled"]
    h_real, h_fake, h_rolled = 1 - 0.8, 1 - 0.3, 1 + 0.5
    assert d == pytest.approx(0.5 * (h_real + (h_fake + h_rolled) / 2), abs=1e-6)
    seen, d = run(False)
    assert seen == ["fake", "real"] and d == pytest.approx(0.5 * (h_real + h_fake), abs=1e-6)
    seen, _ = run(True, n=1)  # one example has no other caption
    assert seen == ["fake", "real"]


def test_the_rolled_pairs_put_each_image_under_its_neighbours_caption():
    """Through a real teacher: the misaligned call runs the teacher on real image i - 1 with
    caption i (recorded at the teacher), its own t_D and noise from the micro-batch's generator."""
    from diffguide.distill.ladd import TokenHead, feature_modules, feature_widths
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines import tiny as tm

    gp = GuidedPipeline.from_pipe(tm.pixel_sd(), progress=False)
    net = gp.family.net.requires_grad_(False)
    seen = []

    class Recording:
        schedule = gp.net_denoiser.schedule

        def __call__(self, x, t, cond):
            seen.append((x.clone(), cond["text"].clone()))
            return gp.net_denoiser(x, t, cond)

    heads = torch.nn.ModuleList(TokenHead(w) for w in feature_widths(net))
    ladd = LADD(Recording(), feature_modules(net), heads)
    with torch.no_grad():
        cond, _ = gp.family.encode(
            ["a red circle", "a blue square", "a green star"], [""] * 3, 1, "cpu"
        )
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    fake = torch.zeros_like(real)
    ladd.discriminator_loss(fake, real, cond, torch.Generator().manual_seed(1))
    assert len(seen) == 3
    # the third pass: x_tD of the rolled batch, drawn as logits draws it, under unrolled captions
    g = torch.Generator().manual_seed(1)
    for x0 in (real, fake, real.roll(1, 0)):
        t, _, _, x_t = noised(x0, g, -0.6, 1.0, SD, ladd.t_max)
    x_native, _ = TrigFlowView(gp.net_denoiser, SD).native(x_t, t)
    assert torch.allclose(seen[2][0], x_native)
    assert torch.equal(seen[2][1], cond["text"])
    assert not torch.equal(real.roll(1, 0), real)


class _Student(torch.nn.Module):
    """A small 2-D eps network that records the (native) times it runs at."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2)
        )
        self.times: list = []

    def forward(self, x, tm, cond=None):
        self.times.append(tm.detach().clone())
        return self.net(torch.cat([x, tm[:, None].to(x.dtype)], 1))


class _Judge:
    """A LADD stand-in: records what the generator term judges."""

    def __init__(self):
        self.judged = []

    def generator_loss(self, x0, cond, g):
        self.judged.append(x0)
        return x0.pow(2).mean()


def _loss(share, net):
    student = NetDenoiser(lambda x, tm, c: net(x, tm, c), VP, "eps")
    teacher = dg.GaussianMixture.ring(VP)
    weight = AdaptiveWeight().double()
    judge = _Judge()
    loss = SCMLoss(
        teacher, student, weight, guidance="none", warmup=0, ladd=judge, ladd_start_share=share
    )
    return loss, judge, student


def test_the_generator_term_judges_a_fresh_estimate_with_a_share_at_t_max():
    """SANA-Sprint's train_largest_timestep: the adversarial term judges the student's x0 from x0
    noised afresh at a time from the proposal, about ``ladd_start_share`` of them at t_max (where
    one-step sampling starts), the student run there with gradient: one more student pass than the
    sCM loss's own; with share 0, the sCM pass's estimate as before."""
    net = _Student().double()
    loss, judge, student = _loss(0.5, net)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    t, x0_hat = loss.ladd_estimate(x0, None, torch.Generator().manual_seed(1))
    at_start = float((t == T_MAX).double().mean())
    assert abs(at_start - 0.5) < 0.03  # the proposal alone puts ~0.1% there
    assert float((t < T_MAX).double().mean()) > 0.45 and float(t[t < T_MAX].std()) > 0.1
    # the student ran at those times (its own schedule's, at t_max the top) on the fresh x_t
    _, c, s, x_t = noised(x0, torch.Generator().manual_seed(1), 0.2, 1.6, SD, T_MAX, 0.5)
    view = TrigFlowView(student, SD)
    _, tn = view.native(x_t, t)
    # (below the table's first level the network's time stops at 0)
    assert torch.allclose(net.times[-1].double(), tn.clamp(min=0), atol=1e-3)
    top = view.native(x_t[:1], torch.full((1,), T_MAX, dtype=torch.float64))[1]

    def at_top(times):
        return (times.double() - top).abs() < 1e-3

    assert float(at_top(net.times[-1]).double().mean()) == pytest.approx(at_start)
    assert torch.allclose(x0_hat, view.pred(x_t, t, None).x0, atol=1e-8)

    # in the loss: the judged estimate is that branch's, with gradient to the student, and kept
    b = 64
    x0 = torch.randn(b, 2, generator=g, dtype=torch.float64)
    net.times.clear()
    keep: list = []
    value, logs = loss(x0, None, None, 5, torch.Generator().manual_seed(2), keep=keep)
    assert len(net.times) == 3 and "adv_g" in logs  # tangent, sCM output, the LADD branch
    assert bool(at_top(net.times[-1]).any()) and not torch.equal(net.times[-1], net.times[1])
    judged = judge.judged[-1]
    assert judged.requires_grad and torch.equal(keep[0], judged.detach())
    grad = torch.autograd.grad(judged.sum(), list(net.parameters()), allow_unused=True)
    assert any(x is not None and float(x.abs().sum()) > 0 for x in grad)

    # share 0: no fresh pass; the sCM pass's estimate at its own times
    net0 = _Student().double()
    loss0, judge0, _ = _loss(0.0, net0)
    loss0(x0, None, None, 5, torch.Generator().manual_seed(2))
    assert len(net0.times) == 2 and not bool(at_top(net0.times[-1]).any())


def test_the_cli_and_config_carry_the_options_to_the_loss(tmp_path, monkeypatch):
    """--ladd-start-share and --ladd-misaligned (SANA-Sprint's 0.5 and on by default) reach the
    config, the heads' term and the sCM loss; both are settings a resumed run must keep."""
    from diffguide.cli.main import main
    from diffguide.distill import methods, run
    from diffguide.distill.config import DistillConfig
    from diffguide.distill.ladd import TokenHead
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines import tiny as tm

    seen = []
    monkeypatch.setattr(run, "train", lambda cfg, **k: seen.append(cfg) or str(tmp_path))
    assert main(["distill", "scm", "--ladd", "--out", str(tmp_path / "a")]) == 0
    flags = ["--ladd-start-share", "0.25", "--no-ladd-misaligned"]
    assert main(["distill", "scm", "--ladd", *flags, "--out", str(tmp_path / "b")]) == 0
    assert [(c.ladd_start_share, c.ladd_misaligned) for c in seen] == [(0.5, True), (0.25, False)]
    assert {"ladd_start_share", "ladd_misaligned"} <= set(DistillConfig.FIXED)

    gp = GuidedPipeline.from_pipe(tm.pixel_sd(), progress=False)
    addon = methods.LADDAddOn(seen[1], gp)
    assert all(isinstance(h, TokenHead) for h in addon.heads)

    class Accelerator:
        def unwrap_model(self, m):
            return m

    addon.bind({"head": addon.heads, "fake_opt": addon.optimiser}, Accelerator())
    assert addon.term.misaligned is False
    assert SCMLoss(gp.net_denoiser, gp.net_denoiser, None).ladd_start_share == 0.5
