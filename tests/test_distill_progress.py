"""``diffguide distill`` says what it is doing before its first step (loading the teacher, the data,
building the student), and loss.jsonl has step 1 and the run's last step besides every
--log-every steps, so a short run logs something; the regular lines are what they were."""

import json
import os
import subprocess
import sys

import pytest

from diffguide.distill.trainer import DistillConfig, train
from diffguide.pipelines import tiny as tm
from helpers import caption_folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tm.save(str(tmp_path_factory.mktemp("teacher") / "t"), "pixel_sd")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return caption_folder(tmp_path_factory.mktemp("data"), 16)


def _steps(out) -> list:
    with open(os.path.join(out, "loss.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_says_what_it_does_first_and_logs_a_short_run(tmp_path, teacher, data):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "diffguide", "distill", "consistency", "--teacher", teacher]
    cmd += ["--data", data, "--out", out, "--max-steps", "3", "--batch", "4"]
    cmd += ["--student-steps", "2", "--validate-n", "1", "--validate-prompts", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.startswith("distill ")]
    assert lines[0] == f"distill consistency: loading teacher {teacher}"
    said = [ln.split(": ", 1)[1] for ln in lines[:4]]
    for text, start in zip(said, ["loading", "data: reading", "building", "effective batch"]):
        assert text.startswith(start), lines
    # shorter than --log-every (20): step 1 and the last step
    assert [rec["step"] for rec in _steps(out)] == [1, 3]


def test_extra_lines_leave_the_regular_ones_unchanged(tmp_path, teacher, data):
    """With log_every 2 over 5 steps the lines are at 1, 2, 4 and 5; line 2 is still the mean of
    steps 1 and 2 (the step-1 line does not restart the window), as a log_every 1 run shows."""
    base = dict(teacher=teacher, data=data, batch=4, max_steps=5, skip=100, lr=1e-3)
    base.update(validate_n=1, validate_prompts=1)
    runs = {}
    for every in (1, 2):
        out = str(tmp_path / f"every{every}")
        train(DistillConfig(out=out, log_every=every, **base), progress=False)
        runs[every] = _steps(out)
    each = {rec["step"]: rec["loss"] for rec in runs[1]}
    got = {rec["step"]: rec["loss"] for rec in runs[2]}
    assert list(got) == [1, 2, 4, 5]
    assert got[1] == pytest.approx(each[1])
    assert got[2] == pytest.approx((each[1] + each[2]) / 2)
    assert got[4] == pytest.approx((each[3] + each[4]) / 2)
    assert got[5] == pytest.approx(each[5])
