"""The smoke subset that CI also runs against the oldest dependency versions pyproject allows
(``.ci/run``): generate on the built-in model and on a tiny SD folder, and one parity case."""

import numpy as np
from PIL import Image

from diffguide.cli.main import main


def test_generate_on_the_builtin_model(tmp_path):
    """The shipped weights load whole (a text encoder that loaded as random weights still makes
    pictures, so the evaluator reads what they show)."""
    from diffguide.toy import evaluator, metrics

    assert (
        main(
            [
                "generate",
                "a red circle on a blue background",
                "--seeds",
                "0-3",
                "--batch",
                "4",
                "--quiet",
                "-o",
                str(tmp_path),
            ]
        )
        == 0
    )
    images = np.stack(
        [
            np.asarray(Image.open(tmp_path / f"{s:06d}.png")).astype(np.float32) / 255
            for s in range(4)
        ]
    )
    assert images.shape == (4, 32, 32, 3)
    res = metrics.evaluate(
        images, np.zeros(4, int), ["a red circle on a blue background"], evaluator.load()
    )
    assert res["adherence"] >= 0.75, res["adherence"]


def test_generate_on_a_tiny_sd_folder(tmp_path):
    folder = str(tmp_path / "tiny")
    assert main(["tiny-model", folder]) == 0
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--model",
                folder,
                "--steps",
                "3",
                "--seeds",
                "0-1",
                "--quiet",
                "-o",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000.png", "000001.png"]


def test_parity_with_diffusers_pipeline(tmp_path):
    from helpers import PIPELINE_CASES, pipeline_parity

    from diffguide.pipelines import tiny as tm

    builder, options, _, _ = PIPELINE_CASES["sd_epsilon_dpmpp_2m"]
    tm.BUILDERS[builder](**options).save_pretrained(tmp_path)
    out, ref = pipeline_parity("sd_epsilon_dpmpp_2m", str(tmp_path))
    assert np.abs(out.images - ref).max() < 1e-5


def test_one_dmd2_step_and_its_student(tmp_path):
    from diffguide.distill.trainer import DistillConfig, train
    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines import tiny as tm

    teacher = tm.save(str(tmp_path / "teacher"), "pixel_sd")
    from helpers import caption_folder

    data = caption_folder(tmp_path / "data", 8)
    folder = train(
        DistillConfig(
            out=str(tmp_path / "run"),
            method="dmd2",
            teacher=teacher,
            data=str(data),
            batch=4,
            max_steps=1,
            student_steps=2,
            gan=True,
            skip=100,
            validate_n=1,
        ),
        progress=False,
    )
    out = GuidedPipeline.from_pretrained(folder, progress=False)(
        "a red circle", seed=0, output_type="np"
    )
    assert out.nfe == 2 and np.isfinite(out.images).all()


def test_generate_on_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "diffguide",
            "generate",
            "a red circle",
            "--seeds",
            "0-3",
            "--steps",
            "2",
            "--quiet",
            "-o",
            str(tmp_path / "o"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [f"{s:06d}.png" for s in range(4)]


def test_lora_when_peft_is_installed(tmp_path):
    import pytest

    pytest.importorskip("peft")
    from test_diffusers_compat import _lora

    from diffguide.pipelines import tiny as tm

    folder = tm.save(str(tmp_path / "sd"), "sd")
    lora = _lora(folder, str(tmp_path / "lora"))
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--model",
                folder,
                "--steps",
                "2",
                "--lora",
                f"{lora}:0.5",
                "--quiet",
                "-o",
                str(tmp_path / "a.png"),
            ]
        )
        == 0
    )


def test_floors_in_pyproject_are_the_checked_ones():
    import os
    import re

    from diffguide import versions

    text = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    floors = dict(re.findall(r'"([A-Za-z0-9_-]+)>=([0-9.]+)"', text))
    assert {k: floors[k] for k in versions.MINIMUM} == versions.MINIMUM
    assert floors["peft"] == versions.OPTIONAL["peft"]


def test_an_older_library_is_named_in_one_line(monkeypatch, tmp_path, capsys):
    from diffguide import versions

    monkeypatch.setattr(
        versions, "installed", lambda name: "0.30.3" if name == "diffusers" else "99.0"
    )
    assert main(["generate", "a", "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "diffguide: error: diffusers 0.30.3 is installed, but diffguide needs diffusers >= "
        "0.36.0: pip install -U 'diffusers>=0.36.0' (or set DIFFGUIDE_UNTESTED_VERSIONS=diffusers "
        "to run untested)"
    )
    assert not (tmp_path / "a.png").exists()


def test_a_version_below_its_floor_runs_only_when_named_untested(monkeypatch):
    """The lent GPU's torch 2.11 cannot be changed: DIFFGUIDE_UNTESTED_VERSIONS=torch lets it run,
    saying so."""
    import pytest

    from diffguide import versions

    monkeypatch.setattr(
        versions, "installed", lambda name: "2.11.0+cu130" if name == "torch" else "99.0"
    )
    with pytest.raises(ValueError, match="torch 2.11.0.cu130 is installed"):
        versions.check()
    monkeypatch.setenv("DIFFGUIDE_UNTESTED_VERSIONS", "torch")
    monkeypatch.setattr(versions, "_SAID", set())
    with pytest.warns(
        UserWarning, match="torch 2.11.0.cu130 is below diffguide's tested floor 2.13.0"
    ):
        assert len(versions.check()) == 1
    monkeypatch.setenv(
        "DIFFGUIDE_UNTESTED_VERSIONS", "diffusers"
    )  # naming another package allows nothing else
    with pytest.raises(ValueError, match="torch"):
        versions.check()
