#!/usr/bin/env bash
# The GPU-only paths in one go (about 10 minutes on one GPU): the CUDA tests (k-WTA exact against
# the reference, bf16 training, data on the device, the attack suite), then the activation
# benchmark on CUDA, its table printed and its JSON written to benchmarks/results/.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
uv run pytest -q -p no:cacheprovider tests/test_gpu.py
uv run python benchmarks/activation_overhead.py --device cuda --backbone resnet18 densenet121 \
    --batch-size 128 --repeats 5
