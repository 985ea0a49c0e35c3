#!/usr/bin/env bash
# The GPU figures in one prepared run, for a lent GPU machine (see BENCHMARKS.md): bench/e2e.py at 576x1024 with
# the published settings, ours and fast, and each fast technique alone. A machine without diffusers or PyAV takes
# them as wheels in .whl/ (installed to /tmp/site). Results: $OUT/e2e.log (one line per mode, the summary last).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
python3 bench/e2e.py --device cuda --size 576x1024 --frames "${FRAMES:-30}" --window 24 --overlap 6 --steps 25 \
    --modes "${MODES:-published,ours,fast,ays,interval,deepcache}" 2>&1 | tee "$OUT/e2e.log"
