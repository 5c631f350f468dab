"""``diffguide comfy install COMFYUI_DIR``: the ComfyUI node pack (the work: diffguide.comfy)."""

from __future__ import annotations

import sys

from ..comfy import install
from .generate import UsageError


def add_arguments(p) -> None:
    """The ``comfy`` command's subcommands (one so far: install)."""
    sub = p.add_subparsers(dest="action", parser_class=type(p))
    i = sub.add_parser(
        "install",
        help="write COMFYUI_DIR/custom_nodes/diffguide/__init__.py, which loads diffguide's nodes",
    )
    i.add_argument("comfyui", metavar="COMFYUI_DIR", help="the ComfyUI folder (holds main.py)")


def run(args) -> int:
    """Install the node pack and print the file written."""
    if args.action != "install":
        raise UsageError("diffguide comfy needs a subcommand: install COMFYUI_DIR")
    print(install(args.comfyui))
    print(
        "restart ComfyUI; its nodes Guider, Sampler and Sigmas (diffguide) need diffguide "
        "installed in ComfyUI's Python",
        file=sys.stderr,
    )
    return 0
