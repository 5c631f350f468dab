"""sCM's training setup against SANA-Sprint's (issue 33): the student's dense time input on a
closed-form mixture, the adaptive weight reaching its optimum, the time proposal covering where
sampling starts, the student's gradient clipped alone, the learning-rate warm-up, and training data
rendered only as it is asked for."""

import math

import pytest

import torch

import diffguide as dg
from diffguide.core.denoiser import NetDenoiser, TrigFlowTime
from diffguide.distill.config import DistillConfig
from diffguide.distill.scm import (
    AdaptiveWeight,
    SCMLoss,
    TrigFlowView,
    sample_times,
    weighted,
)

SD = 0.5
VP = dg.VPSchedule.from_betas(0.0001, 0.02, "linear")  # the built-in model's table (157 at the top)
T_MAX = math.atan(float(VP.sigma_max) / SD)


class TimeMLP(torch.nn.Module):
    """A 2-D eps network with diffusers' sinusoidal time embedding (frequencies 1 to 1e-4 per unit
    of its time input), as a UNet's."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(32) / 32))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(66, 128), torch.nn.SiLU(), torch.nn.Linear(128, 2)
        )

    def forward(self, x, tm, cond=None):
        a = tm.float()[:, None] * self.freqs
        return self.net(torch.cat([x.float(), torch.cos(a), torch.sin(a)], 1)).to(x.dtype)


def _draw(mix, b, g):
    k = torch.multinomial(mix.weights, b, replacement=True, generator=g)
    noise = torch.randn(b, 2, generator=g, dtype=torch.float64)
    return mix.means[k] + mix.stds[k][:, None] * noise


def _distil(time_input, steps=150):
    """The tangent norms of an sCM run from an exact mixture teacher (fitted first on the
    student's time input, as ``--scm-fit-steps``), and the student's one-step samples."""
    torch.manual_seed(0)
    teacher = dg.GaussianMixture.ring(VP)
    net = TimeMLP().double()
    student = NetDenoiser(lambda x, tm, c: net(x, tm, c), VP, "eps", time_input=time_input)
    g = torch.Generator().manual_seed(0)
    weight = AdaptiveWeight().double()
    opt = torch.optim.Adam(
        [{"params": net.parameters()}, {"params": weight.parameters(), "lr": 1e-2}], lr=2e-3
    )
    loss = SCMLoss(teacher, student, weight, guidance="none", warmup=50, fit_steps=steps)
    norms = []
    for step in range(2 * steps):
        value, logs = loss(_draw(teacher, 128, g), None, None, step, g)
        opt.zero_grad()
        value.backward()
        opt.step()
        norms.append(logs.get("tangent_norm"))
    with torch.no_grad():
        z = SD * torch.randn(2000, 2, generator=g, dtype=torch.float64)
        x = TrigFlowView(student, SD).pred(z, torch.full((2000,), T_MAX, dtype=torch.float64), None)
    return norms[-20:], x.x0, _draw(teacher, 2000, g)


def _energy(x, y):
    d = lambda a, b: torch.cdist(a, b).mean()  # noqa: E731
    return float(2 * d(x, y) - d(x, x) - d(y, y))


def test_a_dense_time_input_keeps_the_tangent_small_where_the_index_blows_it_up():
    """The review's 2-D check: the same student and loss, fed the teacher's timestep index
    (0..999: the chain factor d(index)/dt reaches the hundreds, and the embedding's fastest
    frequencies wiggle between integers) or SANA-Sprint's dense sin t / (sin t + cos t). Before
    (index, the only input): the tangent norm grows and the one-step samples leave the data."""
    index_norms, x_index, ref = _distil(None)
    dense_norms, x_dense, _ = _distil(TrigFlowTime(SD))
    index, dense = (sum(n) / len(n) for n in (index_norms, dense_norms))
    assert dense < 1.0 and index > 10 * dense, (index, dense)
    e_dense, e_index = _energy(x_dense, ref), _energy(x_index, ref)
    assert e_dense < 1.0 and e_index > 5 * e_dense, (e_index, e_dense)


def test_the_adaptive_weight_reaches_its_optimum_on_a_fixed_batch():
    """w(t) minimises e^w / D err - w at log(D / err), about log D = 8 for a 3x32x32 image. In its
    own group at --scm-weight-lr it gets there; at the student's rate (before: one group at 1e-4)
    it moves a fraction of the way."""
    d = 3 * 32 * 32
    t = sample_times(256, torch.Generator().manual_seed(0), 0.2, 1.6, SD, T_MAX)
    err = d * 1e-3 * (1 + 0.5 * torch.sin(t)).float()
    best = torch.log(d / err)

    def train(lr):
        w = AdaptiveWeight()
        opt = torch.optim.AdamW(w.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(1500):
            loss = weighted(err, w(t), d)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float((w(t) - best).abs().mean())

    assert train(DistillConfig(out="x").scm_weight_lr) < 0.3
    assert train(1e-4) > 4.0


def test_the_time_proposal_covers_where_sampling_starts():
    """A one- or two-step sampler starts at the teacher's largest level (157 on the built-in
    model's table). Before (P_mean -0.8, no share at the start) 0.04% of training times were above
    noise level 100; now the start share and SANA-Sprint's proposal put at least 10% there."""
    cfg = DistillConfig(out="x")
    g = torch.Generator().manual_seed(0)
    t = sample_times(20000, g, cfg.scm_p_mean, cfg.scm_p_std, SD, T_MAX, cfg.scm_start_share)
    high = float((SD * torch.tan(t) >= 100).double().mean())
    assert high >= 0.1, high
    old = sample_times(20000, g, -0.8, 1.6, SD, T_MAX)
    assert float((SD * torch.tan(old) >= 100).double().mean()) < 0.002
    # with no start share nothing more is drawn: the generator's stream (LADD's) is as before
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    sample_times(8, g1, 0.2, 1.6, SD, T_MAX, 0.0)
    torch.randn(8, generator=g2, dtype=torch.float64)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))


