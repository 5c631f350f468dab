"""Installing the node pack into a ComfyUI folder: one small custom_nodes/diffguide/__init__.py
that imports the nodes from the diffguide package installed in ComfyUI's Python."""

from __future__ import annotations

import os

from .. import __version__
from ..files import atomic_text, check_link, check_path

MARKER = "# Written by `diffguide comfy install`"
PACK = "diffguide"  # the folder under custom_nodes/

LOADER = f'''{MARKER} (diffguide {{version}}); it is replaced by the next install.
"""The diffguide node pack: DiffguideGuider, DiffguideSampler and DiffguideSigmas
(docs/comfyui.md). The nodes live in the diffguide package, which must be installed in the
Python that runs ComfyUI."""

try:
    from diffguide.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:
    raise ImportError(
        "the diffguide node pack needs the diffguide package in the Python that runs ComfyUI "
        "(pip install it there): " + str(e)
    ) from e

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def _check_comfyui(folder: str) -> None:
    """Refuse a folder that is not ComfyUI's (it has custom_nodes/, or main.py and comfy/)."""
    if not os.path.isdir(folder):
        raise ValueError(f"ComfyUI folder {folder!r} does not exist or is not a folder")
    nodes = os.path.join(folder, "custom_nodes")
    if os.path.lexists(nodes) and not os.path.isdir(nodes):
        raise ValueError(
            f"{nodes!r} exists and is not a folder; ComfyUI loads its node packs there"
        )
    has_nodes = os.path.isdir(nodes)
    has_engine = os.path.isdir(os.path.join(folder, "comfy")) and os.path.isfile(
        os.path.join(folder, "main.py")
    )
    if not (has_nodes or has_engine):
        raise ValueError(
            f"{folder!r} is not a ComfyUI folder (no custom_nodes/, nor main.py and comfy/); give "
            "the folder that holds ComfyUI's main.py"
        )


def _check_pack(pack: str) -> None:
    """Refuse a custom_nodes/diffguide that holds anything but a loader this command wrote."""
    if os.path.lexists(pack) and not os.path.isdir(pack):
        raise ValueError(f"{pack!r} exists and is not a folder; remove it or rename it")
    if not os.path.isdir(pack):
        return
    loader = os.path.join(pack, "__init__.py")
    others = set(os.listdir(pack)) - {"__init__.py", "__pycache__"}
    if others:
        raise ValueError(
            f"{pack!r} holds another node pack ({', '.join(sorted(others)[:3])}); remove it first"
        )
    if os.path.islink(loader) or (os.path.exists(loader) and not _ours(loader)):
        raise ValueError(f"{loader!r} was not written by diffguide; remove it first")


def _ours(path: str) -> bool:
    """True when the file starts with the line this command writes."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def install(comfyui: str) -> str:
    """Write COMFYUI/custom_nodes/diffguide/__init__.py (aside, then renamed into place); a loader
    an earlier install wrote is replaced. Returns its path; ValueError names a bad folder."""
    folder = os.path.abspath(comfyui)
    _check_comfyui(folder)
    pack = os.path.join(folder, "custom_nodes", PACK)
    _check_pack(pack)
    loader = os.path.join(pack, "__init__.py")
    check_path(loader, "node pack file")
    check_link(loader, "node pack file")
    os.makedirs(pack, exist_ok=True)
    atomic_text(loader, LOADER.format(version=__version__))
    return loader
