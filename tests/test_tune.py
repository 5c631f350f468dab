"""diffguide tune, ICG's real-prompt stand-ins, NFE accounting over a prompt set, the CFG++ hint,
and the layering of evaluation (no import from distill/ or bench/ into cli/)."""

import json
import os
import re

import numpy as np
import pytest
import torch

import diffguide as dg
from diffguide.cli.main import main
from diffguide.evaluate import prompt_set
from diffguide.evaluate.tune import ag_threshold
from diffguide.pipelines import GuidedPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle on a blue background", "a blue square and a yellow triangle"]


@pytest.fixture(scope="module")
def gp():
    return GuidedPipeline.from_pretrained("builtin", progress=False)


def _run(c_rows, u_rows):
    """A recorded trajectory from per-evaluation x0 rows (one image per row)."""
    return [
        (None, torch.tensor(c, dtype=torch.float64), torch.tensor(u, dtype=torch.float64))
        for c, u in zip(c_rows, u_rows)
    ]


def test_ag_threshold_meets_the_nfe_target_exactly():
    """Four evaluations, two images whose correlations rise at different rates: the chosen
    threshold is the highest whose switch points give at most the target NFE."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, 64))
    noise = rng.normal(size=(2, 64))
    scales = [[1.0, 0.5, 0.2, 0.05], [1.0, 0.8, 0.6, 0.1]]  # how far u is from c at each evaluation
    runs = [
        _run([base[i : i + 1]] * 4, [base[i : i + 1] + s * noise[i : i + 1] for s in scales[i]])
        for i in range(2)
    ]
    corr = [
        [float(np.corrcoef(base[i], base[i] + s * noise[i])[0, 1]) for s in scales[i]]
        for i in range(2)
    ]
    th, stats = ag_threshold(runs, 0.6)  # below the least possible (both switch at once: 5/8)
    assert not stats["target_met"] and stats["nfe_fraction"] == pytest.approx(5 / 8)
    for target in (0.7, 0.75, 1.0):
        th, stats = ag_threshold(runs, target)
        first = [next((k for k, v in enumerate(c) if v >= th), 3) for c in corr]
        nfe = np.mean([4 + f + 1 for f in first]) / 8
        assert stats["nfe_fraction"] == pytest.approx(nfe) and nfe <= target and stats["target_met"]
        # no higher threshold meets it
        higher = sorted({np.floor(v * 1e6) / 1e6 for c in corr for v in c} - {th})
        higher = [h for h in higher if h > th]
        for h in higher:
            f = [next((k for k, v in enumerate(c) if v >= h), 3) for c in corr]
            assert np.mean([4 + x + 1 for x in f]) / 8 > target


@pytest.mark.parametrize("method", ["ag", "apg", "linear_ag"])
def test_tune_is_deterministic_and_its_spec_loads(tmp_path, method):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    outs = []
    for k in range(2):
        path = tmp_path / f"{k}.json"
        assert (
            main(
                [
                    "tune",
                    method,
                    "--prompts",
                    str(prompts),
                    "--n",
                    "1",
                    "--steps",
                    "5",
                    "--quiet",
                    "-o",
                    str(path),
                ]
            )
            == 0
        )
        data = json.load(open(path))
        data.pop("seconds")
        outs.append(data)
    g0, g1 = outs[0].pop("guidance"), outs[1].pop("guidance")
    c0, c1 = outs[0].pop("coefficients", None), outs[1].pop("coefficients", None)
    assert outs[0] == outs[1] and g0.replace("0.json", "X") == g1.replace("1.json", "X")
    if c0 is not None:  # least squares may differ in the last bits between calls (threaded LAPACK)
        assert np.allclose(
            np.array(c0[1:], dtype=float), np.array(c1[1:], dtype=float), rtol=1e-9, atol=1e-12
        )
    spec = dg.parse_spec("guidance", f"@{tmp_path / '0.json'}")
    assert dg.to_spec(spec).split(":")[0] == method
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--guidance",
                f"@{tmp_path / '0.json'}",
                "--steps",
                "5",
                "--quiet",
                "-o",
                str(tmp_path / "a.png"),
            ]
        )
        == 0
    )


def test_spec_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"sampler": "euler"}')
    with pytest.raises(ValueError, match=r"has no 'guidance' entry"):
        dg.parse_spec("guidance", f"@{bad}")
    with pytest.raises(ValueError, match=r"cannot read guidance spec file"):
        dg.parse_spec("guidance", f"@{tmp_path / 'missing.json'}")


def test_nfe_per_image_is_the_mean_over_images(gp):
    """AG switches at different evaluations per image and per prompt; the prompt set's NFE per
    image is the mean of each image's own count (each made alone here)."""
    g = dg.parse_spec("guidance", "ag:scale=5,threshold=0.99")
    _, _, nfe, _ = prompt_set(gp, PROMPTS, 2, 0, g, "dpmpp_2m", 10)
    own = [
        gp(p, guidance=g, seed=s, steps=10, output_type="latent").nfe
        for k, p in enumerate(PROMPTS)
        for s in (k * 1000, k * 1000 + 1)
    ]
    assert len(set(own)) > 1  # the switch points differ, so a last-batch count would be wrong
    assert nfe == pytest.approx(np.mean(own))


