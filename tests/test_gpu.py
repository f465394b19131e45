"""The paths that only a GPU runs: skipped, with the reason, on a machine without CUDA.

``benchmarks/gpu_check.sh`` runs these and the GPU benchmark in one go.
"""

import json

import pytest
import torch

from kwta_lightning.core.activations import (
    kwta_channelwise,
    kwta_channelwise_topk,
    kwta_layerwise,
    kwta_layerwise_topk,
)
from kwta_lightning.run.training import train
from tests.helpers import compose_train, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
TINY = ["data=fake", "data.image_size=16", "data.batch_size=16", "logger=csv", "model=cnn"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("fast", "reference"),
    [(kwta_layerwise, kwta_layerwise_topk), (kwta_channelwise, kwta_channelwise_topk)],
)
def test_the_cuda_layers_equal_the_reference_in_values_and_gradients(fast, reference, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randint(-4, 5, (8, 16, 9, 9), generator=gen, device=CUDA).to(dtype)  # many ties
    grad_out = torch.randn(x.shape, generator=gen, device=CUDA).to(dtype)
    results = []
    for fn in (fast, reference):
        leaf = x.clone().requires_grad_()
        out = fn(leaf * 1, 0.1)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (out_fast, grad_fast), (out_ref, grad_ref) = results
    torch.testing.assert_close(out_fast, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=0, atol=0)


def test_trainer_gpu_trains_in_bf16(tmp_path):
    metrics = train(compose_train(tmp_path, [*TINY, "trainer=gpu", "debug=limit", "act=kwta"]))
    assert 0 <= metrics["test_acc"] <= 1


def test_data_on_device_trains_on_the_gpu(tmp_path):
    overrides = [*TINY, "trainer=gpu", "debug=limit", "data.on_device=true"]
    metrics = train(compose_train(tmp_path, overrides))
    assert 0 <= metrics["test_acc"] <= 1


def test_the_attack_suite_runs_on_the_gpu(tmp_path):
    metrics = train(compose_train(tmp_path / "train", [*TINY, "trainer=gpu", "debug=limit"]))
    result = run_cli(
        f"ckpt_path={metrics['ckpt_best']}",
        "attack=[pgd,fgsm,apgd_ce,bpda,square]",
        "attack.pgd.steps=5",
        "attack.apgd_ce.steps=5",
        "attack.bpda.attack.steps=5",
        "attack.square.n_queries=20",
        "eps=[0.031]",
        "n_samples=32",
        "device=cuda",
        "cache_dir=null",
        "wandb.mode=disabled",
        f"hydra.run.dir={tmp_path / 'attack'}",
        script="attack.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "attack" / "report.json").read_text())
    assert report["device"].startswith("cuda") and report["complete"]
