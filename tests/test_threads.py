"""The command's thread policy: ``diffguide`` puts OMP_WAIT_POLICY=PASSIVE in its environment
before torch loads (OpenMP threads that spin while they wait made a small generate 30-100x slower
under other CPU load, bench/threads.py), keeps a user's own value; a library import changes
nothing."""

import os
import re
import subprocess
import sys

import pytest


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **extra}


def _spin_count(policy: str | None) -> str:
    """libgomp's spin count as it reports it at load (OMP_DISPLAY_ENV) in ``python -m diffguide``:
    the proof that the policy was in place when torch loaded OpenMP, not only in os.environ."""
    env = _env(OMP_DISPLAY_ENV="VERBOSE", **({"OMP_WAIT_POLICY": policy} if policy else {}))
    r = subprocess.run(
        [sys.executable, "-m", "diffguide", "list"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    m = re.search(r"GOMP_SPINCOUNT = '(\d+)'", r.stderr)
    if m is None:
        pytest.skip("torch's OpenMP here is not libgomp (no GOMP_SPINCOUNT in its report)")
    return m[1]


def test_command_makes_openmp_threads_passive():
    assert _spin_count(None) == "0"  # PASSIVE: sleep at once (libgomp's own default spins 300000)


def test_command_keeps_the_users_policy():
    assert _spin_count("ACTIVE") == "30000000000"


def test_script_entry_sets_it_and_library_import_does_not(tmp_path):
    read = "import os, diffguide; print(os.environ.get('OMP_WAIT_POLICY'))"
    script = tmp_path / "diffguide"  # as the installed console script is named
    script.write_text(read + "\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env())
    assert r.stdout.strip() == "PASSIVE", r.stderr
    r = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, env=_env())
    assert r.stdout.strip() == "None", r.stderr
