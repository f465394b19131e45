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
# kwta-table1's training step on the GPU: images/s of ResNet18 at 224 px, batch 16, ReLU and
# k-WTA 0.1 (experiment=repro_finetune on fake data; the last progress line of each)
for act in "act=relu" "act=kwta gamma=0.1"; do
    # shellcheck disable=SC2086  # $act is two overrides
    uv run python train.py experiment=repro_finetune data=fake data.image_size=224 data.resize=false \
        trainer=gpu $act trainer.max_epochs=1 callbacks.log_progress.every_n_steps=10 logger=csv \
        test=false "hydra.run.dir=outputs/gpu_check/table1_${act// /_}" 2>&1 | grep "images/s" | tail -1
done
