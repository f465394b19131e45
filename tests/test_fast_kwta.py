"""The fast k-WTA (kwta_select) equals the reference exactly and keeps little for backward."""

import json

import pytest
import torch
import torch.utils.cpp_extension

from kwta_lightning.core import kwta_select
from kwta_lightning.core.activations import (
    KWTA,
    KWTAChannel,
    kwta_channelwise,
    kwta_channelwise_topk,
    kwta_layerwise,
    kwta_layerwise_topk,
    make_activation,
    set_gamma,
)
from kwta_lightning.core.backbones import build_network
from kwta_lightning.core.kwta_select import KWTAFunction, cpu_kernel
from tests.helpers import run_cli

SMALL = (3, 4, 5, 6)
LARGE = (3, 16, 9, 9)


def tied(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, shift: float = 0.0):
    """Small integers (exact in every float dtype): many ties at every threshold."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, shape, generator=gen).to(dtype) + shift).requires_grad_()


def sort_reference(x: torch.Tensor, gamma: float, per_channel: bool) -> torch.Tensor:
    groups = x.flatten(2) if per_channel else x.flatten(1)
    k = max(1, int(gamma * groups.shape[-1]))
    kth = groups.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return torch.where(groups >= kth, groups, 0).view_as(x)


def values_and_grad(fn, x: torch.Tensor, gamma: float, grad_out: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = fn(x * 1, gamma)  # a non-leaf input, which an in-place layer may overwrite
    out.backward(grad_out)
    return out.detach(), x.grad


def test_the_cpu_kernel_builds_here():
    # Without a compiler the layers fall back to torch.topk with a warning; CI must have one.
    assert cpu_kernel() is not None


def test_without_the_kernel_a_warning_says_so_and_topk_runs(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'kwta_lightning_cpu'\nc++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_kernel.cache_clear()
    try:
        assert cpu_kernel() is None
        x = tied(LARGE, torch.float32).detach()
        torch.testing.assert_close(KWTA(0.1)(x), kwta_layerwise_topk(x, 0.1), rtol=0, atol=0)
    finally:
        cpu_kernel.cache_clear()  # the next call loads the cached build again
    assert "k-WTA CPU kernel unavailable (RuntimeError: Error building extension" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [SMALL, LARGE])
@pytest.mark.parametrize("gamma", [1e-6, 0.1, 0.5, 1.0])  # k = 1, ..., k = N
@pytest.mark.parametrize("shift", [0.0, 5.0])  # thresholds <= 0 (mask saved) and > 0 (output)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("select", "inplace"), [("auto", False), ("auto", True), ("torch", False)])
def test_equals_reference_values_and_gradients(
    dtype, channels_last, shape, gamma, shift, per_channel, select, inplace
):
    x = tied(shape, dtype, shift=shift)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    layer, reference = (
        (kwta_channelwise, kwta_channelwise_topk)
        if per_channel
        else (kwta_layerwise, kwta_layerwise_topk)
    )

    def fast(x, gamma):
        return layer(x, gamma, inplace, select)

    out, grad = values_and_grad(fast, x, gamma, grad_out)
    ref_out, ref_grad = values_and_grad(reference, x, gamma, grad_out)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(out, sort_reference(x.detach(), gamma, per_channel), rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_kept_zeros_pass_their_gradient():
    # Threshold 0 with many zeros tied at it: the zeros are kept and must pass their gradient,
    # which the output alone cannot tell (hence the bool mask for thresholds <= 0).
    x = torch.zeros(2, 100)
    x[:, :10] = 1.0
    x[:, 10:20] = -1.0
    x.requires_grad_()
    out = kwta_layerwise(x, 0.5)
    out.backward(torch.ones_like(out))
    assert (x.grad[:, :10] == 1).all() and (x.grad[:, 10:20] == 0).all()
    assert (x.grad[:, 20:] == 1).all()


@pytest.mark.parametrize("per_channel", [False, True])
def test_positive_thresholds_save_only_the_output_like_relu(per_channel):
    x = tied(LARGE, torch.float32, shift=5.0)
    out = (kwta_channelwise if per_channel else kwta_layerwise)(x, 0.1)
    (saved,) = out.grad_fn.saved_tensors
    assert type(out.grad_fn).__name__ == "KWTAFunctionBackward"
    assert saved.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()


@pytest.mark.parametrize("select", ["auto", "torch"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_thresholds_at_or_below_zero_save_only_a_bool_mask(select, per_channel):
    x = tied(LARGE, torch.float32)
    with torch.no_grad():
        x[0] += 5.0  # sample 0: thresholds > 0 (the kernel masks it), the others <= 0
    out = KWTAFunction.apply(x, 60 if per_channel else 900, per_channel, False, select)
    (mask,) = out.grad_fn.saved_tensors
    assert mask.dtype == torch.bool and mask.shape == LARGE
    grad_out = torch.randn(LARGE, generator=torch.Generator().manual_seed(1))
    reference = kwta_channelwise_topk if per_channel else kwta_layerwise_topk
    gamma = 60 / 81 if per_channel else 900 / (16 * 81)
    torch.testing.assert_close(out, reference(x, gamma), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    (ref_grad,) = torch.autograd.grad(reference(x, gamma), x, grad_out)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_auto_selection_runs_the_kernel_on_cpu(monkeypatch):
    calls = []
    kernel = cpu_kernel()

    class Spy:
        def kwta_rows_out(self, *args):
            calls.append(args[0].shape)
            return kernel.kwta_rows_out(*args)

    monkeypatch.setattr(kwta_select, "cpu_kernel", lambda: Spy())
    x = tied(LARGE, torch.float32).detach()
    KWTA(0.1)(x)
    KWTAChannel(0.1)(x)
    KWTA(0.1, select="torch")(x)
    KWTA(0.1)(x.double())  # float64: torch's selection (the kernel ranks float32 keys)
    assert calls == [(3, 16 * 81), (3 * 16, 81)]


def test_inplace_writes_into_its_input_like_relu():
    x = tied(LARGE, torch.float32, shift=1.0)
    hidden = x * 1
    out = KWTA(0.1, inplace=True)(hidden)
    assert out is hidden
    torch.testing.assert_close(out, kwta_layerwise_topk(x, 0.1), rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        KWTA(0.1, inplace=True)(x)  # autograd refuses it as it refuses nn.ReLU(inplace=True)


@pytest.mark.parametrize("select", ["auto", "torch"])
@pytest.mark.parametrize("width", [50, 2000])  # the kernel's short-row and histogram paths
def test_a_nan_zeroes_its_group(select, width):
    # The reference's threshold topk(...).amin() is NaN for a group holding a NaN, so no unit
    # passes x >= threshold; the reference's multiply then leaves NaN * 0 = NaN where the NaNs
    # were, the fast layers (a where) leave 0.
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    x[:2, :3] = float("nan")
    x[1, 3:] = -1.0  # threshold < 0: the kernel leaves this row to the caller
    x[2, 0] = float("inf")  # an infinity shares the NaNs' histogram bins, and is no NaN
    for gamma in (0.02, 0.1, 0.5):  # k = 1, 5, 25
        out = kwta_layerwise(x, gamma, select=select)
        assert (out[:2] == 0).all()
        torch.testing.assert_close(out[2:], kwta_layerwise_topk(x[2:], gamma), rtol=0, atol=0)


def test_inference_mode_and_no_grad():
    x = tied(LARGE, torch.float32).detach()
    expected = kwta_layerwise_topk(x, 0.2)
    with torch.inference_mode():
        torch.testing.assert_close(KWTA(0.2)(x), expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(KWTA(0.2)(x), expected, rtol=0, atol=0)


def test_autocast_bf16_matches_reference():
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(2, 3, 18, 18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = conv(x)
        out = KWTA(0.1)(hidden)
        out_channel = KWTAChannel(0.1)(hidden)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, kwta_layerwise_topk(hidden, 0.1), rtol=0, atol=0)
    torch.testing.assert_close(out_channel, kwta_channelwise_topk(hidden, 0.1), rtol=0, atol=0)


def test_reference_layers_are_registered():
    layer = make_activation("kwta_topk", 0.3)
    channel = make_activation("kwta_channel_topk", 0.3)
    assert set_gamma(torch.nn.Sequential(layer, channel), 0.2) == 2
    x = tied(SMALL, torch.float32).detach()
    torch.testing.assert_close(layer(x), KWTA(0.2)(x), rtol=0, atol=0)
    torch.testing.assert_close(channel(x), KWTAChannel(0.2)(x), rtol=0, atol=0)


def test_compiled_layer_has_the_same_gradients():
    layer = KWTA(0.1)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = tied(LARGE, torch.float32, shift=1.0)
    grad_out = torch.randn(LARGE, generator=torch.Generator().manual_seed(2))
    out, grad = values_and_grad(lambda t, g: compiled(t), x, 0.1, grad_out)
    ref_out, ref_grad = values_and_grad(kwta_layerwise_topk, x, 0.1, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_kwta_network_trains_like_eager():
    # model.compile=true compiles the whole network: k-WTA must trace without graph breaks.
    # (aot_eager keeps this quick; train.py model.compile=true with inductor was run by hand.)
    torch.manual_seed(0)
    net = build_network("cnn", 10, 3, 32, [0.5] * 3, [0.25] * 3, "kwta", 0.2)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (net, compiled):
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(compiled(x), net(x))
    for eager, traced in zip(*grads, strict=True):
        torch.testing.assert_close(traced, eager)


def train_tiny_kwta(tmp_path, override: str):
    """train.py on fake data with a tiny k-WTA CNN and one more override; returns the result."""
    result = run_cli(
        "data=fake",
        "model=cnn",
        "act=kwta",
        "gamma=0.2",
        "debug=fdr",
        "logger=csv",
        override,
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["act"] == "kwta" and 0.0 <= metrics["test_acc"] <= 1.0
    return result


@pytest.mark.slow
def test_train_cli_runs_kwta_with_bf16_mixed(tmp_path):
    train_tiny_kwta(tmp_path, "trainer.precision=bf16-mixed")


@pytest.mark.slow
def test_train_cli_runs_kwta_with_model_compile(tmp_path, monkeypatch):
    # Inductor, as train.py runs it; the logs show the network was compiled and traced whole.
    monkeypatch.setenv("TORCH_LOGS", "graph_breaks,recompiles")
    result = train_tiny_kwta(tmp_path, "model.compile=true")
    assert "Recompiling function" in result.stderr  # the no-grad validation pass
    assert "Graph break" not in result.stderr
