"""Writing a file without ever leaving it half-written: a temporary file of this process in the
same folder, flushed to disk, then renamed over the target (the old file stays until then)."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable, text: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path`` and rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a plain file is expected
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), text=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
