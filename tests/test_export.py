"""kwta-export: a checkpoint as plain weights that rebuild the network without Lightning, and an
attack report as a RobustBench model_info."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kwta_lightning import cli
from kwta_lightning.apps.export import (
    eps_string,
    export_model,
    load_network,
    model_info,
    network_options,
)
from kwta_lightning.attacks.checkpoint import build_model, load_checkpoint
from kwta_lightning.attacks.runner import run as run_attack
from kwta_lightning.core.backbones import build_network
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.errors import KWTAError
from tests.helpers import ROOT, cli_env, compose_config, run_cli, train_tiny_cnn

BUILD_ARGUMENTS = set(inspect.signature(build_network).parameters) - {"pretrained"}


def inputs(channels: int = 3) -> torch.Tensor:
    return torch.rand(8, channels, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """best.ckpt of a short k-WTA CNN run on fake data."""
    return train_tiny_cnn(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    """The checkpoint exported by the installed command: the folder with model.safetensors."""
    out = tmp_path_factory.mktemp("export")
    result = run_cli("model", str(checkpoint), "--out", str(out), script="kwta-export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported: {out / 'model.safetensors'}, {out / 'model.json'}" in result.stdout
    return out


def lightning_logits(checkpoint: Path) -> torch.Tensor:
    with torch.no_grad():
        return build_model(load_checkpoint(checkpoint))(inputs())


def test_the_export_rebuilds_the_lightning_modules_network(checkpoint, exported):
    info = json.loads((exported / "model.json").read_text())
    hparams = load_checkpoint(checkpoint)["hyper_parameters"]
    assert set(info["network"]) == BUILD_ARGUMENTS  # every argument of build_network travels
    assert info["network"] == {k: hparams[k] for k in BUILD_ARGUMENTS}
    assert info["network"]["backbone"] == "cnn" and info["network"]["activation"] == "kwta"
    assert info["data"] == "fake" and info["threat"]["eps"] == [0.031]
    assert info["source_checkpoint"] == str(checkpoint)
    net = load_network(exported / "model.safetensors")
    assert not net.training
    with torch.no_grad():
        assert torch.equal(net(inputs()), lightning_logits(checkpoint))


def test_torch_hub_loads_it_without_lightning(checkpoint, exported, tmp_path):
    logits = tmp_path / "logits.pt"
    code = f"""
import sys, torch
net = torch.hub.load({str(ROOT)!r}, "kwta_classifier", source="local",
                     weights={str(exported / "model.safetensors")!r})
x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(net(x), {str(logits)!r})
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"lightning", "hydra", "foolbox"}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"  # torch, torchvision, safetensors
    torch.testing.assert_close(torch.load(logits), lightning_logits(checkpoint), rtol=0, atol=1e-6)


def test_activation_options_travel_with_the_export(tmp_path):
    """A fixed-k k-WTA network: its activation_options go into model.json and back."""
    module = KWTAClassifier(
        "cnn", 10, 1, 16, [0.5], [0.5], activation="kwta_fixed", activation_options={"k": 20}
    ).eval()
    state = {f"net.{k}": v for k, v in module.net.state_dict().items()}
    ckpt = tmp_path / "fixed.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, ckpt)
    info = export_model(ckpt, tmp_path / "out")
    assert info["network"]["activation_options"] == {"k": 20}
    assert info["data"] is None and info["threat"] is None  # not a train.py checkpoint
    net = load_network(tmp_path / "out" / "model.safetensors", tmp_path / "out" / "model.json")
    with torch.no_grad():
        assert torch.equal(net(inputs(1)), module(inputs(1)))


def test_network_options_are_what_build_network_takes():
    hparams = {"backbone": "cnn", "pretrained": True, "optimizer": {"lr": 0.1}, "gamma": 0.2}
    assert network_options(hparams) == {"backbone": "cnn", "gamma": 0.2}


