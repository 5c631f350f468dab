"""Pred conversions: every output kind round-trips to the (x0, eps) that generated x, on VP and
flow."""

import pytest
import torch

import diffguide as dg
from helpers import sd_schedule

SCHEDULES = {"vp": sd_schedule(), "flow": dg.FlowSchedule(shift=3.0)}


def _raw(kind, x0, eps, a, s):
    return {"eps": eps, "x0": x0, "sample": x0, "v": a * eps - s * x0, "flow": eps - x0}[kind]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("kind", ["eps", "x0", "sample", "v", "flow"])
@pytest.mark.parametrize("t", [0.3, 0.7])
def test_round_trip(name, kind, t):
    sc = SCHEDULES[name]
    tt = torch.tensor(t * sc.t_max, dtype=torch.float64)
    a, s = sc.alpha(tt), sc.sigma(tt)
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    x = a * x0 + s * eps
    if kind == "v" and name == "flow":  # v for a non-VP schedule uses the general a^2 + s^2 form
        pass
    p = dg.Pred.from_output(kind, _raw(kind, x0, eps, a, s), x, a, s)
    assert torch.allclose(p.x0, x0, atol=1e-10) and torch.allclose(p.eps, eps, atol=1e-10)


def test_conversion_runs_in_float32():
    sc = SCHEDULES["vp"]
    a, s = sc.alpha(torch.tensor(500.0)), sc.sigma(torch.tensor(500.0))
    x = torch.randn(2, 8, dtype=torch.float16)
    p = dg.Pred.from_output("eps", torch.randn(2, 8, dtype=torch.float16), x, a, s)
    assert p.x0.dtype == torch.float32 and p.eps.dtype == torch.float32


def test_per_sample_levels():
    sc = SCHEDULES["vp"]
    t = torch.tensor([100.0, 900.0], dtype=torch.float64)
    a, s = sc.alpha(t), sc.sigma(t)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x = a.view(-1, 1, 1, 1).float() * x0 + s.view(-1, 1, 1, 1).float() * eps
    p = dg.Pred.from_output(
        "v", a.view(-1, 1, 1, 1).float() * eps - s.view(-1, 1, 1, 1).float() * x0, x, a, s
    )
    assert torch.allclose(p.x0, x0, atol=1e-5) and torch.allclose(p.eps, eps, atol=1e-5)


def test_linear_combination_stays_consistent():
    a, s = 0.6, 0.8
    x = torch.randn(4, 5)
    c, u = dg.Pred.from_x0(x, torch.randn(4, 5), a, s), dg.Pred.from_x0(x, torch.randn(4, 5), a, s)
    g = u + 7.5 * (c - u)
    assert torch.allclose(a * g.x0 + s * g.eps, x, atol=1e-5)


def test_bad_kind_and_shape():
    x = torch.randn(2, 3)
    with pytest.raises(
        ValueError, match="unknown prediction kind 'noise'.*eps, x0, sample, v, flow"
    ):
        dg.Pred.from_output("noise", x, x, 0.5, 0.5)
    with pytest.raises(
        ValueError, match=r"output shape \(2, 6\) does not match the sample shape \(2, 3\)"
    ):
        dg.Pred.from_output("eps", torch.randn(2, 6), x, 0.5, 0.5)
