#!/usr/bin/env bash
# The script to run first on a lent GPU machine: `bash bench/gpu.sh` (the device tool sets OUT) runs
# bench/acceptance.py, every mode of the tool at full size in at most 8 minutes on one H100, into one JSON:
# $OUT/acceptance.json (rewritten after every mode), $OUT/acceptance.log (one line per mode), $OUT/gpu.txt, and
# $OUT/modes.tar.gz (each <mode>.json and its logs: the device tool brings back 8 files at most). The plan, the
# limits and the JSON's layout: bench/acceptance.py's docstring. Arguments go to bench/acceptance.py (e.g. --only).
# MODES=ours,fast,... bash bench/gpu.sh runs bench/e2e.py's modes instead, as before ($OUT/e2e.log; BENCHMARKS.md).
# A machine without diffusers or PyAV takes them as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
started=$SECONDS
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ -n "${MODES:-}" ]; then
    python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import torch, diffusers, transformers
print(torch.__version__, diffusers.__version__, transformers.__version__)
PY
    python3 bench/e2e.py --device cuda --size 576x1024 --frames "${FRAMES:-30}" --window 24 --overlap 6 --steps 25 \
        --modes "$MODES" 2>&1 | tee "$OUT/e2e.log"
    exit
fi
modes=/tmp/acceptance-modes  # outside $OUT: packed below
rm -rf "$modes"
python3 bench/acceptance.py --device cuda --out "$OUT" --modes-dir "$modes" \
    --budget $(( ${BUDGET:-470} - (SECONDS - started) )) "$@" 2>&1 | tee "$OUT/acceptance.log"
status=${PIPESTATUS[0]}
tar -czf "$OUT/modes.tar.gz" -C "$modes" . || status=1
exit "$status"
