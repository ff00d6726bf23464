#!/usr/bin/env bash
# The device checks, as one prepared call for a session that is lent a GPU (about 6 minutes on an H100):
#   device run: bash scripts/gpu_check.sh      (timeout_s 540)
# 1. the kernel tests compiled on the GPU (under the interpreter they run on CPU in CI);
# 2. python -m hf_scd.kernels.bench at 1K and 8K tokens: fused kernels (per-head units) and the block path (the
#    shipped artifacts' joint units), each beside the torch path, and an 8K Llama-3-8B decode against its prefill.
# The device image has torch, triton, transformers, safetensors and huggingface_hub; hf_scd runs from this checkout.
# Everything lands in $OUT (the device tool brings it back): kernel_tests.log, bench.md, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hf_scd_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    | tee -a "$OUT/device.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m "not slow" 2>&1 | tee "$OUT/kernel_tests.log"
timeout 300 python3 -m hf_scd.kernels.bench --contexts 1024 8192 --out "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"
