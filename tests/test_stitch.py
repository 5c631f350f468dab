"""T-Stitch: the small model for the first steps, the large one after, history kept or reset."""

import numpy as np
import pytest
import torch

import diffguide as dg

F64 = torch.float64
LABELS = torch.arange(8) % 4
NULL = torch.full((8,), -1)


@pytest.fixture(scope="module")
def small(sd):
    return dg.GaussianMixture.ring(sd, radius=1.3, std=0.2)  # a different "model", same schedule


def _x(sd, ts):
    return torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * float(
        sd.sigma(ts[0])
    )


def _stitched(gmm, small, sd, fraction, sampler, reset=False, steps=10, guidance="cfg:scale=3"):
    ts = dg.timesteps(sd, steps, "karras")
    d = dg.guide(
        gmm,
        guidance,
        LABELS,
        NULL,
        models={"small": small},
        stitch=dg.Stitch(fraction, reset=reset),
    )
    return dg.sample(d, sampler, ts, _x(sd, ts), dg.SeededNoise(range(8))), d


def _split(gmm, small, sd, k, sampler, steps=10, guidance="cfg:scale=3"):
    """Small model on the first k steps, then a fresh run of the large one on the rest of the
    grid."""
    ts = dg.timesteps(sd, steps, "karras")
    noise = dg.SeededNoise(range(8))
    x = dg.sample(dg.guide(small, guidance, LABELS, NULL), sampler, ts[: k + 1], _x(sd, ts), noise)
    return dg.sample(dg.guide(gmm, guidance, LABELS, NULL), sampler, ts[k:], x, noise)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_fraction_zero_and_one(gmm, small, sd, sampler):
    ts = dg.timesteps(sd, 10, "karras")
    for fraction, model in ((0.0, gmm), (1.0, small)):
        out, d = _stitched(gmm, small, sd, fraction, sampler)
        alone = dg.sample(
            dg.guide(model, "cfg:scale=3", LABELS, NULL),
            sampler,
            ts,
            _x(sd, ts),
            dg.SeededNoise(range(8)),
        )
        assert torch.equal(out, alone)


# lower_order_final would drop the order at the end of the first part of the two-run reference
@pytest.mark.parametrize(
    "sampler", ["dpmpp_2m:lower_order_final=false", "dpmpp_3m:lower_order_final=false", "ddim"]
)
def test_reset_equals_two_separate_runs(gmm, small, sd, sampler):
    out, _ = _stitched(gmm, small, sd, 0.4, sampler, reset=True)
    ref = _split(gmm, small, sd, 4, sampler)
    assert (out - ref).abs().max() < 1e-12


def test_history_is_kept_by_default(gmm, small, sd):
    kept, _ = _stitched(gmm, small, sd, 0.4, "dpmpp_2m")
    reset, _ = _stitched(gmm, small, sd, 0.4, "dpmpp_2m", reset=True)
    assert (kept - reset).abs().max() > 1e-4  # the first large step extrapolates from small x0
    # a memoryless sampler has nothing to keep: both are the two-part run
    ddim, _ = _stitched(gmm, small, sd, 0.4, "ddim")
    assert (ddim - _split(gmm, small, sd, 4, "ddim")).abs().max() < 1e-12


def test_which_model_runs_each_step(sd):
    calls = []

    class Spy:
        schedule = sd

        def __init__(self, name):
            self.name = name

        def __call__(self, x, t, cond):
            calls.append((self.name, cond))
            return dg.Pred(0 * x, x)

    ts = dg.timesteps(sd, 10, "karras")
    d = dg.guide(
        Spy("large"),
        "cfg:scale=2",
        "c",
        "u",
        models={"small": Spy("small")},
        conds={"pos@small": "c-small"},
        stitch=dg.Stitch(0.45),
    )
    dg.sample(d, "euler", ts, torch.zeros(2, 2))
    # string conditions cannot be batched: one pass per branch; floor(0.45 * 10) = 4 small steps
    assert [n for n, _ in calls] == ["small"] * 8 + ["large"] * 12
    assert sorted(c for _, c in calls[:2]) == ["c-small", "u"]  # the small model's own encoding
    assert sorted(c for _, c in calls[8:10]) == ["c", "u"]
    assert d.nfe == 20


def test_mismatched_schedules_are_refused(gmm, sd):
    other = dg.GaussianMixture.ring(dg.VPSchedule.from_betas(beta_schedule="linear"))
    with pytest.raises(ValueError, match="noise schedules differ"):
        dg.guide(gmm, "none", LABELS, models={"small": other}, stitch=dg.Stitch(0.4))
    with pytest.raises(ValueError, match="stitch needs model 'small'"):
        dg.guide(gmm, "none", LABELS, stitch=dg.Stitch(0.4))
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        dg.Stitch(1.5)


# -- GuidedPipeline and the CLI
# ---------------------------------------------------------------------


def _pipes():
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines import tiny as tm

    large = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    small = tm.sd(prediction_type="v_prediction")  # other weights and prediction type, same space
    small.unet = tm.unet(7)
    return large, GuidedPipeline.from_pipe(small, progress=False)


def test_pipeline_stitching_endpoints_and_middle():
    from diffguide.pipelines import Stitching

    large, small = _pipes()
    kw = dict(
        guidance="cfg:scale=3", steps=6, seed=[0, 1], num_images_per_prompt=2, output_type="np"
    )
    alone_l, alone_s = large("a red circle", **kw).images, small("a red circle", **kw).images
    assert np.abs(alone_l - alone_s).max() > 1e-3
    r0 = large("a red circle", stitch=Stitching(small, 0.0), **kw)
    r1 = large("a red circle", stitch=Stitching(small, 1.0), **kw)
    mid = large("a red circle", stitch=Stitching(small, 0.5), **kw)
    assert np.array_equal(r0.images, alone_l)
    assert np.abs(r1.images - alone_s).max() < 1e-5  # the small model with its own prompt encoding
    assert np.abs(mid.images - alone_l).max() > 1e-4 and np.abs(mid.images - alone_s).max() > 1e-4
    assert mid.nfe == 12


def test_pipeline_refuses_other_latent_spaces_and_schedules():
    from diffguide.pipelines import GuidedPipeline, Stitching
    from diffguide.pipelines import tiny as tm

    large, _ = _pipes()
    for other, msg in (
        (tm.dit(), "cannot stitch"),
        (tm.pixel_sd(), "latent spaces differ"),
        (tm.sd(beta_schedule="linear"), "noise schedules differ"),
    ):
        with pytest.raises(ValueError, match=msg):
            large(
                "a red circle",
                steps=2,
                stitch=Stitching(GuidedPipeline.from_pipe(other, progress=False)),
            )


def test_cli_stitch(tmp_path, capsys):
    import json

    from diffguide.cli.main import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert (
        main(
            [
                "eval",
                "--prompts",
                str(prompts),
                "--n",
                "2",
                "--steps",
                "4",
                "--stitch",
                "builtin-small:0.5",
                "--stitch-reset",
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert (
        res["stitch"] == "builtin-small:0.5"
        and res["stitch_reset"] is True
        and res["nfe_per_image"] == 8
    )
    out = tmp_path / "s.png"
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--stitch",
                "builtin-small",
                "--steps",
                "4",
                "-o",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    from PIL import Image

    assert json.loads(Image.open(out).text["diffguide"])["stitch"] == "builtin-small"
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--stitch",
                "builtin-small:1.5",
                "-o",
                str(tmp_path / "t.png"),
            ]
        )
        == 2
    )
    assert "--stitch fraction must be in [0, 1], got 1.5" in capsys.readouterr().err
