"""Numenta's k-WTA (``act=kwinners``): hand-computed boosting, duty cycles and k, its state in
checkpoints, the boost strength's decay, a CLI run and BPDA through it."""

import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kwta_lightning.attacks.adaptive import BPDA, BPDALayer
from kwta_lightning.attacks.pgd import PGD
from kwta_lightning.core.activations import make_activation, ratio_layers, set_gamma
from kwta_lightning.core.callbacks import BoostStrengthDecay
from kwta_lightning.core.kwinners import KWinners
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.validation import check_values
from tests.helpers import compose_train, run_cli


def kwinners(gamma: float, **options) -> KWinners:
    return make_activation("kwinners", gamma, options=options)


def with_duty_cycles(layer: KWinners, duty: list[float]) -> KWinners:
    """The layer with these duty cycles (loaded as a checkpoint's, into a layer not yet run)."""
    layer.load_state_dict({**layer.state_dict(), "duty_cycle": torch.tensor(duty)})
    return layer


def test_winners_are_chosen_boosted_and_keep_their_unboosted_values():
    # strength ln 2: boost factors 2 ** -duty = [1, 1, 0.5, 0.25]; boosted [1, 2, 1.5, 1];
    # k = 2: units 1 and 2 win (unboosted, 3 and 4 would), and keep 2 and 3, not 2 and 1.5
    layer = with_duty_cycles(kwinners(0.5, boost_strength=math.log(2)), [0.0, 0.0, 1.0, 2.0])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert layer(x).tolist() == [[0.0, 2.0, 3.0, 0.0]]
    plain = with_duty_cycles(kwinners(0.5, boost_strength=0.0), [0.0, 0.0, 1.0, 2.0])
    assert plain(x).tolist() == [[0.0, 0.0, 3.0, 4.0]]


def test_gradient_passes_through_the_winners_only():
    layer = with_duty_cycles(kwinners(0.5, boost_strength=math.log(2)), [0.0, 0.0, 1.0, 2.0])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    layer(x).backward(torch.tensor([[10.0, 20.0, 30.0, 40.0]]))
    assert x.grad.tolist() == [[0.0, 20.0, 30.0, 0.0]]


def test_duty_cycles_follow_the_documented_update():
    # k = 1 of 3, no boosting, period 4, batches of 2:
    # duty = (duty * (period - 2) + active) / period, period = min(4, samples seen)
    layer = kwinners(1 / 3, boost_strength=0.0, duty_cycle_period=4)
    layer(torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]]))  # active [1, 1, 0], period 2
    torch.testing.assert_close(layer.duty_cycle, torch.tensor([0.5, 0.5, 0.0]))
    layer(torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0]]))  # active [2, 0, 0], period 4
    torch.testing.assert_close(layer.duty_cycle, torch.tensor([0.75, 0.25, 0.0]))
    # a winner <= 0 is not active: active [1, 0, 0]; ([1.5, 0.5, 0] + [1, 0, 0]) / 4
    layer(torch.tensor([[3.0, 1.0, 2.0], [-1.0, -2.0, -3.0]]))
    torch.testing.assert_close(layer.duty_cycle, torch.tensor([0.625, 0.125, 0.0]))
    assert layer.samples_seen.item() == 6
    layer.eval()  # inference leaves them alone
    layer(torch.tensor([[1.0, 3.0, 2.0]]))
    torch.testing.assert_close(layer.duty_cycle, torch.tensor([0.625, 0.125, 0.0]))
    assert layer.samples_seen.item() == 6


def test_a_period_shorter_than_the_batch_is_refused():
    with pytest.raises(ConfigError, match="duty_cycle_period=2 is smaller than the batch"):
        kwinners(0.5, duty_cycle_period=2)(torch.rand(3, 4))


def test_more_winners_at_inference():
    layer = kwinners(0.2, boost_strength=0.0)
    x = torch.arange(1.0, 11.0).view(1, 10)
    assert layer.winners(10) == 2 and (layer(x) != 0).sum() == 2
    layer.eval()
    assert layer.winners(10) == 3 and (layer(x) != 0).sum() == 3  # round(2 * 1.5)
    assert kwinners(0.2, k_inference_factor=10.0).eval().winners(10) == 10  # capped at N


def test_local_winners_across_channels_at_each_position():
    # (1, 3, 1, 2): position 0 has channels [1, 3, 2], position 1 [5, 4, 6]
    x = torch.tensor([[1.0, 5.0], [3.0, 4.0], [2.0, 6.0]]).view(1, 3, 1, 2)
    local = kwinners(1 / 3, boost_strength=0.0, local=True)  # k = 1 of 3 channels
    assert local(x).view(3, 2).tolist() == [[0.0, 0.0], [3.0, 0.0], [0.0, 6.0]]
    # duty cycles per channel: its active positions over H * W
    torch.testing.assert_close(local.duty_cycle, torch.tensor([0.0, 0.5, 0.5]))
    across = kwinners(1 / 3, boost_strength=0.0)  # k = 2 of all 6 units
    assert across(x).view(3, 2).tolist() == [[0.0, 5.0], [0.0, 0.0], [0.0, 6.0]]


def test_ties_survive_unless_broken():
    x = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    assert (kwinners(0.5)(x) != 0).sum() == 3
    assert (kwinners(0.5, break_ties=True)(x) != 0).sum() == 2


