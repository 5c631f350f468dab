"""Improved consistency training (Song & Dhariwal 2023): the paper's formulas against independent
computations, the loss falls on a fixed batch, the trainer resumes bit for bit and its student loads
and samples."""

import json
import math

import numpy as np
import pytest
import torch

from diffguide.distill import checkpoint
from diffguide.distill.ict import ICTLoss, curriculum, karras_levels, lognormal_probs
from diffguide.distill.trainer import DistillConfig, train
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from helpers import caption_folder, states_equal


def test_curriculum_is_the_papers_exponential_schedule():
    # CIFAR-10 in the paper: K = 400,000, s0 = 10, s1 = 1280 -> K' = 400000 / 8 = 50,000
    assert [
        curriculum(k, 400_000) for k in (0, 49_999, 50_000, 100_000, 300_000, 350_000, 399_999)
    ] == [11, 11, 21, 41, 641, 1281, 1281]
    assert [curriculum(k, 3) for k in range(3)] == [
        11,
        21,
        41,
    ]  # K' = floor(3 / 8) = 0 is taken as 1


def test_levels_and_lognormal_sampling_match_their_formulas():
    from scipy.stats import norm

    s = karras_levels(11, 0.002, 80.0).numpy()
    assert s[0] == pytest.approx(0.002) and s[-1] == pytest.approx(80.0)
    assert s[5] == pytest.approx(((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7)
    p = lognormal_probs(torch.tensor(s)).numpy()
    ref = norm.cdf((np.log(s[1:]) + 1.1) / 2.0) - norm.cdf(
        (np.log(s[:-1]) + 1.1) / 2.0
    )  # log sigma ~ N(-1.1, 2^2)
    assert np.allclose(p, ref / ref.sum(), atol=1e-9)


def _student():
    from diffguide.core.denoiser import NetDenoiser
    from diffguide.core.schedule import VPSchedule

    gp = GuidedPipeline.from_pipe(tm.pixel_sd(), progress=False)
    net = gp.family.net.train()
    return gp, NetDenoiser(gp.family.forward, VPSchedule.from_betas(), "eps", module=net), net


def test_ict_loss_samples_levels_by_their_probabilities_and_falls():
    gp, den, net = _student()
    loss = ICTLoss(den, total=100)
    assert loss.sigma_min == pytest.approx(float(den.schedule.sigma_min))
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        cond, _ = gp.family.encode(["a red circle"] * 4, [""] * 4, 1, "cpu")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = None
    for i in range(40):
        value, logs = loss(
            x0, cond, 0, torch.Generator().manual_seed(1)
        )  # the same levels and noise
        opt.zero_grad()
        value.backward()
        opt.step()
        first = first if first is not None else value.item()
    assert logs["levels"] == 11 and value.item() < 0.6 * first


def test_ict_trains_resumes_bit_identically_and_its_student_samples(tmp_path, monkeypatch):
    from diffguide.distill import methods

    shares = []  # the caption dropout each training micro-batch gets
    real = methods.drop_captions
    monkeypatch.setattr(methods, "drop_captions", lambda *a: shares.append(a[2]) or real(*a))
    teacher = tm.save(str(tmp_path / "t"), "pixel_sd")
    data = caption_folder(tmp_path / "data", 16)
    base = dict(
        teacher=teacher,
        data=data,
        batch=4,
        log_every=1,
        checkpoint_every=2,
        validate_n=1,
        lr=1e-3,
        method="ict",
        ict_total=4,
        student_steps=2,
    )
    train(DistillConfig(out=str(tmp_path / "whole"), max_steps=4, **base), progress=False)
    train(DistillConfig(out=str(tmp_path / "part"), max_steps=2, **base), progress=False)
    folder = train(
        DistillConfig(out=str(tmp_path / "part"), max_steps=4, resume=True, **base), progress=False
    )
    a, b = (checkpoint.load(str(tmp_path / r / "checkpoint.pt")) for r in ("whole", "part"))
    assert states_equal(a, b)
    assert len(shares) == 8 and set(shares) == {0.1}  # every step of both runs, the default share
    log = [json.loads(x) for x in open(tmp_path / "whole" / "loss.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    out = gp("a red circle", seed=0, output_type="np")
    assert gp.info.sampler == "consistency" and out.nfe == 2 and np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="ict_total must be an integer >= 0"):
        DistillConfig(out=str(tmp_path / "x"), **{**base, "ict_total": -1}).check()
    short = {**base, "ict_total": 0, "checkpoint_every": 1}
    train(DistillConfig(out=str(tmp_path / "short"), max_steps=1, **short), progress=False)
    with pytest.raises(ValueError, match="resume with the same --max-steps"):
        train(
            DistillConfig(out=str(tmp_path / "short"), max_steps=3, resume=True, **short),
            progress=False,
        )


def test_ict_drops_captions_so_its_student_takes_cfg(monkeypatch):
    """iCT learns from data alone: without empty captions in training its student never saw the
    unconditional input CFG needs. About the dropout share of examples get the empty caption's
    condition, row by row, through nested condition dicts; the rest keep their own."""
    import torch

    from diffguide.distill.data import drop_captions

    b = 4000
    pos = {"encoder_hidden_states": torch.ones(b, 3, 2), "added": {"text_embeds": torch.ones(b, 5)}}
    neg = {
        "encoder_hidden_states": torch.zeros(b, 3, 2),
        "added": {"text_embeds": torch.zeros(b, 5)},
    }
    out = drop_captions(pos, neg, 0.1, torch.Generator().manual_seed(0))
    dropped = out["encoder_hidden_states"][:, 0, 0] == 0
    assert 0.08 < float(dropped.double().mean()) < 0.12
    assert torch.equal(dropped, out["added"]["text_embeds"][:, 0] == 0)  # the same rows throughout
    assert torch.equal(
        out["encoder_hidden_states"][~dropped], pos["encoder_hidden_states"][~dropped]
    )
    assert drop_captions(pos, neg, 0.0, None) is pos
    assert DistillConfig(out="x").ict_caption_dropout == 0.1  # on by default
    with pytest.raises(ValueError, match="must be in"):
        DistillConfig(out="x", method="ict", ict_caption_dropout=1.0).check()


def test_ect_pairs_start_at_the_data_and_close_stage_by_stage():
    """ECT's mapping (locuslab/ect, sigmoid form, q = 2, k = 8, b = 1): r = t (1 - 2^-(s+1) (1 + 8
    sigmoid(-t))) at least 0. Stage 0 pairs every level below about 2.3 with the data itself (a
    diffusion loss); each stage halves the gap t - r where r > 0."""
    import torch

    from diffguide.distill.ict import ICTLoss, ect_r

    t = torch.tensor([0.1, 1.0, 3.0, 20.0], dtype=torch.float64)
    by_hand = t * (1 - 0.5 * (1 + 8 / (1 + torch.exp(t))))
    assert torch.allclose(ect_r(t, 0), by_hand.clamp(min=0))
    assert ect_r(t, 0)[:2].eq(0).all() and ect_r(t, 0)[3] > 0
    gap = [(t - ect_r(t, s))[3] for s in (2, 3, 4)]
    assert torch.allclose(torch.stack(gap[1:]), torch.stack(gap[:-1]) / 2)
    # in the loss: where r = 0 the target is the data itself. A student that is off by 0.1 at every
    # level agrees with itself (zero loss) wherever r > 0, and is 0.1 from the data where r = 0
    import diffguide as dg

    sched = dg.VPSchedule.from_betas(0.0001, 0.02, "linear")

    class Off:
        schedule = sched

        def __call__(self, x, t, cond):
            a, s = (f(torch.as_tensor(t)).view(-1, 1) for f in (sched.alpha, sched.sigma))
            return dg.Pred(x0.expand_as(x) + 0.1, (x - a * (x0 + 0.1)) / s)

    x0 = torch.full((64, 2), 0.3, dtype=torch.float64)
    loss = ICTLoss(Off(), total=80, schedule="ect", timestep_scaling=None)
    first, logs = loss(x0, None, 0, torch.Generator().manual_seed(0))
    late, late_logs = loss(x0, None, 12 * 10, torch.Generator().manual_seed(0))
    assert logs["stage"] == 0.0 and late_logs["stage"] == 12.0
    assert float(first) > 0.01 and float(late) < 1e-9
    with pytest.raises(ValueError, match="ict_schedule must be ict or ect"):
        DistillConfig(out="x", method="ict", ict_schedule="edm").check()
