"""The oldest versions of the libraries diffguide runs with, as CI proves them (``.ci/run`` installs
exactly these and runs the smoke tests), and a check that names an older one already installed.

pyproject.toml states the same floors (a test keeps the two equal).
"""

from __future__ import annotations

import os
import re
import warnings
from importlib import metadata

MINIMUM = {
    "torch": "2.13.0",
    "numpy": "1.26.0",
    "diffusers": "0.36.0",
    "transformers": "5.6.0",
    "accelerate": "1.0.0",
    "safetensors": "0.4.3",
    "pillow": "10.0.0",
    "tqdm": "4.64.0",
}
OPTIONAL = {"peft": "0.18.0"}  # the lora extra


def _key(version: str) -> tuple:
    """'5.6.0' -> (5, 6, 0); '2.13.0+cpu' -> (2, 13, 0); pre-releases sort with their release."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


UNTESTED = (
    "DIFFGUIDE_UNTESTED_VERSIONS"  # names of packages allowed below their floor, comma-separated
)


def check(packages=None) -> list[str]:
    """Raise ValueError naming the first installed package older than diffguide's floor (an
    optional one only if it is installed). Packages named in the environment variable
    DIFFGUIDE_UNTESTED_VERSIONS pass below their floor (a machine whose torch cannot be changed,
    such as a lent GPU's 2.11): the returned lines say which run untested, and ``warnings`` says it
    once."""
    floors = (
        {**MINIMUM, **OPTIONAL}
        if packages is None
        else {p: {**MINIMUM, **OPTIONAL}[p] for p in packages}
    )
    allowed = {n.strip() for n in os.environ.get(UNTESTED, "").split(",") if n.strip()}
    untested = []
    for name, floor in floors.items():
        have = installed(name)
        if have is not None and _key(have) < _key(floor):
            if name in allowed:
                untested.append(
                    f"{name} {have} is below diffguide's tested floor {floor} ({UNTESTED}={name}): "
                    f"nothing in CI ran with it"
                )
                continue
            raise ValueError(
                f"{name} {have} is installed, but diffguide needs {name} >= {floor}: "
                f"pip install -U '{name}>={floor}' (or set {UNTESTED}={name} to run untested)"
            )
    for line in untested:
        if line not in _SAID:
            _SAID.add(line)
            warnings.warn(line, stacklevel=2)
    return untested


_SAID: set = set()
