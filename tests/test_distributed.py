"""Two real CPU processes (torchrun, gloo): distillation averages gradients across them, generation
and evaluation share their work, and a killed two-process run resumes bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffguide.distill import checkpoint
from diffguide.distill.trainer import DistillConfig, train
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from helpers import caption_folder, states_equal

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
TRAIN = [
    "--batch",
    "4",
    "--checkpoint-every",
    "2",
    "--log-every",
    "1",
    "--skip",
    "100",
    "--lr",
    "1e-3",
    "--quiet",
]
DMD2 = ["--student-steps", "2", "--fake-ratio", "2", "--gan"]
# settings of a run, as the CLI arguments above give them, for the one-process reference
CONFIG = dict(batch=4, checkpoint_every=2, log_every=1, skip=100, lr=1e-3)
DMD2_CONFIG = dict(method="dmd2", student_steps=2, fake_ratio=2, gan=True, lr=1e-3)


@pytest.fixture(autouse=True)
def one_thread():
    """The one-process references run with the launched processes' thread count: CPU kernels sum in
    another order on another number of threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def two(*args, check=True, **kw):
    """``diffguide ARGS`` on two processes; the completed process."""
    res = subprocess.run(
        LAUNCH + ["-m", "diffguide", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"two-process run failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tm.save(str(tmp_path_factory.mktemp("teacher") / "t"), "pixel_sd")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 random 8x8 images with captions, in the imagefolder layout."""
    return caption_folder(tmp_path_factory.mktemp("data"), 32)


@pytest.fixture(scope="module")
def dmd2_two(tmp_path_factory, teacher, data):
    """An uninterrupted two-process DMD2 + GAN run of 20 steps."""
    out = str(tmp_path_factory.mktemp("dmd2") / "run")
    two(
        "distill",
        "dmd2",
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        "20",
        *TRAIN,
        *DMD2,
    )
    return out


def _one(out, teacher, data, steps, **kw):
    """The same run on this one process with two accumulated micro-batches per step."""
    train(
        DistillConfig(
            out=str(out),
            teacher=teacher,
            data=data,
            max_steps=steps,
            grad_accum=2,
            **{**CONFIG, **kw},
        ),
        progress=False,
    )
    return checkpoint.load(os.path.join(out, "checkpoint.pt"))


SKIP = ("config", "processes")


def test_consistency_two_processes_equal_one_with_accumulation(tmp_path, teacher, data):
    out = str(tmp_path / "two")
    res = two(
        "distill",
        "consistency",
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        "3",
        *TRAIN,
        "--guidance",
        "cfg:scale=4",
        "--scale-range",
        "2,6",
    )
    assert res.stdout.strip().splitlines() == [os.path.join(out, "student")]  # printed once
    a = checkpoint.load(os.path.join(out, "checkpoint.pt"))
    b = _one(
        tmp_path / "one", teacher, data, 3, guidance="cfg:scale=4", scale_min=2.0, scale_max=6.0
    )
    assert a["processes"] == 2 and b["processes"] == 1 and a["step"] == 3
    assert states_equal(a, b, SKIP)
    start = GuidedPipeline.from_pretrained(teacher, progress=False).family.net.state_dict()
    assert any(
        not torch.equal(v, start[k]) for k, v in a["student"].items() if k in start
    )  # it trained
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["processes"], cfg["effective_batch"]) == (2, 8)


def test_dmd2_gan_two_processes_equal_one_with_accumulation(tmp_path, teacher, data, dmd2_two):
    a = checkpoint.load(os.path.join(dmd2_two, "checkpoint.pt"))
    b = _one(tmp_path / "one", teacher, data, 20, **DMD2_CONFIG)
    assert a["step"] == 20 and {"fake", "head", "fake_opt"} <= a.keys()
    assert states_equal(a, b, SKIP)
    # the losses in the log are the means over both processes' micro-batches
    la = [json.loads(x) for x in open(os.path.join(dmd2_two, "loss.jsonl"))]
    lb = [json.loads(x) for x in open(tmp_path / "one" / "loss.jsonl")]
    assert [r["step"] for r in la] == list(range(1, 21))
    for ra, rb in zip(la, lb):
        assert ra.keys() == rb.keys()
        assert all(
            abs(ra[k] - rb[k]) <= 1e-9 * max(1.0, abs(rb[k])) for k in ra if k not in ("seconds",)
        )


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parent[int(name)] = int(
                    open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def test_two_process_run_killed_and_resumed_is_bit_identical(tmp_path, teacher, data, dmd2_two):
    out = str(tmp_path / "run")
    args = [
        "distill",
        "dmd2",
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        "20",
        *TRAIN,
        *DMD2,
    ]
    proc = subprocess.Popen(
        LAUNCH + ["-m", "diffguide", *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log, deadline = os.path.join(out, "loss.jsonl"), time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(log) and any(
                json.loads(x)["step"] >= 3 for x in open(log) if x.endswith("\n")
            ):
                break  # the step-2 checkpoint is on disk and later steps are logged
            time.sleep(0.01)
    finally:
        # the launcher starts its workers in sessions of their own: kill -9 each of them
        workers = _descendants(proc.pid)
        for pid in workers + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in workers):
            time.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL and len(workers) >= 2, (
        "the run ended before it could be killed"
    )
    killed_at = checkpoint.load(os.path.join(out, "checkpoint.pt"))["step"]
    assert 2 <= killed_at < 20 and not os.path.exists(os.path.join(out, "student"))
    # what a kill during a save leaves behind, and a log line cut short
    open(os.path.join(out, "checkpoint.pt.tmp4242"), "wb").write(b"partial")
    open(os.path.join(out, ".checkpoint.pt.x1y2.tmp"), "wb").write(b"partial")
    with open(log, "a") as f:
        f.write('{"step": 99, "fa')
    two(*args, "--resume")
    assert not any(n.startswith(("checkpoint.pt.tmp", ".checkpoint.pt.")) for n in os.listdir(out))
    a = checkpoint.load(os.path.join(out, "checkpoint.pt"))
    b = checkpoint.load(os.path.join(dmd2_two, "checkpoint.pt"))
    assert states_equal(a, b)
    steps = [json.loads(x)["step"] for x in open(log)]
    assert steps == list(range(1, 21)), steps  # no line repeated, none lost


def test_resume_refuses_another_effective_batch(tmp_path, teacher, data, dmd2_two):
    """Four per process on two processes is eight; one process with batch 4 and no accumulation is
    not."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(dmd2_two, out)
    with pytest.raises(
        ValueError, match=r"effective batch of 8 \(batch 4 x 2 processes x accumulation 1\)"
    ):
        train(
            DistillConfig(
                out=str(out),
                teacher=teacher,
                data=data,
                max_steps=22,
                resume=True,
                **{**CONFIG, **DMD2_CONFIG},
            ),
            progress=False,
        )
    # eight as one process with two accumulated micro-batches continues it
    train(
        DistillConfig(
            out=str(out),
            teacher=teacher,
            data=data,
            max_steps=22,
            resume=True,
            grad_accum=2,
            **{**CONFIG, **DMD2_CONFIG},
        ),
        progress=False,
    )
    assert checkpoint.load(str(out / "checkpoint.pt"))["step"] == 22


def test_eval_on_two_processes_equals_one(tmp_path):
    from diffguide.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red circle on a blue background\na blue square\na green circle and a red cross\n"
        "an orange cross on a blue background\n"
    )
    common = ["--prompts", str(prompts), "--steps", "3", "--batch", "2", "--seed", "1", "--quiet"]
    two(
        "eval",
        "--images-per-prompt",
        "3",
        *common,
        "--out",
        str(tmp_path / "two.json"),
        "--per-image",
        str(tmp_path / "two.jsonl"),
    )
    assert (
        main(
            [
                "eval",
                "--n",
                "3",
                *common,
                "--out",
                str(tmp_path / "one.json"),
                "--per-image",
                str(tmp_path / "one.jsonl"),
            ]
        )
        == 0
    )
    a, b = (json.load(open(tmp_path / f"{k}.json")) for k in ("two", "one"))
    assert (a.pop("processes"), b.pop("processes")) == (2, 1)
    a.pop("seconds_per_image"), b.pop("seconds_per_image")
    assert a == b
    per = (tmp_path / "two.jsonl").read_text()
    assert per == (tmp_path / "one.jsonl").read_text() and len(per.splitlines()) == 12


def test_generate_on_two_processes_writes_the_same_bytes(tmp_path):
    from diffguide.cli.main import main

    common = ["a red circle", "--seeds", "0-4", "--steps", "3", "--batch", "2", "--quiet"]
    res = two("generate", *common, "-o", str(tmp_path / "two"))
    assert main(["generate", *common, "-o", str(tmp_path / "one")]) == 0
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == [f"{s:06d}.png" for s in range(5)] == sorted(os.listdir(tmp_path / "two"))
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes()
    assert res.stdout.split() == [str(tmp_path / "two" / n) for n in names]  # listed once, in order


SCRIPT = """
import sys, numpy as np
from accelerate import PartialState
from diffguide.pipelines import GuidedPipeline
from diffguide.parallel import gather
state = PartialState(cpu=True)
gp = GuidedPipeline.from_pretrained("builtin", progress=False)
out = gp(["a red circle", "a blue square"], num_images_per_prompt=3, seed=10, steps=3,
         output_type="np", process_state=state)
parts = gather([(out.indices, out.seeds, out.images)], state)
if state.is_main_process:
    np.savez(sys.argv[1], indices=np.concatenate([p[0] for p in parts]),
             seeds=np.concatenate([p[1] for p in parts]),
             images=np.concatenate([p[2] for p in parts]))
state.wait_for_everyone()
from diffguide.parallel import exit_launched
exit_launched(0)  # gloo's teardown at interpreter exit sometimes aborts ("terminate called ...")
"""


def test_guided_pipeline_shares_a_call_between_processes(tmp_path):
    script = tmp_path / "share.py"
    script.write_text(SCRIPT)
    res = subprocess.run(
        LAUNCH + [str(script), str(tmp_path / "out.npz")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    z = np.load(tmp_path / "out.npz")
    assert z["indices"].tolist() == list(range(6)) and z["seeds"].tolist() == list(range(10, 16))
    gp = GuidedPipeline.from_pretrained("builtin", progress=False)
    # each process made its three images as one batch: the same as one process making those three
    first = gp("a red circle", num_images_per_prompt=3, seed=10, steps=3, output_type="np").images
    rest = gp(["a blue square"], num_images_per_prompt=3, seed=13, steps=3, output_type="np").images
    assert np.array_equal(z["images"], np.concatenate([first, rest]))
    whole = gp(
        ["a red circle", "a blue square"],
        num_images_per_prompt=3,
        seed=10,
        steps=3,
        output_type="np",
    ).images
    assert np.abs(z["images"] - whole).max() < 1e-5