def test_broken_or_mismatched_files_are_named(exported, tmp_path):
    info = json.loads((exported / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps(info))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(KWTAError, match="is not a safetensors file"):
        load_network(tmp_path / "model.safetensors")
    info["network"]["num_classes"] = 5
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(KWTAError, match="does not rebuild its network .*size mismatch"):
        load_network(exported / "model.safetensors", tmp_path / "model.json")
    with pytest.raises(KWTAError, match="missing.json does not exist"):
        load_network(exported / "model.safetensors", tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("eps", "text"),
    [(8 / 255, "8/255"), (4 / 255, "4/255"), (0.031, "0.031"), (0.3, "0.3"), (0.5, "0.5")],
)
def test_eps_is_written_as_robustbench_writes_it(eps, text):
    assert eps_string(eps) == text


def verdict(eps: float, n_robust: int, masking: bool = False) -> dict:
    reasons = ["white_box_vs_adaptive/linf/eps=0.031: bpda beats pgd"] if masking else []
    return {
        "norm": "linf",
        "eps": eps,
        "robust_acc": n_robust / 1000,
        "n_robust": n_robust,
        "n": 1000,
        "strongest_attack": "bpda",
        "masking_suspected": masking,
        "reasons": reasons,
        "attacks": ["pgd", "bpda", "autoattack"],
    }


def row(attack: str, eps: float, n_robust: int) -> dict:
    return {"attack": attack, "norm": "linf", "eps": eps, "n_robust": n_robust}


def report(verdicts: list[dict], results: list[dict]) -> dict:
    return {
        "data": "cifar10",
        "model": "densenet121",
        "activation": "kwta",
        "gamma": 0.1,
        "seed": 0,
        "clean_acc": 0.7928,
        "complete": True,
        "verdict": verdicts,
        "results": results,
    }


def test_the_k_wta_papers_robustbench_entry_comes_out_as_robustbench_wrote_it():
    """Xiao2020Enhancing's numbers (RobustBench model_info/cifar10/Linf): clean 79.28, AutoAttack
    18.50, an external evaluation 7.40, unreliable."""
    rows = [row("pgd", 0.031, 400), row("autoattack", 0.031, 185), row("bpda", 0.031, 74)]
    info = model_info(report([verdict(0.031, 74, masking=True)], rows))
    expected = {"clean_acc": "79.28", "autoattack_acc": "18.50", "external": "7.40", "eps": "0.031"}
    assert info.items() >= expected.items() and info["unreliable"] is True
    assert info["dataset"] == "cifar10" and info["architecture"] == "densenet121"
    assert info["name"] == "densenet121 kwta gamma=0.1"
    assert info["additional_data"] is False and info["number_forward_passes"] == 1
    assert "pgd, bpda, autoattack" in info["footnote"]
    assert "white_box_vs_adaptive/linf/eps=0.031" in info["footnote"]


def test_without_autoattack_the_worst_case_is_external_and_the_footnote_says_so():
    info = model_info(report([verdict(0.031, 74)], [row("pgd", 0.031, 74)]))
    assert info["autoattack_acc"] is None and info["external"] == "7.40"
    assert info["unreliable"] is False and "AutoAttack was not run" in info["footnote"]


def test_external_only_when_below_autoattack():
    info = model_info(report([verdict(0.031, 185)], [row("autoattack", 0.031, 185)]))
    assert info["autoattack_acc"] == "18.50" and "external" not in info


def test_a_report_with_several_radii_needs_eps():
    several = report([verdict(0.0, 790), verdict(0.031, 74), verdict(0.1, 3)], [])
    with pytest.raises(KWTAError, match="has linf radii 0, 0.031, 0.1; choose one with --eps"):
        model_info(several)
    assert model_info(several, eps=0.1)["eps"] == "0.1"
    with pytest.raises(KWTAError, match="no linf verdict at eps=0.2"):
        model_info(several, eps=0.2)
    with pytest.raises(KWTAError, match="has no l2 results"):
        model_info(several, norm="l2")


@pytest.fixture(scope="module")
def attack_report(checkpoint, tmp_path_factory) -> Path:
    """A real attack.py report folder: FGSM and AutoAttack at eps 8/255 on the checkpoint."""
    out = tmp_path_factory.mktemp("attack")
    overrides = [
        f"ckpt_path={checkpoint}",
        "attack=[fgsm,autoattack]",
        f"eps=[{8 / 255}]",
        "n_samples=16",
        "batch_size=16",
        "diagnostics.unbounded_steps=5",
        "cache_dir=null",
        "wandb.mode=disabled",
    ]
    run_attack(compose_config("attack", out, overrides))
    return out


def run_export(monkeypatch, *args: str) -> None:
    """The installed command's function, in this process."""
    monkeypatch.setattr(sys, "argv", ["kwta-export", *args])
    cli.export()


@pytest.mark.slow
def test_a_real_report_becomes_a_model_info(attack_report, tmp_path, monkeypatch):
    out = tmp_path / "model_info.json"
    run_export(monkeypatch, "robustbench", str(attack_report), "--out", str(out))
    info = json.loads(out.read_text())
    summary = json.loads((attack_report / "report.json").read_text())
    (worst,) = summary["verdict"]
    (auto,) = [r for r in summary["results"] if r["attack"] == "autoattack"]
    assert info["eps"] == "8/255" and info["dataset"] == "fake" and info["architecture"] == "cnn"
    assert info["clean_acc"] == f"{100 * summary['clean_acc']:.2f}"
    assert info["autoattack_acc"] == f"{100 * auto['robust_acc']:.2f}"
    assert ("external" in info) == (worst["n_robust"] < auto["n_robust"])
    assert info["unreliable"] is worst["masking_suspected"]
    assert "16 test images (seed 0)" in info["footnote"]
    assert "fgsm, autoattack" in info["footnote"]


def test_an_unknown_mode_is_refused_in_one_line():
    result = run_cli("nope", script="kwta-export")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "error: argument mode: invalid choice: 'nope' (choose from 'model', 'robustbench')"
    )


def test_bad_inputs_are_refused_in_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    no_clean = tmp_path / "report.json"
    no_clean.write_text(json.dumps(report([verdict(0.031, 74)], []) | {"clean_acc": None}))
    cases = [
        (["model", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)], "does not exist"),
        (["model", str(truncated), "--out", str(tmp_path)], "truncated or not a PyTorch file"),
        (["robustbench", str(tmp_path / "none"), "--out", "x.json"], "none does not exist"),
        (["robustbench", str(no_clean), "--out", "x.json"], "(no clean_acc)"),
        (["robustbench", str(no_clean)], "the following arguments are required: --out"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            run_export(monkeypatch, *args)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and message in err
    assert not (tmp_path / "model.safetensors").exists()