def test_only_the_students_gradient_is_clipped_and_the_rate_warms_up():
    """An update clips the gradient of its ``clipped`` modules only (sCM: the student, not w, whose
    larger gradient took the clip before), and each group's rate ramps over --lr-warmup steps."""
    from accelerate import Accelerator

    from diffguide.distill.methods import Update
    from diffguide.distill.run import Run

    student, weight = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for m in (student, weight):
        torch.nn.init.zeros_(m.weight)
    opt = torch.optim.SGD([{"params": student.parameters()}, {"params": weight.parameters()}], 1.0)
    run = object.__new__(Run)
    run.acc, run.clip, run.lr_warmup, run.decay_steps = Accelerator(cpu=True), 0.1, 4, 0

    def loss(j):  # gradients 10 (student) and 20 (weight)
        value = -10 * student.weight.sum() - 20 * weight.weight.sum()
        return value, {}

    run._apply(Update([student, weight], opt, loss, clipped=[student]), 1, step=0)
    # step 0 of 4: a quarter of the rate; the student's 10 clipped to 0.1, the weight's 20 kept
    assert math.isclose(float(student.weight), 0.25 * 0.1, rel_tol=1e-5)
    assert math.isclose(float(weight.weight), 0.25 * 20, rel_tol=1e-5)
    run._apply(Update([student, weight], opt, loss, clipped=[student]), 1, step=3)
    assert math.isclose(float(weight.weight), 0.25 * 20 + 20, rel_tol=1e-5)  # fully warm


def test_the_cosine_decay_reaches_zero_at_max_steps():
    """--lr-decay cosine: after the warm-up's ramp, rate x (1 + cos(pi step / max_steps)) / 2,
    from the step alone (a resumed run repeats it)."""
    from diffguide.distill.run import Run

    run = object.__new__(Run)
    run.lr_warmup, run.decay_steps = 10, 100
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], 2.0)
    for step, want in (
        (0, 2.0 * 0.1 * (1 + math.cos(0)) / 2),
        (50, 1.0),
        (75, 2.0 * (1 - 0.5**0.5) / 2),
        (100, 0.0),
    ):
        run._schedule(opt, step)
        assert math.isclose(opt.param_groups[0]["lr"], want, abs_tol=1e-12), step
    DistillConfig(out="x", lr_decay="cosine").check()
    with pytest.raises(ValueError, match="lr_decay"):
        DistillConfig(out="x", lr_decay="linear").check()


def test_training_data_is_rendered_as_it_is_asked_for(tmp_path, monkeypatch):
    """Before: a run rendered all 50,000 toy scenes before its first step (minutes on two cores).
    Now a batch renders its own scenes, the same pixels the cached renderer gives."""
    import numpy as np

    from diffguide.distill.data import ToyData
    from diffguide.toy import scenes
    from diffguide.toy.data import SceneData

    calls = []
    real = scenes.example
    monkeypatch.setattr(scenes, "example", lambda *a, **k: calls.append(a) or real(*a, **k))
    data = ToyData(DistillConfig(out=str(tmp_path), dataset=50000))
    images, captions = data.items(np.array([7, 49999]), 0)
    assert len(calls) == 2 and len(captions) == 2 and not list(tmp_path.iterdir())
    cached = SceneData(50, 0, str(tmp_path / "c.npz"))
    lazy = SceneData(50, 0)
    idx = np.array([3, 41])
    flip = np.zeros(2, dtype=bool)
    assert torch.equal(cached.batch(idx, 1, flip)[0], lazy.batch(idx, 1, flip)[0])
    assert torch.equal(data.items(np.array([7]), 0)[0], images[:1])


