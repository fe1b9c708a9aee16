#!/bin/sh
# The GPU path on one GPU, offline, in minutes: the `gpu` tests, then bench/gpu.py's figures.
#   here, with network:   make gpu-wheels          (the packages a bare GPU machine lacks, into .whl/)
#   on the GPU machine:   sh bench/gpu.sh          (from the repository; writes gpu.json to $OUT or .)
set -e
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 240 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_sae.py tests/test_harvest.py tests/test_evaluate.py \
    tests/test_train.py || echo "gpu tests FAILED (above); the benchmark runs anyway"
python3 bench/gpu.py --json "${OUT:-.}/gpu.json"
