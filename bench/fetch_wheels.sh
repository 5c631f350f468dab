#!/usr/bin/env bash
# Fetch, here, the pure-Python packages the lent GPU machine lacks, as wheels for its Python 3.12, into
# .whl/ (git-ignored); a device run carries the folder (carry: [".whl"]) and bench/device_check.sh
# installs them there with --no-index. The machine has torch 2.11, transformers 5.17, accelerate 1.15,
# huggingface_hub 1.33, safetensors 0.8 and the rest of diffguide's needs, but no diffusers, whose
# only need it lacks is importlib_metadata.
#   bash bench/fetch_wheels.sh            # diffusers at the version installed here (else 0.42.1)
#   DIFFUSERS_VERSION=0.42.1 bash bench/fetch_wheels.sh [DEST]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/.whl}"
version="${DIFFUSERS_VERSION:-$(python3 -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)}"
mkdir -p "$dest"
rm -f "$dest"/diffusers-*.whl "$dest"/importlib_metadata-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$dest" "diffusers==$version" "importlib_metadata>=6"
ls "$dest"
