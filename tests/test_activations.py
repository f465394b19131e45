"""k-WTA math against a sort-based reference and hand-computed values."""

import pytest
import torch

from kwta_lightning.core.activations import (
    KWTA,
    KWTAChannel,
    activation_label,
    kwta_layers,
    make_activation,
    num_winners,
    set_gamma,
)
from kwta_lightning.errors import ConfigError


def reference_kwta(x: torch.Tensor, gamma: float, per_channel: bool) -> torch.Tensor:
    """Sort each group descending, threshold at the k-th value, keep >= threshold."""
    groups = x.flatten(2) if per_channel else x.flatten(1)
    k = max(1, int(gamma * groups.shape[-1]))
    kth = groups.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return torch.where(groups >= kth, groups, torch.zeros_like(groups)).view_as(x)


def tied_input(*shape: int, seed: int = 0) -> torch.Tensor:
    """Small integers: many ties, and negatives among the winners when gamma is large."""
    return torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(seed)).float()


def test_hand_computed_values():
    x = torch.tensor([[3.0, -1.0, 2.0, 2.0, 0.0]])
    # k = floor(0.4 * 5) = 2; the 2nd largest is 2 and both 2s tie at it: 3 units survive.
    assert KWTA(0.4)(x).tolist() == [[3.0, 0.0, 2.0, 2.0, 0.0]]
    negatives = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    assert KWTA(0.5)(negatives).tolist() == [[-1.0, -2.0, 0.0, 0.0]]
    # k never drops below 1.
    assert KWTA(0.01)(x).tolist() == [[3.0, 0.0, 0.0, 0.0, 0.0]]


def test_num_winners_follows_the_paper_arithmetic():
    assert num_winners(0.1, 64 * 32 * 32) == 6553
    assert num_winners(0.01, 10) == 1
    assert num_winners(1.0, 7) == 7


@pytest.mark.parametrize("gamma", [0.01, 0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(4, 37), (3, 5, 6, 7)])
@pytest.mark.parametrize("layer", [KWTA, KWTAChannel])
def test_matches_sort_reference_forward_and_backward(layer, shape, gamma):
    x = tied_input(*shape).requires_grad_()
    per_channel = layer is KWTAChannel and len(shape) == 4
    out = layer(gamma)(x)
    expected = reference_kwta(x.detach(), gamma, per_channel)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    kept = reference_kwta(x.detach() + 100.0, gamma, per_channel) != 0  # kept positions
    torch.testing.assert_close(x.grad, grad_out * kept, rtol=0, atol=0)


def test_layerwise_keeps_k_per_sample_without_ties():
    x = torch.randn(8, 16, 4, 4)
    out = KWTA(0.1)(x)
    assert ((out != 0).flatten(1).sum(dim=1) == int(0.1 * 256)).all()


def test_channelwise_keeps_k_per_channel_without_ties():
    x = torch.randn(2, 3, 8, 8)
    out = KWTAChannel(0.25)(x)
    assert ((out != 0).flatten(2).sum(dim=2) == 16).all()


@pytest.mark.parametrize("gamma", [0, 0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_gamma_out_of_range_is_refused(gamma):
    with pytest.raises(ConfigError, match="gamma must lie in"):
        KWTA(gamma)
    layer = KWTA(0.1)
    with pytest.raises(ConfigError, match="gamma must lie in"):
        layer.gamma = gamma


def test_gamma_changes_on_a_live_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 100), KWTA(0.5), torch.nn.Linear(100, 100))
    model.append(KWTAChannel(0.5))
    x = torch.randn(3, 4)
    assert ((model[:2](x) != 0).sum(dim=1) == 50).all()
    assert set_gamma(model, 0.1) == 2
    assert [layer.gamma for layer in kwta_layers(model).values()] == [0.1, 0.1]
    assert ((model[:2](x) != 0).sum(dim=1) == 10).all()


def test_registry_names():
    assert isinstance(make_activation("relu"), torch.nn.ReLU)
    assert make_activation("kwta", 0.3).gamma == 0.3
    with pytest.raises(ConfigError, match="unknown activation 'gelu'"):
        make_activation("gelu")


def test_channels_last_keeps_memory_format_and_values():
    x = torch.randn(2, 8, 5, 5)
    out = KWTA(0.2)(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, KWTA(0.2)(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    conv = torch.nn.Conv2d(3, 8, 3)
    x = torch.randn(2, 3, 10, 10)
    with torch.autocast("cpu", dtype=dtype):
        hidden = conv(x)
        out = KWTA(0.1)(hidden)
    assert out.dtype == hidden.dtype
    torch.testing.assert_close(out, reference_kwta(hidden, 0.1, per_channel=False))


def test_deterministic_mode():
    torch.use_deterministic_algorithms(True)
    try:
        x = tied_input(2, 4, 6, 6).requires_grad_()
        KWTA(0.2)(x).sum().backward()
        assert x.grad is not None
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("layer", [KWTA, KWTAChannel])
def test_torch_compile(layer):
    module = layer(0.2)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = tied_input(2, 4, 6, 6).requires_grad_()
    torch.testing.assert_close(compiled(x), module(x))
    module.gamma = 0.5  # recompiles for the new k
    torch.testing.assert_close(compiled(x), reference_kwta(x.detach(), 0.5, layer is KWTAChannel))


def test_fixed_k_layers_keep_k_whatever_the_size():
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    layer = make_activation("kwta_fixed", options={"k": 7})
    assert (layer(x).flatten(1) != 0).sum(1).tolist() == [7, 7, 7]
    assert torch.equal(layer(x), reference_kwta(x, 7 / 100, per_channel=False))
    per_channel = make_activation("kwta_channel_fixed", options={"k": 3})
    assert (per_channel(x).flatten(2) != 0).sum(2).unique().tolist() == [3]
    vectors = torch.randn(2, 40, generator=torch.Generator().manual_seed(1))
    assert (layer(vectors) != 0).sum(1).tolist() == [7, 7]  # the same k on a smaller layer


def test_fixed_k_passes_gradients_through_its_winners_only():
    x = torch.tensor([[3.0, -1.0, 2.0, 0.5]], requires_grad=True)
    make_activation("kwta_fixed", options={"k": 2})(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_fixed_k_is_refused_on_a_layer_it_would_keep_whole():
    with pytest.raises(ConfigError, match=r"act.options.k=10: a k-WTA layer here has only 10"):
        make_activation("kwta_fixed", options={"k": 10})(torch.randn(2, 10))


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("kwta_fixed", None, "activation kwta_fixed takes act.options k; got none"),
        ("kwta_fixed", {"k": 0}, "act.options.k=0: must be an integer >= 1"),
        ("kwta_fixed", {"k": 2, "q": 1}, "takes act.options k; got k, q"),
        ("kwta", {"k": 2}, "activation kwta takes no act.options; got k"),
    ],
)
def test_activation_options_are_checked(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_activation(name, options=options)


def test_gamma_leaves_fixed_k_layers_alone():
    model = torch.nn.Sequential(make_activation("kwta_fixed", options={"k": 2}), KWTA(0.3))
    assert len(kwta_layers(model)) == 2
    assert set_gamma(model, 0.5) == 1 and model[0].k == 2 and model[1].gamma == 0.5


def test_results_name_an_activation_by_the_options_that_differ_from_its_defaults():
    assert activation_label("kwta") == "kwta"
    assert activation_label("kwta_fixed", {"k": 50}) == "kwta_fixed(k=50)"
    assert activation_label("kwinners", {"boost_strength": 1.0, "local": True}) == (
        "kwinners(local=True)"
    )
