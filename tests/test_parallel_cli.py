"""``diffguide generate --parallel`` under torchrun (2 CPU processes, gloo): the processes make each
image together, the first writes it, and its pixels are one process's (to 8-bit rounding); refusals
are one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffguide.cli.main import main
from diffguide.pipelines import tiny as tm
from helpers import torch_threads, torchrun


@pytest.fixture(autouse=True)
def one_thread():
    """The one-process reference runs with the launched processes' thread count."""
    with torch_threads(1):
        yield


def launched(args: list[str]) -> subprocess.CompletedProcess:
    return torchrun(["-m", "diffguide", "generate", *args])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def close_pixels(a, b) -> bool:
    """The same image but for 8-bit rounding: a process running one branch row computes a batch of 1
    where one process computes both rows together, and the last float bit can differ (the float
    images agree to 5e-5 in test_parallel_branches.py), which may flip a pixel's rounding by one
    level (seen: one value of 3,072)."""
    d = np.abs(pixels(a) - pixels(b))
    return d.max() <= 1 and (d > 0).mean() <= 0.01


def settings(path) -> dict:
    return json.loads(Image.open(path).text["diffguide"])


def test_branches_on_two_processes_write_one_process_images(tmp_path, capsys):
    """CFG on the built-in model, two seeds (two batches, each made by both processes): one file
    per seed, written once, equal to one process's, its settings naming the parallel layout."""
    common = ["a red circle", "--steps", "3", "--seeds", "0-1", "--quiet"]
    assert main(["generate", *common, "-o", str(tmp_path / "one")]) == 0
    res = launched([*common, "-o", str(tmp_path / "two"), "--parallel", "branches"])
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert len(os.listdir(tmp_path / "two")) == 2
    names = sorted(os.listdir(tmp_path / "one"))
    assert res.stdout.split() == [str(tmp_path / "two" / f) for f in names]
    assert res.stderr.count("2 image(s)") == 1 and "(--parallel branches)" in res.stderr
    for name in names:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        assert close_pixels(one, two), name
        meta = settings(two)
        assert meta["parallel"] == "branches" and "parallel" not in settings(one)
        assert {k: v for k, v in meta.items() if k != "parallel"} == settings(one)
    # made again from its file on one process: the layout is no setting, and goes unmentioned
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(two), "-o", str(again), "--quiet"]) == 0
    assert "not read" not in capsys.readouterr().err
    assert close_pixels(again, two)


def test_sequence_on_two_processes_writes_one_process_image(tmp_path):
    """A tiny Flux.1 folder with the transformer's tokens split between the processes."""
    model = str(tmp_path / "flux")
    tm.save(model, "flux")
    common = ["a red circle", "--model", model, "--guidance", "cfg:scale=4", "--steps", "3"]
    common += ["--height", "32", "--width", "32", "--quiet"]
    assert main(["generate", *common, "-o", str(tmp_path / "one.png")]) == 0
    launched([*common, "-o", str(tmp_path / "two.png"), "--parallel", "sequence"])
    assert np.array_equal(pixels(tmp_path / "one.png"), pixels(tmp_path / "two.png"))
    assert settings(tmp_path / "two.png")["parallel"] == "sequence"


@pytest.mark.parametrize(
    "world, extra, said",
    [
        (None, [], "launch several, e.g. torchrun --nproc_per_node 2"),
        ("2", ["--cache", "deepcache"], "it cannot run with --cache"),
        ("2", ["--cuda-graph"], "it cannot run with --cuda-graph"),
        ("2", ["--parallel", "branches=4"], "needs 4 processes; this run has 2"),
        ("2", ["--parallel", "rows"], "parallel must be None or a spec"),
    ],
)
def test_refusals_are_one_line_before_any_loading(monkeypatch, capsys, world, extra, said):
    """Checked before the model loads (and before a process group starts): exit status 2, one
    line."""
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    args = ["generate", "a cat", "--parallel", "branches", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("diffguide: error:") and said in err, err


def test_a_launched_process_ends_with_its_status_and_its_output(tmp_path):
    """``exit_launched``: the process group closed, unflushed output kept, the given status, and no
    interpreter teardown (an atexit hook never runs: that is where gloo's threads could abort)."""
    script = tmp_path / "end.py"
    script.write_text(
        "import atexit, sys, torch.distributed as dist\n"
        "from diffguide.parallel import exit_launched\n"
        "url = f'file://{sys.argv[1]}'\n"
        "dist.init_process_group('gloo', init_method=url, rank=0, world_size=1)\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "sys.stdout.write('done')\n"
        "exit_launched(3)\n"
    )
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "rendezvous")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (res.returncode, res.stdout) == (3, "done"), res.stderr[-2000:]
