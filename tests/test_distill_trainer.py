"""The distillation trainer on a tiny pixel-space teacher: exact resume, corrupt checkpoints
refused, the student folder loads with its own steps, DMD2's gradient against its closed form, bad
arguments."""

import json
import os

import numpy as np
import pytest
import torch

from diffguide.core.pred import Pred
from diffguide.core.schedule import VPSchedule
from diffguide.distill import checkpoint
from diffguide.distill.dmd2 import DMD2Loss, conditioning_times
from diffguide.distill.trainer import DistillConfig, train
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from helpers import caption_folder, states_equal


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tm.save(str(tmp_path_factory.mktemp("teacher") / "t"), "pixel_sd")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 random 8x8 images with captions, in the imagefolder layout."""
    return caption_folder(tmp_path_factory.mktemp("data"), 16)


def _cfg(out, teacher, data, **kw):
    base = dict(
        out=str(out),
        teacher=teacher,
        data=data,
        batch=4,
        max_steps=4,
        checkpoint_every=2,
        log_every=1,
        skip=100,
        validate_n=1,
        lr=1e-3,
    )
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "method,extra",
    [("consistency", {}), ("dmd2", {"student_steps": 2, "fake_ratio": 2, "gan": True})],
)
def test_resume_is_bit_identical(tmp_path, teacher, data, method, extra):
    whole = _cfg(tmp_path / "whole", teacher, data, method=method, **extra)
    train(whole, progress=False)
    part = _cfg(tmp_path / "part", teacher, data, method=method, max_steps=2, **extra)
    train(part, progress=False)  # "interrupted" after its step-2 checkpoint
    train(
        _cfg(tmp_path / "part", teacher, data, method=method, resume=True, **extra), progress=False
    )
    a = checkpoint.load(str(tmp_path / "whole" / "checkpoint.pt"))
    b = checkpoint.load(str(tmp_path / "part" / "checkpoint.pt"))
    assert a["step"] == b["step"] == 4
    assert states_equal(a, b)
    # the losses moved the student
    t = GuidedPipeline.from_pretrained(teacher, progress=False).family.net.state_dict()
    assert any(not torch.equal(t[k], v) for k, v in a["student"].items() if k in t)
    log = [json.loads(x) for x in open(tmp_path / "whole" / "loss.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert os.path.isfile(tmp_path / "whole" / "val" / "step_4.png")


@pytest.mark.parametrize("method,steps", [("consistency", 4), ("dmd2", 2)])
def test_student_folder_loads_with_its_own_steps(tmp_path, teacher, data, method, steps):
    folder = train(
        _cfg(tmp_path / "run", teacher, data, method=method, student_steps=steps, max_steps=1),
        progress=False,
    )
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    assert gp.default_steps == steps and gp.info.sampler == "consistency"
    out = gp("a red circle", seed=0, output_type="np", progress=False)
    assert out.nfe == steps and out.images.shape == (1, 8, 8, 3) and np.isfinite(out.images).all()
    if method == "dmd2":  # the generator's conditioning times come back from the folder's scheduler
        assert gp.info.timesteps(steps).tolist()[:steps] == conditioning_times(steps)


def test_conditioning_times_match_lcm_scheduler():
    """DMD2's 999/749/499/249 are LCMScheduler's grid with original_inference_steps = n
    (diffusers)."""
    from diffusers import LCMScheduler

    assert conditioning_times(4) == [999, 749, 499, 249]
    for n in (1, 2, 4):
        s = LCMScheduler(original_inference_steps=n)
        s.set_timesteps(n)
        assert s.timesteps.tolist() == conditioning_times(n)


def test_corrupt_checkpoint_is_refused_by_train(tmp_path, teacher, data):
    cfg = _cfg(tmp_path / "run", teacher, data, max_steps=2)
    train(cfg, progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt|truncated"):
        train(_cfg(tmp_path / "run", teacher, data, max_steps=4, resume=True), progress=False)


def test_bad_arguments(tmp_path, teacher, data):
    with pytest.raises(ValueError, match="unknown distillation method 'lcm'"):
        _cfg(tmp_path, teacher, data, method="lcm").check()
    with pytest.raises(ValueError, match="student_steps must be an integer >= 1, got 0"):
        _cfg(tmp_path, teacher, data, student_steps=0).check()
    with pytest.raises(ValueError, match="32x32 images but the teacher makes 8x8"):
        train(_cfg(tmp_path / "toy", teacher, "toy", dataset=8), progress=False)
    train(_cfg(tmp_path / "run", teacher, data, max_steps=1), progress=False)
    with pytest.raises(ValueError, match="pass --resume"):
        train(_cfg(tmp_path / "run", teacher, data, max_steps=2), progress=False)
    with pytest.raises(
        ValueError,
        match=r"effective batch of 4 \(batch 4 x 1 process x accumulation 1\), "
        r"but this run has 2 \(batch 2",
    ):
        train(
            _cfg(tmp_path / "run", teacher, data, max_steps=2, batch=2, resume=True), progress=False
        )
    # the same effective batch split another way resumes
    train(
        _cfg(tmp_path / "run", teacher, data, max_steps=2, batch=2, grad_accum=2, resume=True),
        progress=False,
    )
    assert checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 2


class _Const:
    """A denoiser whose x0 is a fixed tensor."""

    def __init__(self, x0, schedule, kind="eps"):
        self.x0, self.schedule, self.kind = x0, schedule, kind

    def __call__(self, x, t, cond=None):
        a, s = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        return Pred.from_x0(x, self.x0.expand_as(x).to(x.dtype), a, s)


def test_dmd2_gradient_matches_closed_form():
    """d loss / d x0 = (x̂_fake − x̂_real) / mean|x0 − x̂_real| / numel (DMD2's normalised
    gradient)."""
    sched = VPSchedule.from_betas(num_train_timesteps=1000)
    real, fake = torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2, 2), -0.25)
    loss = DMD2Loss(_Const(real, sched), _Const(fake, sched), None, "none")
    x0 = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    value, _ = loss.generator_loss(x0, {}, {}, torch.Generator().manual_seed(1))
    value.backward()
    norm = (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / norm / x0.numel()
    assert torch.allclose(x0.grad, expected, atol=1e-7)


def test_dmd2_gradient_vanishes_when_fake_is_real(teacher):
    gp = GuidedPipeline.from_pretrained(teacher, progress=False)
    loss = DMD2Loss(gp.net_denoiser, gp.net_denoiser, gp.net_denoiser, "none", taus=(999, 499))
    pos, neg = gp.family.encode(["a red circle"] * 2, ["", ""], 1, "cpu")
    x0 = torch.randn(2, 3, 8, 8).requires_grad_(True)
    value, _ = loss.generator_loss(x0, pos, neg, torch.Generator().manual_seed(0))
    assert value.item() == 0.0


def test_dmd2_fake_loss_falls_on_a_fixed_batch(teacher):
    import copy

    gp = GuidedPipeline.from_pretrained(teacher, progress=False)
    fake = copy.deepcopy(gp.family.net).train().requires_grad_(True)
    from diffguide.distill.methods import network_denoiser as _denoiser

    loss = DMD2Loss(gp.net_denoiser, _denoiser(gp, fake, False), gp.net_denoiser, "none")
    with torch.no_grad():
        pos, _ = gp.family.encode(["a red circle"] * 4, [""] * 4, 1, "cpu")
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    opt = torch.optim.Adam(fake.parameters(), lr=1e-3)
    values = []
    for _ in range(25):
        v, _ = loss.fake_loss(x0, pos, torch.Generator().manual_seed(3))
        opt.zero_grad()
        v.backward()
        opt.step()
        values.append(v.item())
    assert values[-1] < 0.7 * values[0], values


@pytest.mark.parametrize(
    "method,extra", [("dmd2", []), ("ict", []), ("scm", ["--scm-derivative", "finite_difference"])]
)
def test_cli_distill_then_generate_with_the_students_steps(
    tmp_path, teacher, data, capsys, method, extra
):
    from PIL import Image

    from diffguide.cli.main import main

    out = str(tmp_path / "run")
    assert (
        main(
            [
                "distill",
                method,
                "--teacher",
                teacher,
                "--data",
                data,
                "--out",
                out,
                "--max-steps",
                "1",
                "--batch",
                "4",
                "--student-steps",
                "2",
                "--quiet",
                *extra,
            ]
        )
        == 0
    )
    student = capsys.readouterr().out.strip().splitlines()[-1]
    assert student == os.path.join(out, "student")
    png = str(tmp_path / "a.png")
    assert main(["generate", "a red circle", "--model", student, "-o", png]) == 0
    meta = json.loads(Image.open(png).text["diffguide"])
    assert (meta["steps"], meta["sampler"], meta["guidance"]) == (2, "consistency", "none")


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["lcm"],
            "unknown distillation method 'lcm'; choose one of: consistency, dmd2, ict, rcm, scm",
        ),
        (
            ["ict", "--ict-total", "-1"],
            "--ict-total must be an integer >= 0 (0: max_steps), got -1",
        ),
        (
            ["scm", "--scm-warmup", "-1"],
            "sCM needs scm_p_std > 0, scm_tangent_c > 0 and scm_warmup >= 0",
        ),
        (["dmd2", "--student-steps", "0"], "--student-steps must be in 1..8, got 0"),
        (["consistency", "--batch", "0"], "--batch must be an integer >= 1, got 0"),
        (
            ["consistency", "--data", "/nonexistent"],
            "data '/nonexistent' is neither 'toy' nor a folder",
        ),
        (["dmd2", "--ladd"], "ladd is an sCM option (SANA-Sprint's hybrid); dmd2 has --gan"),
        (["scm", "--gan"], "gan is a DMD2 option; scm has --ladd"),
        (["scm", "--ladd", "--ladd-weight", "0"], "--ladd-weight must be > 0, got 0.0"),
        (
            ["scm", "--ladd", "--ladd-start-share", "1.5"],
            "--ladd-start-share must be in [0, 1], got 1.5",
        ),
    ],
)
def test_cli_distill_bad_arguments(tmp_path, capsys, argv, message):
    from diffguide.cli.main import main

    assert main(["distill", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


def test_scale_embedding_student_defaults_to_its_trained_scale(tmp_path, teacher, data):
    """Consistency + CFG: the student takes the scale as an input; its folder records the
    default."""
    folder = train(
        _cfg(
            tmp_path / "run",
            teacher,
            data,
            guidance="cfg:scale=4",
            scale_min=2.0,
            scale_max=6.0,
            max_steps=1,
        ),
        progress=False,
    )
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    assert gp.embedded_guidance == 4.0 and gp.family.net.config.time_cond_proj_dim == 256
    a = gp("a red circle", seed=0, output_type="np", progress=False).images
    b = gp("a red circle", seed=0, embedded_guidance=4.0, output_type="np", progress=False).images
    c = gp("a red circle", seed=0, embedded_guidance=6.0, output_type="np", progress=False).images
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(
        ValueError, match="has no scale option; this model's own guidance input is set with"
    ):
        gp("a red circle", seed=0, guidance_scale=4.0)


def test_generate_fast_flag(tmp_path, capsys):
    from diffguide.cli.main import main
    from diffguide.pipelines.pipeline import BUILTIN

    assert (
        main(
            ["generate", "a red circle", "--fast", "--model", "x/y", "-o", str(tmp_path / "a.png")]
        )
        == 2
    )
    assert "--fast picks the built-in distilled student" in capsys.readouterr().err
    assert BUILTIN["builtin-fast"] == "toy-fast"
    # the shipped student: its own steps, sampler and embedded scale, and a real image
    out = tmp_path / "fast.png"
    assert (
        main(["generate", "a red circle on a blue background", "--fast", "--quiet", "-o", str(out)])
        == 0
    )
    err = capsys.readouterr().err
    from PIL import Image

    from diffguide.pipelines.pipeline import builtin_path, read_defaults

    steps = read_defaults(builtin_path("builtin-fast"))["steps"]
    assert f"{steps} network evaluations each" in err and steps <= 4
    meta = json.loads(Image.open(out).text["diffguide"])
    assert (
        meta["model"] == "builtin-fast"
        and meta["steps"] == steps
        and meta["sampler"] == "consistency"
    )
    img = np.asarray(Image.open(out)).astype(float) / 255
    assert img.shape == (32, 32, 3) and img.std() > 0.05  # a picture, not a flat field


@pytest.mark.parametrize(
    "family,method,extra",
    [
        ("pixart", "consistency", {"guidance": "cfg:scale=4"}),
        ("pixart", "dmd2", {"gan": True, "fake_ratio": 1}),
        ("pixart", "ict", {}),
        ("dit", "dmd2", {}),
        ("dit", "scm", {"guidance": "cfg:scale=4"}),
        ("sd3", "scm", {}),
        ("flux", "scm", {}),
        ("sana", "scm", {"guidance": "cfg:scale=3"}),
        ("sdxl", "consistency", {"guidance": "cfg:scale=4"}),
        ("sd3", "consistency", {"guidance": "cfg:scale=4"}),
        ("sd3", "dmd2", {"gan": True, "fake_ratio": 1}),
        ("flux", "ict", {}),
        ("sana", "dmd2", {}),
    ],
)
def test_transformer_teachers(tmp_path, family, method, extra):
    """Each trainer takes a transformer teacher; the student folder is that family's pipeline and
    samples in the student's steps."""
    folder = tm.save(str(tmp_path / "t"), family)
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    texts = ("1", "2") if family == "dit" else ("a red circle", "a blue square")
    data = caption_folder(tmp_path / "data", 8, size=gp.family.default_size, texts=texts)
    cfg = DistillConfig(
        out=str(tmp_path / "run"),
        teacher=folder,
        data=data,
        method=method,
        batch=2,
        max_steps=2,
        checkpoint_every=2,
        log_every=1,
        student_steps=2,
        validate_n=1,
        lr=1e-4,
        skip=100,
        **extra,
    )
    student = train(cfg, progress=False)
    log = [json.loads(x) for x in open(tmp_path / "run" / "loss.jsonl")]
    assert len(log) == 2 and all(np.isfinite(v) for r in log for v in r.values())
    sp = GuidedPipeline.from_pretrained(student, progress=False)
    assert type(sp.family.net).__name__ == type(gp.family.net).__name__
    out = sp(1 if family == "dit" else "a red circle", seed=0, output_type="np")
    assert out.nfe == 2 and np.isfinite(out.images).all()
    flow = type(gp.info.schedule).__name__ == "FlowSchedule"
    if (
        flow and method != "scm"
    ):  # the teacher's own scheduler, no boundary, and the LCM grid of its training
        assert type(sp.pipe.scheduler) is type(gp.pipe.scheduler) and sp.info.boundary is None
        assert sp.info.grid == {
            "spacing": "lcm",
            "original_steps": {"consistency": 10, "ict": 50}.get(method, 2),
        }


def test_flow_students_lcm_grid_is_the_training_indices_as_flow_times():
    """A flow student's grid: LCM's training indices i (999, 749, ... for 4 original steps) at the
    flow times (i + 1) / T of FlowMatchEulerDiscreteScheduler's training sigmas, then the data
    end."""
    import diffguide as dg
    from diffguide.core.spacing import timesteps

    ts = timesteps(dg.FlowSchedule(shift=3.0), 4, "lcm", original_steps=4)
    assert torch.allclose(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    vp = timesteps(dg.VPSchedule.from_betas(), 4, "lcm", original_steps=4)
    assert vp[:-1].tolist() == [999.0, 749.0, 499.0, 249.0]