def test_a_students_unknown_time_input_is_refused(tmp_path):
    """diffguide.json's time_input names what the network sees; one diffguide cannot give is an
    error, never sampled on the scheduler's timesteps instead."""
    import json

    import pytest

    from diffguide.pipelines.pipeline import read_defaults

    (tmp_path / "diffguide.json").write_text(json.dumps({"time_input": "trigflow"}))
    assert read_defaults(str(tmp_path)) == {"time_input": "trigflow"}
    (tmp_path / "diffguide.json").write_text(json.dumps({"time_input": "edm"}))
    with pytest.raises(ValueError, match="time_input 'edm'"):
        read_defaults(str(tmp_path))


def test_rcm_alternates_as_the_authors_code_and_resumes_bit_identically(tmp_path):
    """rCM (NVlabs/rcm): sCM alone through the fit and the tangent warm-up, then the student with
    sCM + DMD every fake_ratio-th step and the fake score on the others; its student samples in
    two steps like an sCM student and the run resumes bit-identically."""
    import json

    import numpy as np

    from diffguide.distill import checkpoint
    from diffguide.distill.trainer import DistillConfig as Config
    from diffguide.distill.trainer import train
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines import tiny as tm
    from helpers import caption_folder, states_equal

    base = dict(
        teacher=tm.save(str(tmp_path / "t"), "pixel_sd"),
        data=caption_folder(tmp_path / "data", 8),
        batch=2,
        log_every=1,
        checkpoint_every=1,
        validate_n=1,
        validate_prompts=2,
        method="rcm",
        student_steps=2,
        scm_time="dense",  # the dense input's fit is the first phase
        scm_fit_steps=1,
        scm_warmup=1,
        fake_ratio=2,
        guidance="cfg:scale=4",
        scale_min=2.0,
        scale_max=6.0,
    )
    train(Config(out=str(tmp_path / "whole"), max_steps=5, **base), progress=False)
    train(Config(out=str(tmp_path / "part"), max_steps=3, **base), progress=False)
    folder = train(Config(out=str(tmp_path / "part"), max_steps=5, resume=True, **base), False)
    a, b = (checkpoint.load(str(tmp_path / r / "checkpoint.pt")) for r in ("whole", "part"))
    assert states_equal(a, b) and "fake" in a and "fake_opt" in a
    log = [json.loads(x) for x in open(tmp_path / "whole" / "loss.jsonl")]
    kinds = [
        "fit" if "fit" in r else "dm" if "dm" in r else "fake" if "fake" in r else "scm"
        for r in log
    ]
    assert kinds == ["fit", "scm", "dm", "fake", "dm"], kinds
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    out = gp("a red circle", seed=0, output_type="np")
    assert out.nfe == 2 and np.isfinite(out.images).all()
    assert gp.net_denoiser.time_input == TrigFlowTime(0.5)
    import pytest

    with pytest.raises(ValueError, match="rcm has no adversarial term"):
        Config(out="x", method="rcm", ladd=True).check()


def test_checkpoints_from_before_the_new_settings_resume_as_they_were_trained():
    """A checkpoint written before a setting existed was trained with its old behaviour: an old sCM
    run had the index time input, so resuming it on the new default (dense) is refused and on
    --scm-time index accepted; a consistency run is not refused for sCM's or iCT's settings."""
    from dataclasses import asdict

    import pytest

    from diffguide.distill.run import _check_resume

    new = ("scm_time", "scm_fit_steps", "scm_start_share", "ict_caption_dropout", "lora_rank")

    def old_state(cfg):
        return {"config": {k: v for k, v in asdict(cfg).items() if k not in new}, "processes": 1}

    scm = DistillConfig(out="x", method="scm")
    with pytest.raises(ValueError, match="was trained with scm_"):
        _check_resume(scm, old_state(scm), 1, "ckpt")
    index = DistillConfig(out="x", method="scm", scm_time="index", scm_fit_steps=0)
    index.scm_start_share = 0.0
    _check_resume(index, old_state(index), 1, "ckpt")
    consistency = DistillConfig(out="x", method="consistency")
    _check_resume(consistency, old_state(consistency), 1, "ckpt")


def test_the_default_input_is_the_teachers_timestep_with_a_secant_and_no_fit():
    """The defaults follow the built-in UNet's evidence (docs/distillation.md): the teacher's own
    timestep, the secant tangent, no fit; the dense input still gets its 200 fit steps, and a
    fit given explicitly is kept."""
    cfg = DistillConfig(out="x", method="scm")
    assert (cfg.scm_time, cfg.scm_derivative, cfg.scm_fit_steps) == ("index", "secant", 0)
    assert DistillConfig(out="x", method="scm", scm_time="dense").scm_fit_steps == 200
    given = DistillConfig(out="x", method="scm", scm_time="dense", scm_fit_steps=7)
    assert given.scm_fit_steps == 7
    from diffguide.cli.main import build_parser

    args = build_parser().parse_args(["distill", "scm", "--out", "x"])
    assert (args.scm_time, args.scm_derivative, args.scm_fit_steps) == ("index", "secant", None)