def test_boost_strength_decays_per_epoch_by_the_callback():
    model = nn.Sequential(nn.Linear(4, 8), kwinners(0.25, boost_strength=2.0), nn.Linear(8, 8))
    model.append(kwinners(0.25, boost_strength=1.0, boost_strength_factor=0.5))
    callback = BoostStrengthDecay()
    for epoch, expected in [(0, [2.0, 1.0]), (2, [2.0 * 0.81, 0.25]), (1, [1.8, 0.5])]:
        callback.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), model)
        strengths = [m.boost_strength.item() for m in model.modules() if isinstance(m, KWinners)]
        assert strengths == pytest.approx(expected)


def test_state_round_trips_into_a_model_that_has_not_run():
    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), kwinners(0.5, local=True), nn.Flatten(), nn.Linear(64, 8)
        ).append(kwinners(0.25))

    trained = net()
    for _ in range(3):
        trained(torch.rand(5, 1, 6, 6))
    trained[1].set_boost_epoch(2)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = net()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert trained[4].duty_cycle.shape == (8,) and trained[1].duty_cycle.shape == (4,)
    x = torch.rand(2, 1, 6, 6)
    assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_registry_gamma_and_options():
    layer = kwinners(0.1)
    assert layer.boost_strength_factor == 0.9 and layer.k_inference_factor == 1.5
    model = nn.Sequential(nn.Linear(4, 20), layer)
    assert list(ratio_layers(model)) == ["1"] and set_gamma(model, 0.3) == 1
    assert layer.winners(20) == 6
    with pytest.raises(ConfigError, match="activation kwinners takes act.options"):
        kwinners(0.1, boost=1.0)
    with pytest.raises(ConfigError, match="act.options.boost_strength_factor=0: must be"):
        kwinners(0.1, boost_strength_factor=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("act.options.boost_strength=-1", "must be a number >= 0"),
        ("act.options.boost_strength_factor=0", "must be a number > 0 and <= 1"),
        ("act.options.k_inference_factor=0.5", "must be a number >= 1"),
        ("act.options.duty_cycle_period=0", "must be an integer >= 1"),
        ("act.options.local=1", "must be true or false"),
    ],
)
def test_config_values_are_checked(tmp_path, override, message):
    cfg = compose_train(tmp_path, ["act=kwinners", override])
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}=.*: {message}"):
        check_values(cfg)


def test_a_cli_run_trains_decays_the_boost_and_its_checkpoint_rebuilds_the_model(tmp_path):
    result = run_cli(
        "model=cnn",
        "act=kwinners",
        "gamma=0.2",
        "act.options.duty_cycle_period=100",
        "data=fake",
        "data.image_size=16",
        "data.batch_size=16",
        "trainer=cpu",
        "debug=limit",  # 2 epochs of 5 batches, with checkpoints
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    strengths = [v.item() for k, v in saved.items() if k.endswith("boost_strength")]
    assert strengths == pytest.approx([0.9] * 3)  # the second epoch's: 1.0 * 0.9 ** 1
    assert all(v.item() == 160 for k, v in saved.items() if k.endswith("samples_seen"))

    model = KWTAClassifier.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    layers = [m for m in model.modules() if isinstance(m, KWinners)]
    assert [layer.duty_cycle.shape[0] for layer in layers] == [32, 64, 128]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def patches(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images of four classes: class c a bright 4x4 quadrant on faint noise."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=generator)
    x = 0.1 * torch.rand(n, 1, 8, 8, generator=generator)
    for i, c in enumerate(y.tolist()):
        row, col = divmod(c, 2)
        x[i, 0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 0.7
    return x, y


def test_bpda_surrogate_ranks_what_the_layer_ranks():
    # a boosted, local layer: the soft mask's winners (>= 0.5 at a low temperature) are the
    # layer's, which neither the unboosted values nor groups over C*H*W would give
    torch.manual_seed(0)
    layer = with_duty_cycles(kwinners(0.25, local=True, boost_strength=3.0), [0.9, 0.1, 0.5, 0.0])
    x = torch.rand(4, 4, 3, 3) + 0.1
    hard = layer.eval()(x)
    bpda = BPDALayer(layer, "soft_kwta", temperature=1e-4)
    assert torch.equal(bpda(x), hard)
    soft = bpda._soft_kwta(x)
    assert torch.equal(soft >= 0.5 * x, hard != 0)
    assert not torch.equal(kwinners(0.25, local=True, boost_strength=0.0).eval()(x), hard)


def test_bpda_attack_on_a_kwinners_model_stays_in_bounds():
    torch.manual_seed(0)
    layer = kwinners(0.25, duty_cycle_period=256)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), layer, nn.Linear(32, 4))
    x, y = patches(256, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    assert layer.duty_cycle.min() < layer.duty_cycle.max()  # boosting has something to do
    x, y = patches(32)
    assert (model(x).argmax(1) == y).float().mean() >= 0.9
    attack = BPDA(PGD(steps=10, seed=0), temperatures=[0.1, 0.5], name="bpda")
    eps = 0.3
    x_adv = attack.attack(model, x, y, eps).x_adv
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert (model(x_adv).argmax(1) != y).any()
    assert isinstance(model[2], KWinners)  # attacked on a copy