def test_icg_real_prompt_stand_ins(gp, tmp_path):
    """condition=prompts draws each image's stand-in from a prompt set per evaluation: from the toy
    world's captions on the built-in model, or a file; repeatable per seed."""
    a = gp(
        "a red circle", guidance="icg:scale=3,condition=prompts", steps=5, seed=3, output_type="np"
    ).images
    b = gp(
        "a red circle", guidance="icg:scale=3,condition=prompts", steps=5, seed=3, output_type="np"
    ).images
    assert np.array_equal(a, b)
    gauss = gp("a red circle", guidance="icg:scale=3", steps=5, seed=3, output_type="np").images
    assert np.abs(a - gauss).max() > 1e-3
    one = tmp_path / "one.txt"
    one.write_text("a green square on a black background\n")
    only = gp(
        "a red circle",
        guidance=f"icg:scale=3,condition=prompts,prompts={one}",
        steps=5,
        seed=3,
        output_type="np",
    ).images
    # a single stand-in prompt is CFG with that prompt as the negative
    cfg = gp(
        "a red circle",
        negative_prompt="a green square on a black background",
        guidance="cfg:scale=3",
        steps=5,
        seed=3,
        output_type="np",
    ).images
    assert np.abs(only - cfg).max() < 1e-5


def test_icg_prompts_need_a_set_on_other_models(tmp_path):
    from diffguide.pipelines import tiny as tm

    other = GuidedPipeline.from_pretrained(tm.save(str(tmp_path / "sd"), "sd"), progress=False)
    with pytest.raises(ValueError, match="no caption set of its own: give prompts"):
        other("a", guidance="icg:condition=prompts", steps=2)


def test_cfgpp_hint_is_the_per_step_equivalence_of_the_grid_in_use(gp):
    """One Euler/DDIM CFG++ step with lambda equals CFG with lambda ve / (ve - ve'); the message
    quotes the median of that ratio on the run's own grid."""
    for steps in (10, 25, 50):
        ve = gp.info.schedule.ve(gp.info.timesteps(steps)).tolist()
        ratios = sorted(a / (a - b) for a, b in zip(ve[:-1], ve[1:]))
        med = float(np.median(ratios))
        with pytest.raises(ValueError) as e:
            gp("a", guidance="cfgpp", guidance_scale=5, steps=steps)
        got = [
            float(v)
            for v in re.search(
                r"act like CFG ([\d.]+) / ([\d.]+) / ([\d.]+)", str(e.value)
            ).groups()
        ]
        assert got == pytest.approx([0.4 * med, 0.6 * med, med], abs=0.051)


def test_no_import_into_the_cli_from_below():
    bad = []
    for top in (
        "src/diffguide/distill",
        "src/diffguide/evaluate",
        "src/diffguide/pipelines",
        "bench",
    ):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(folder, f)).read()
                    if re.search(
                        r"^\s*(from \.\.cli|from diffguide\.cli|import diffguide\.cli)", text, re.M
                    ):
                        bad.append(os.path.join(folder, f))
    assert not bad
