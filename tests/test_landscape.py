"""Loss landscapes, activation-pattern changes and the 1-D discontinuity demo."""

import pytest
import torch
from PIL import Image
from torch import nn

from kwta_lightning.apps.landscape import activation_changes, directions, loss_grid, roughness
from kwta_lightning.apps.landscape import run as run_landscape
from kwta_lightning.apps.toy1d import find_jumps, make_mlp
from kwta_lightning.apps.toy1d import run as run_toy1d
from kwta_lightning.core.activations import KWTA
from kwta_lightning.run.training import train
from tests.helpers import compose_config, compose_train


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


def small_kwta_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 40), KWTA(0.2), nn.Linear(40, 3)).eval()


def test_grid_shape_and_centre_is_the_loss_at_x():
    model, x, y = small_kwta_net(), torch.rand(1, 3, 2, 2), torch.tensor([1])
    g, r = directions(model, x, y, seed=0)
    grid = loss_grid(model, x, y, g, r, eps=0.1, steps=7)
    assert grid.shape == (7, 7)
    expected = nn.functional.cross_entropy(model(x), y)
    torch.testing.assert_close(grid[3, 3], expected)
    assert set(g.unique().tolist()) <= {-1.0, 0.0, 1.0} and set(r.unique().tolist()) == {-1, 1}


def test_linear_model_gives_a_plane():
    # Two classes, margin loss: the loss is linear in the input, so the surface is a plane
    # (x = 0.5 and eps = 0.2 keep every grid point inside [0, 1], so clamping never bends it).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).double()
    x, y = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64), torch.tensor([0])
    g, r = directions(model, x, y, seed=1, loss="margin")
    grid = loss_grid(model, x, y, g, r, eps=0.2, steps=9, loss="margin")
    assert roughness(grid) < 1e-12
    assert grid.std() > 0.01  # not flat: a tilted plane


def test_kwta_surface_is_rougher_than_relu():
    torch.manual_seed(0)
    x, y = torch.rand(1, 3, 2, 2), torch.tensor([0])
    values = {}
    for name, act in (("kwta", KWTA(0.1)), ("relu", nn.ReLU())):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 200), act, nn.Linear(200, 3)).eval()
        g, r = directions(model, x, y, seed=0)
        values[name] = roughness(loss_grid(model, x, y, g, r, eps=0.5, steps=21))
    assert values["kwta"] > 3 * values["relu"]


def test_activation_changes_start_at_zero_and_grow():
    model, x, y = small_kwta_net(), torch.rand(1, 3, 2, 2), torch.tensor([0])
    g, _ = directions(model, x, y, seed=0)
    changes = activation_changes(model, x, g, eps=1.0, steps=11)
    assert list(changes) == ["2"]
    assert changes["2"][0] == 0 and max(changes["2"]) > 0


def test_find_jumps_on_known_functions():
    grid = torch.linspace(-1, 1, 201, dtype=torch.float64)

    def step(x):
        return (x > 0.3).double() + x

    jumps = find_jumps(step, grid)
    assert len(jumps) == 1 and abs(float(jumps[0]) - 0.3) < 1e-6
    assert len(find_jumps(lambda x: torch.tanh(50 * x), grid)) == 0  # steep but continuous


def test_kwta_mlp_jumps_and_relu_mlp_does_not():
    grid = torch.linspace(-1, 1, 501, dtype=torch.float64)
    with torch.no_grad():
        kwta_jumps = find_jumps(make_mlp("kwta", 0.2, width=32, seed=0), grid)
        relu_jumps = find_jumps(make_mlp("relu", 0.2, width=32, seed=0), grid)
    assert len(kwta_jumps) >= 3 and len(relu_jumps) == 0


def test_toy1d_writes_its_figure(tmp_path):
    cfg = compose_config("toy1d", tmp_path, ["act=kwta", "steps=50", "wandb.mode=disabled"])
    result = run_toy1d(cfg)
    assert result["jumps"] > 0
    assert_png(tmp_path / "toy1d.png")


def test_landscape_on_trained_checkpoints_writes_figures(tmp_path):
    checkpoints = []
    for act in ("relu", "kwta"):
        cfg = compose_train(
            tmp_path / act,
            ["data=fake", "data.image_size=16", "model=cnn", f"act={act}", "logger=csv"]
            + ["debug=limit", "trainer.max_epochs=1", "test=false"],
        )
        checkpoints.append(train(cfg)["ckpt_best"])
    out = tmp_path / "landscape"
    overrides = [f"ckpts=[{','.join(checkpoints)}]", "n_inputs=2", "steps=5", "path_steps=5"]
    report = run_landscape(compose_config("landscape", out, [*overrides, "wandb.mode=disabled"]))
    assert [m["model"] for m in report["models"]] == ["cnn relu", "cnn kwta gamma=0.1"]
    assert all(len(m["roughness"]) == 2 for m in report["models"])
    assert_png(out / "landscape.png")
    assert_png(out / "activation_changes.png")
    assert (out / "landscape.json").is_file()


def test_landscape_needs_checkpoints(tmp_path):
    from kwta_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="ckpts is empty"):
        run_landscape(compose_config("landscape", tmp_path, ["ckpts=[]"]))
