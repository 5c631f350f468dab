"""The core's contracts: eps is used (never re-derived), branch batching, state per run, threads,
noise."""

import threading
from dataclasses import dataclass

import pytest
import torch

import diffguide as dg
from helpers import WellPosed, sd_schedule, tiny_unet


def _x(gm, ts, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) * float(gm.schedule.sigma(ts[0]))


# the consistency sampler renoises with fresh noise only (Song et al. 2023, Alg. 1): no eps to read
@pytest.mark.parametrize("spec", [s for s in dg.list_samplers() if s != "consistency"])
def test_inconsistent_eps_changes_every_sampler(spec, gmm, sd):
    """A Pred whose eps disagrees with x must move the result: samplers read eps, not x."""
    ts = dg.timesteps(sd, 6, "karras")
    labels = torch.arange(8) % 4

    class Shifted:
        schedule = sd

        def __init__(self, shift):
            self.shift = shift

        def __call__(self, x, t, cond):
            p = gmm(x, t, cond)
            return dg.Pred(p.x0, p.eps + self.shift)

    outs = [
        dg.sample(
            dg.guide(Shifted(d), None, labels), spec, ts, _x(gmm, ts), dg.SeededNoise(range(8))
        )
        for d in (0.0, 0.5)
    ]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_cfg_scale_one_is_conditional(gmm, sd):
    ts = dg.timesteps(sd, 10, "karras")
    labels, null = torch.arange(8) % 4, torch.full((8,), -1)
    cfg = dg.guide(gmm, dg.CFG(scale=1.0), labels, null)
    plain = dg.guide(gmm, None, labels)
    a = dg.sample(cfg, "dpmpp_2m", ts, _x(gmm, ts))
    b = dg.sample(plain, "dpmpp_2m", ts, _x(gmm, ts))
    assert torch.equal(a, b)
    assert cfg.nfe == plain.nfe == 10 and cfg.forwards == 10


def test_cfg_evaluates_two_branches_in_one_forward(gmm, sd):
    ts = dg.timesteps(sd, 10, "karras")
    den = dg.guide(gmm, dg.CFG(scale=4.0), torch.arange(8) % 4, torch.full((8,), -1))
    dg.sample(den, "dpmpp_2m", ts, _x(gmm, ts))
    assert den.nfe == 20 and den.forwards == 10


@pytest.fixture(scope="module")
def unet_model():
    sc = sd_schedule()
    return WellPosed(sc, tiny_unet(1), "eps")


def test_batched_equals_one_by_one(unet_model):
    sc = unet_model.schedule
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    ts = dg.timesteps(sc, 6, "linspace", drop_last=True)
    x = torch.randn(3, 4, 8, 8, generator=g)
    batched = dg.guide(unet_model.denoiser(), dg.CFG(scale=6.0), cond, uncond)
    single = dg.guide(unet_model.denoiser(), dg.CFG(scale=6.0), cond, uncond, max_batch=1)
    a, b = dg.sample(batched, "dpmpp_2m", ts, x), dg.sample(single, "dpmpp_2m", ts, x)
    assert batched.forwards == 6 and single.forwards == 6 * 2 * 3
    assert (a - b).abs().max() < 1e-5
    # conditions of different token lengths cannot be concatenated: evaluated separately, same
    # result
    long_uncond = torch.cat([uncond, torch.zeros(1, 2, 32)], dim=1)
    split = dg.guide(unet_model.denoiser(), dg.CFG(scale=6.0), cond, long_uncond)
    dg.sample(split, "dpmpp_2m", ts, x)
    assert split.forwards == 12 and split.nfe == 12


@dataclass(frozen=True)
class Twice(dg.Guidance):
    """Names the same branch twice and keeps a per-run counter, to test dedup and reset."""

    def init_state(self):
        return 0

    def branches(self, pt, state=None):
        return {"a": dg.Branch("pos"), "b": dg.Branch("pos"), "u": dg.Branch("neg")}

    def combine(self, x, pt, preds, state):
        assert preds["a"] is preds["b"]
        w = 1.0 + 0.1 * state  # depends on how many steps this run has taken
        return preds["u"] + w * (preds["a"] - preds["u"]), state + 1


def test_identical_branches_evaluated_once_and_state_resets(gmm, sd):
    ts = dg.timesteps(sd, 8, "karras")
    den = dg.guide(gmm, Twice(), torch.arange(8) % 4, torch.full((8,), -1))
    first = dg.sample(den, "dpmpp_2m_sde", ts, _x(gmm, ts), dg.SeededNoise(range(8)))
    assert den.nfe == 16 and den.state == 8
    second = dg.sample(den, "dpmpp_2m_sde", ts, _x(gmm, ts), dg.SeededNoise(range(8)))
    assert torch.equal(first, second)


