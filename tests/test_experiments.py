"""Every recipe in conf/experiment/ composes as published and runs a fast_dev_run step."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from kwta_lightning.core.activations import kwta_layers
from kwta_lightning.core.callbacks import ReluToKWTA, SparsityAnnealing
from kwta_lightning.core.gamma_schedules import MilestoneGamma, PaperGamma
from kwta_lightning.run.training import train
from tests.helpers import ROOT, compose_train, needs_mnist

# CIFAR-10 needs a download: fake images of the same shape stand in; no pretrained weights either.
OFFLINE = ["data=fake", "data.batch_size=4", "data.val_size=8", "trainer=cpu", "debug=fdr"]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_every_experiment_is_tested():
    assert EXPERIMENTS == [
        "mnist_quick",
        "paper_adv_train",
        "paper_cifar_resnet18",
        "paper_free_adv_train",
        "paper_incremental",
        "paper_mnist_study",
        "paper_sweep_cifar10",
        "paper_sweep_svhn",
        "paper_sweep_wrn22",
        "paper_trades",
        "repro_finetune",
        "repro_warmstart",
    ]


@pytest.mark.parametrize(
    ("name", "data", "models", "gammas"),
    [
        ("paper_sweep_cifar10", "cifar10", "resnet18,densenet121", "0.3,0.2,0.1,0.07,0.03,0.01"),
        ("paper_sweep_svhn", "svhn", None, "0.2,0.1,0.07,0.03"),
        ("paper_sweep_wrn22", "cifar10", None, "0.2,0.1,0.05"),
    ],
)
def test_the_paper_sweeps_sweep_its_gammas_with_its_recipe(name, data, models, gammas):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.get("model") == models
    assert cfg.hydra.sweeper.params.gamma == gammas and cfg.data.name == data
    assert (cfg.optimizer.lr, cfg.trainer.max_epochs, cfg.data.batch_size) == (0.1, 80, 256)


@pytest.mark.parametrize(
    ("point", "act", "gamma"), [("relu", "relu", None), ("kwta_0.07", "kwta", 0.07)]
)
def test_the_mnist_study_sweeps_relu_once_and_each_sparsity_ratio(tmp_path, point, act, gamma):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=paper_mnist_study"], return_hydra_config=True)
    points = cfg.hydra.sweeper.params["+sparsity"].split(",")
    assert points == ["relu", *(f"kwta_{g}" for g in ("0.3", "0.2", "0.1", "0.07", "0.03", "0.01"))]
    run = compose_train(tmp_path, ["experiment=paper_mnist_study", f"+sparsity={point}"])
    assert (run.act.name, run.model.backbone, run.data.name) == (act, "paper_mnist_cnn", "mnist")
    assert gamma is None or run.gamma == gamma


def test_paper_recipe_values(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=paper_cifar_resnet18"])
    assert (cfg.model.backbone, cfg.act.name, cfg.gamma, cfg.data.name) == (
        "resnet18",
        "kwta",
        0.1,
        "cifar10",
    )
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 0)
    assert list(cfg.scheduler.milestones) == [50] and cfg.trainer.max_epochs == 80
    assert cfg.data.batch_size == 256 and list(cfg.model.std) == [1]
    adv = compose_train(tmp_path, ["experiment=paper_adv_train"])
    assert adv.model.adv_train.enabled and adv.model.adv_train.eps == 0.031
    assert adv.optimizer.lr == 0.1 and adv.trainer.max_epochs == 80


def test_trades_recipe_is_the_adv_train_recipe_with_trades_beta_6(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=paper_trades"])
    adv = cfg.model.adv_train
    assert adv.enabled and (adv.method, adv.beta) == ("trades", 6.0)
    assert (adv.eps, adv.step_size, adv.steps) == (0.031, 0.007, 10)
    assert (cfg.model.backbone, cfg.gamma, cfg.optimizer.lr, cfg.trainer.max_epochs) == (
        "resnet18",
        0.1,
        0.1,
        80,
    )


def test_free_recipe_replays_8_times_over_an_eighth_of_the_epochs(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=paper_free_adv_train"])
    adv = cfg.model.adv_train
    assert adv.enabled and (adv.method, adv.replays, adv.eps) == ("free", 8, 0.031)
    assert cfg.trainer.max_epochs == 80 // 8 and list(cfg.scheduler.milestones) == [50 // 8]
    assert (cfg.model.backbone, cfg.data.batch_size, cfg.optimizer.lr) == ("resnet18", 256, 0.1)


def test_incremental_recipe_follows_the_paper_rule(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=paper_incremental", "init_from=x.ckpt"])
    annealing = instantiate(cfg.callbacks.sparsity_annealing)
    assert isinstance(annealing, SparsityAnnealing) and isinstance(annealing.schedule, PaperGamma)
    gammas = [round(annealing.schedule(e), 6) for e in range(cfg.trainer.max_epochs)]
    assert gammas[:5] == [0.2, 0.2, 0.195, 0.195, 0.19] and gammas[-1] == 0.03 == cfg.gamma
    assert cfg.optimizer.lr == 0.001 and not cfg.scheduler
    assert annealing.checkpoint_dir == tmp_path / "checkpoints"


@pytest.mark.parametrize("model", ["resnet18", "alexnet"])
def test_repro_recipe_goes_relu_then_02_then_01(tmp_path, model):
    cfg = compose_train(tmp_path, ["experiment=repro_warmstart", f"model={model}"])
    assert cfg.model.backbone == model and cfg.model.pretrained and cfg.data.image_size == 224
    assert cfg.model.activation == "relu"
    assert (cfg.data.batch_size, cfg.optimizer.lr, cfg.trainer.gradient_clip_val) == (16, 0.01, 0.5)
    switch = instantiate(cfg.callbacks.relu_to_kwta)
    annealing = instantiate(cfg.callbacks.sparsity_annealing)
    assert isinstance(switch, ReluToKWTA) and isinstance(annealing.schedule, MilestoneGamma)
    assert (switch.activation, switch.gamma) == ("kwta", 0.2)
    epochs = range(switch.relu_epochs, cfg.trainer.max_epochs)
    assert sorted({annealing.schedule(e) for e in epochs}, reverse=True) == [0.2, 0.1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("paper_cifar_resnet18", []),
        ("paper_adv_train", ["adv_train.steps=2"]),
        ("paper_trades", ["adv_train.steps=2"]),
        ("paper_free_adv_train", ["adv_train.replays=2"]),
        ("repro_warmstart", ["model.pretrained=false"]),
        ("repro_warmstart", ["model=alexnet", "model.pretrained=false"]),
    ],
)
def test_experiment_runs_one_step(tmp_path, name, extra):
    cfg = compose_train(tmp_path, [f"experiment={name}", *OFFLINE, *extra])
    metrics = train(cfg)
    assert 0 <= metrics["test_acc"] <= 1 and metrics["model"] == cfg.model.backbone


@pytest.mark.slow
def test_incremental_experiment_runs_one_step_from_a_checkpoint(tmp_path):
    overrides = ["experiment=paper_incremental", *OFFLINE]
    start = instantiate(compose_train(tmp_path, [*overrides, "init_from=x", "gamma=0.2"]).model)
    ckpt = tmp_path / "gamma0.2.ckpt"
    torch.save({"state_dict": start.state_dict(), "hyper_parameters": dict(start.hparams)}, ckpt)
    cfg = compose_train(tmp_path / "run", [*overrides, f"init_from={ckpt}"])
    metrics = train(cfg)
    assert 0 <= metrics["test_acc"] <= 1
    assert (Path(tmp_path / "run" / "checkpoints") / "gamma=0.200.ckpt").is_file()


@needs_mnist
def test_mnist_quick_runs_one_step(tmp_path):
    cfg = compose_train(
        tmp_path,
        ["experiment=mnist_quick", "debug=fdr", "data.train_subset=64", "data.num_workers=0"],
    )
    metrics = train(cfg)
    assert metrics["model"] == "cnn" and metrics["act"] == "kwta" and metrics["data"] == "mnist"
    assert 0 <= metrics["test_acc"] <= 1


def test_kwta_layers_exist_after_build(tmp_path):
    model = instantiate(compose_train(tmp_path, ["experiment=paper_cifar_resnet18"]).model)
    assert len(kwta_layers(model)) == 9 and {m.gamma for m in kwta_layers(model).values()} == {0.1}


def test_adv_train_recipe_builds_on_mnist_as_its_header_says(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=paper_adv_train", "data=mnist", "model=cnn"])
    assert (cfg.adv_train.eps, cfg.adv_train.step_size, cfg.adv_train.steps) == (0.3, 0.01, 40)
    model = instantiate(cfg.model)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
