#!/usr/bin/env bash
# The prepared GPU check (issue 22): stock diffusers against diffguide on SD 1.5, SDXL, Flux.1-dev and
# DiT-XL/2 with random weights, fair by the points in bench/device_bench.py's docstring, within 8
# minutes on one H100/H200. Writes OUTDIR/device.json and OUTDIR/device.md; exits 1 on a parity
# failure, 2 on bad use. Installs nothing beyond the project (when it is not importable yet).
#   bash bench/device_check.sh OUTDIR            # on the GPU machine
#   bash bench/device_check.sh OUTDIR --quick    # tiny configs on the CPU, seconds (CI)
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash bench/device_check.sh OUTDIR [--quick]" >&2
    exit 2
fi
out="$1"
shift
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
if ! "$py" -c "import diffguide" 2>/dev/null; then
    "$py" -m pip install --quiet --no-deps -e "$here/.."
fi
if [ "${1:-}" = "--quick" ]; then
    exec "$py" "$here/device_bench.py" --quick --out "$out"
fi
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'device_check: no CUDA device')"
# the budget leaves room for the last model's compilation and the write-out inside 8 minutes
exec timeout 480 "$py" "$here/device_bench.py" --out "$out" --budget-s 300 "$@"