def test_threads_share_configs(gmm, sd):
    sampler, guidance = dg.get_sampler("dpmpp_2m_sde"), dg.CFG(scale=3.0, rescale=0.5)
    ts = dg.timesteps(sd, 12, "karras")

    def run(seed):
        den = dg.guide(gmm, guidance, torch.arange(8) % 4, torch.full((8,), -1))
        return dg.sample(
            den, sampler, ts, _x(gmm, ts, seed=seed), dg.SeededNoise(range(seed, seed + 8))
        )

    serial = [run(s) for s in range(4)]
    results = [None] * 4

    def worker(i):
        for _ in range(3):
            results[i] = run(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for s, r in zip(serial, results):
        assert torch.equal(s, r)


@pytest.mark.parametrize(
    "spec",
    ["euler_ancestral", "dpmpp_2m_sde", "ddim:eta=0.7", "euler:churn=20", "dpmpp_2s_ancestral"],
)
def test_noise_is_per_sample(spec, gmm, sd):
    """A sample's result depends on its seed, not on what else is in the batch."""
    ts = dg.timesteps(sd, 10, "karras")
    noise4 = dg.SeededNoise([5, 6, 7, 8])
    x4 = noise4.randn((4, 2)) * float(sd.sigma(ts[0]))
    out4 = dg.sample(dg.guide(gmm, None, torch.tensor([0, 1, 2, 3])), spec, ts, x4, noise4)
    noise1 = dg.SeededNoise([7])
    x1 = noise1.randn((1, 2)) * float(sd.sigma(ts[0]))
    out1 = dg.sample(dg.guide(gmm, None, torch.tensor([2])), spec, ts, x1, noise1)
    assert torch.allclose(out4[2:3], out1, atol=1e-6)


def test_per_sample_t_training_mode(gmm, sd):
    """Guided denoisers accept one t per sample (as distillation needs)."""
    t = torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64)
    x = torch.randn(3, 2)
    den = dg.guide(gmm, dg.CFG(scale=3.0), torch.tensor([0, 1, 2]), torch.tensor([-1]))
    p = den(x, t)
    for i in range(3):
        q = dg.guide(gmm, dg.CFG(scale=3.0), torch.tensor([[0, 1, 2][i]]), torch.tensor([-1]))(
            x[i : i + 1], t[i]
        )
        assert torch.allclose(p.x0[i], q.x0[0], atol=1e-6) and torch.allclose(
            p.eps[i], q.eps[0], atol=1e-5
        )


def test_partial_run_is_a_shorter_grid(gmm, sd):
    """img2img-style: restarting from the state at ts[k] on ts[k:] continues the same trajectory."""
    ts = dg.timesteps(sd, 12, "karras")
    labels = torch.arange(8) % 4
    seen = {}
    full = dg.sample(
        dg.guide(gmm, None, labels),
        "ddim",
        ts,
        _x(gmm, ts),
        callback=lambda st, x: seen.setdefault(st.i, x.clone()),
    )
    part = dg.sample(dg.guide(gmm, None, labels), "ddim", ts[5:], seen[4])
    assert torch.equal(full, part)


@dataclass(frozen=True)
class Flip:
    """A perturbation: while applied, the test model negates its x0 (hashable, like real ones)."""

    def apply(self, net, noise=None):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            net.flipped = True
            try:
                yield
            finally:
                net.flipped = False

        return ctx()


@dataclass(frozen=True)
class WithPerturbed(dg.Guidance):
    def branches(self, pt, state=None):
        return {"c": dg.Branch("pos"), "u": dg.Branch("neg"), "p": dg.Branch("pos", perturb=Flip())}

    def combine(self, x, pt, preds, state):
        return preds["c"] + 0.5 * (preds["c"] - preds["p"]), state


def test_perturbed_branch_gets_its_own_forward(gmm, sd):
    class Model:
        schedule = sd
        flipped = False
        calls = []

        def __call__(self, x, t, cond):
            self.calls.append((x.shape[0], self.flipped))
            p = gmm(x, t, cond)
            return dg.Pred.from_x0(x, -p.x0 if self.flipped else p.x0, sd.alpha(t), sd.sigma(t))

    m = Model()
    den = dg.guide(m, WithPerturbed(), torch.tensor([0, 1]), torch.tensor([-1]))
    x, t = torch.randn(2, 2), torch.tensor(300.0, dtype=torch.float64)
    out = den(x, t)
    assert (
        sorted(m.calls) == [(2, True), (4, False)] and not m.flipped
    )  # cond+uncond batched, perturbed apart
    c = gmm(x, t, torch.tensor([0, 1]))
    assert torch.allclose(out.x0, c.x0 + 0.5 * (c.x0 + c.x0), atol=1e-6)
    assert den.nfe == 3 and den.forwards == 2


@pytest.mark.parametrize("spec", dg.list_samplers())
@pytest.mark.parametrize("schedule", ["flow", "ztsnr"])
def test_grid_from_pure_noise(spec, schedule):
    """Grids that start where the signal is exactly zero (flow t = 1, zero-terminal-SNR VP), so
    lambda = -inf at the first point: every sampler stays finite and lands in the right class."""
    sc = (
        dg.FlowSchedule(shift=3.0)
        if schedule == "flow"
        else sd_schedule(rescale_betas_zero_snr=True)
    )
    gm = dg.GaussianMixture.ring(sc)
    ts = dg.timesteps(sc, 12, "uniform_t")
    assert float(sc.alpha(ts[0])) == 0.0
    labels = torch.tensor([1] * 64)
    if spec in ("dpm_fast", "dpm_adaptive"):  # as k-diffusion, they stop at the last nonzero level
        spec += ":denoise_to_zero=True"
    x = dg.sample(
        dg.guide(gm, None, labels),
        spec,
        ts,
        dg.SeededNoise(range(64)).randn((64, 2)),
        dg.SeededNoise(range(100, 164)),
    )
    assert torch.isfinite(x).all()
    nearest = torch.cdist(x.double(), gm.means).argmin(1)
    assert (gm.labels[nearest] == 1).double().mean() > 0.9
