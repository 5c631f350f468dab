"""Parameters held out of autograd for a while, safely across threads (noise optimisation and
distillation need gradients in their inputs only)."""

from __future__ import annotations

import contextlib
import threading

_FREEZE_LOCK = threading.Lock()
_FROZEN: dict = {}  # parameter -> [holders, its requires_grad before the first holder]


@contextlib.contextmanager
def frozen(*modules):
    """Parameters out of autograd for a while (noise optimisation needs gradients in x only); their
    requires_grad flags come back when the last holder leaves, so concurrent runs on one model
    cannot leave it frozen or thaw it under each other."""
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    with _FREEZE_LOCK:
        for p in params:
            entry = _FROZEN.get(p)
            if entry is None:
                _FROZEN[p] = [1, p.requires_grad]
                p.requires_grad_(False)
            else:
                entry[0] += 1
    try:
        yield
    finally:
        with _FREEZE_LOCK:
            for p in params:
                entry = _FROZEN[p]
                entry[0] -= 1
                if entry[0] == 0:
                    p.requires_grad_(entry[1])
                    del _FROZEN[p]
