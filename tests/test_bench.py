"""The bench scripts run in their quick modes (tiny sizes, a few steps) so that they cannot rot.
Nothing here asserts a time."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = [
    ("guidance_methods.py", ["--quick"]),
    ("guiders.py", ["--quick"]),
    ("families_true_cfg.py", ["--quick"]),
    ("stitch.py", ["--quick"]),
    ("speed_quality.py", ["--quick"]),
    ("toy_eval.py", ["--quick"]),
    ("noise.py", ["--quick"]),
    ("samplers.py", ["--quick"]),
    ("eval_processes.py", ["--quick"]),
    ("loop_overhead.py", ["--steps", "2", "--repeats", "1"]),
    ("loop_overhead.py", ["--steps", "2", "--repeats", "1", "--model", "builtin"]),
    (
        "device_bench.py",
        ["--quick", "--models", "sd15,dit", "--guidance", "cfg,cfg+pag,cfg cut", "--no-smoke"],
    ),
    ("graph_key.py", ["--quick"]),
    ("cache.py", ["--quick"]),
    ("nag.py", ["--quick"]),
    ("scm_levels.py", ["builtin-fast", "--quick"]),
]


@pytest.mark.parametrize("script,args", SCRIPTS, ids=[f"{s}{' '.join(a)}" for s, a in SCRIPTS])
def test_bench_script_quick_mode(script, args, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data.get("rows") or data.get("results")


def test_diffguide_bench_command(tmp_path, capsys, monkeypatch):
    from diffguide.cli import bench
    from diffguide.cli.main import main

    monkeypatch.setattr(bench, "CPU_SUITE", bench.CPU_SUITE[:1])  # the rest run above
    assert (
        main(
            ["bench", "--quick", "--out", str(tmp_path), "--bench-dir", os.path.join(ROOT, "bench")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "loop overhead ratio" in out and (tmp_path / "loop_overhead_quick.json").exists()
    assert main(["bench", "--bench-dir", str(tmp_path / "nowhere")]) == 2
    assert "needs the repository's bench/ folder" in capsys.readouterr().err


def test_device_check_script_quick_mode_and_parity_gate(tmp_path):
    """The prepared device script: its CPU quick mode writes JSON and a table with parity checked
    on every guidance setting; an impossible tolerance makes the bench exit 1."""
    script = os.path.join(ROOT, "bench", "device_check.sh")
    r = subprocess.run(
        ["bash", script, str(tmp_path / "out"), "--quick"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # issue 38's multi-GPU step says in one line that this machine cannot measure it
    skipped = json.loads((tmp_path / "out" / "parallel.json").read_text())["skipped"]
    assert "0 CUDA device(s) here" in skipped and skipped in r.stderr
    data = json.loads((tmp_path / "out" / "device.json").read_text())
    assert data["parity"] and all(
        p["ok"] and p["nfe_diffusers"] == p["nfe_diffguide"] for p in data["parity"]
    )
    assert {p["guidance"] for p in data["parity"]} >= {"cfg", "cfg+pag", "cfg cut", "embedded 3.5"}
    assert "| sd15 |" in (tmp_path / "out" / "device.md").read_text()
    # the loop-graph rows' wiring (eager replay on the CPU): captured, and the replay is diffguide's
    # eager image
    assert all(
        p["loop_graph_captured"] and p["loop_graph_diff"]["max"] <= 1e-5 for p in data["parity"]
    )
    assert all(p["max"] >= p["p99"] >= 0 and p["max"] >= p["mean"] >= 0 for p in data["parity"])
    assert {r["mode"] for r in data["rows"]} == {"eager", "loop-graph"}
    assert all(
        r["ms_per_image"][0] > 0 and r["decode_ms"][0] >= 0 for r in data["rows"]
    )  # inclusive quartiles
    # the smoke stage: every family captured once, replayed (same input; twice a new seed and
    # prompt), equal to eager
    assert [s["model"] for s in data["smoke"]] == ["sd15", "sdxl", "dit", "flux"]
    assert all(
        s["ok"] and s["captured"] and s["replays"] == 3 and s["new_input"]["max"] <= 1e-5
        for s in data["smoke"]
    )
    assert data["seconds"]["smoke"] <= data["seconds"]["plan"] and not data["errors"]
    (o,) = data["overhead"]
    assert (
        o["model"] == "sd15"
        and o["network_ms"][1] > 0
        and o["loop_ms"][1] > 0
        and "overhead_eager" in o
    )
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "device_bench.py"),
            "--quick",
            "--models",
            "dit",
            "--tolerance",
            "0",
            "--out",
            str(tmp_path / "x.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "parity failure" in r.stderr
    assert subprocess.run(["bash", script], capture_output=True).returncode == 2
    # past its budget the plan stops starting cases, and what ran is saved
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "device_bench.py"),
            "--quick",
            "--budget-s",
            "0",
            "--no-overhead",
            "--no-smoke",
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    data = json.loads((tmp_path / "b" / "device.json").read_text())
    assert (
        r.returncode == 0
        and data["complete"]
        and [(p["model"], p["guidance"]) for p in data["parity"]] == [("sd15", "cfg")]
    )
    assert (
        "sdxl float32 cfg eager+loop-graph" in data["skipped_for_budget"] and not data["overhead"]
    )


def test_device_bench_keeps_going_after_an_error_and_saves_on_sigterm(tmp_path):
    """A case that raises is recorded in its row and the next case runs; SIGTERM (the wrapper's
    timeout) saves what was measured and exits 124."""
    import signal
    import time

    env = {**os.environ, "DEVICE_BENCH_FAIL": "dit"}
    bench = os.path.join(ROOT, "bench", "device_bench.py")
    r = subprocess.run(
        [
            sys.executable,
            bench,
            "--quick",
            "--no-smoke",
            "--no-overhead",
            "--models",
            "dit,sd15",
            "--guidance",
            "cfg",
            "--out",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    data = json.loads((tmp_path / "e" / "device.json").read_text())
    assert r.returncode == 0, r.stderr[-2000:]
    assert [e["case"] for e in data["errors"]] == ["dit float32 cfg"] and "planted" in data[
        "errors"
    ][0]["error"]
    assert [p["model"] for p in data["parity"]] == ["sd15"] and data["complete"]
    p = subprocess.Popen(
        [sys.executable, bench, "--quick", "--no-overhead", "--out", str(tmp_path / "s")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(3000):  # until the first smoke row is saved (minutes on a loaded machine)
        if (tmp_path / "s" / "device.json").exists() and json.loads(
            (tmp_path / "s" / "device.json").read_text()
        )["smoke"]:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 124
    data = json.loads((tmp_path / "s" / "device.json").read_text())
    assert data["stopped"] == "SIGTERM" and data["smoke"] and not data["complete"]
