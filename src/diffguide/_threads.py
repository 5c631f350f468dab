"""The ``diffguide`` command's thread policy, set before anything loads torch (the package imports
this module first).

torch's OpenMP threads (libgomp) spin 300000 times before they sleep whenever they wait; under
other CPU load the spinning takes the cores the work needs, and a small generate's sampling ran
10-60 times slower on 2 cores (bench/threads.py). Passive threads sleep at once. libgomp reads the
policy once, when torch loads it, so it must be in the environment before the first ``import
torch``. A user's own ``OMP_WAIT_POLICY`` is kept; a library import (Python code importing
diffguide) leaves the process alone."""

import os
import sys


def command_line() -> bool:
    """Whether this process is the ``diffguide`` command: ``python -m diffguide`` (while the package
    imports, ``sys.argv[0]`` is still ``-m``; ``sys.orig_argv`` names the module) or the script."""
    script = os.path.basename((getattr(sys, "argv", None) or [""])[0])
    argv = getattr(sys, "orig_argv", [])
    return os.path.splitext(script)[0] == "diffguide" or any(
        a == "-mdiffguide" or (a == "-m" and b == "diffguide") for a, b in zip(argv, argv[1:])
    )


if "torch" not in sys.modules and command_line():  # once torch is loaded it is too late
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
