"""Checkpoints that are written atomically and refused when truncated or corrupt.

File layout: 8-byte magic, 32-byte SHA-256 of the payload, then the ``torch.save`` payload. It is
written to a temporary file in the same folder and renamed over the old one, so a crash while
writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io

import torch

from ..files import atomic_write

MAGIC = b"DGCKPT01"


def save(path: str, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write(path, lambda f: f.write(MAGIC + hashlib.sha256(payload).digest() + payload))


def load(path: str) -> dict:
    """The state saved by ``save``; ValueError if the file is truncated, altered or not ours."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise ValueError(
            f"checkpoint {path!r} is not a diffguide checkpoint or is truncated; refusing "
            f"to load it (delete it to start over)"
        )
    digest, payload = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(
            f"checkpoint {path!r} is corrupt (checksum mismatch: truncated or altered); refusing "
            "to load it"
        )
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
