#!/usr/bin/env bash
# The prepared GPU check, made to start on the lent machine as it is: python3 (3.12, torch 2.11, no
# diffusers, nothing fetchable), the project from src/ on PYTHONPATH (no build), and the packages the
# machine lacks installed from the wheels bench/fetch_wheels.sh put in .whl/ (carry: [".whl"]).
# Stages: one image on two GPUs when there are two (bench/parallel.py, at most 90 s), versions and a
# smoke run of every family with cuda_graph on (under 2 minutes), then the
# benchmark (eager and loop-graph on every model before any compile), each row saved as it is
# measured; `timeout 480` ends it with SIGTERM, which saves. Writes OUTDIR/device.json, device.md.
# Exit: 0 done; 1 a parity failure or a loop not captured; 2 bad use; 124 stopped by the timeout.
#   bash bench/device_check.sh OUTDIR            # on the GPU machine
#   bash bench/device_check.sh OUTDIR --quick    # tiny configs on the CPU, seconds (CI's rehearsal)
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash bench/device_check.sh OUTDIR [--quick] [device_bench.py options]" >&2
    exit 2
fi
out="$1"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
if compgen -G "$root/.whl/*.whl" > /dev/null; then
    site="${DIFFGUIDE_SITE:-/tmp/diffguide-site}"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$root"/.whl/*.whl || { echo "device_check: installing the carried wheels failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
# the lent machine's torch (2.11) is below the floor CI proves (2.13): run it, saying so in device.json
export DIFFGUIDE_UNTESTED_VERSIONS="${DIFFGUIDE_UNTESTED_VERSIONS:-torch}"
export PYTHONUNBUFFERED=1
"$py" -c "import diffguide, diffusers" || { echo "device_check: diffguide or diffusers does not import (run bench/fetch_wheels.sh here and carry .whl)" >&2; exit 2; }
mkdir -p "$out"
# issue 38's GPU step: one image on two GPUs (NCCL) against one (bench/parallel.py); with fewer
# than two GPUs it writes and prints one line saying so. Not a gate: a failure is reported, and on.
rm -f "$out/parallel.json"  # a reused folder's old result would pass for this run's
if [ "${1:-}" = "--quick" ]; then
    timeout -k 10 90 "$py" "$root/bench/parallel.py" --device cuda --quick --out "$out/parallel.json" \
        || echo "device_check: the multi-GPU step failed; going on" >&2
    exec "$py" "$root/bench/device_bench.py" --out "$out" "$@"
fi
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'device_check: no CUDA device')" || exit 2
timeout -k 10 90 "$py" "$root/bench/parallel.py" --device cuda --out "$out/parallel.json" \
    || echo "device_check: the multi-GPU step failed or ran out of its 90 s; going on" >&2
# the plan's budget leaves room for the last case and the write-out inside 8 minutes
exec timeout 480 "$py" "$root/bench/device_bench.py" --out "$out" --budget-s 400 "$@"
