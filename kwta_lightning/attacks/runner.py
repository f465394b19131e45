"""One evaluation from a composed ``conf/attack.yaml``: load, attack, check, report."""

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kwta_lightning.attacks import report
from kwta_lightning.attacks.base import Attack, AttackResult
from kwta_lightning.attacks.checkpoint import (
    build_data,
    build_model,
    choose_samples,
    load_checkpoint,
)
from kwta_lightning.attacks.diagnostics import (
    Diagnostic,
    planned_passes,
    planned_runs,
    run_diagnostics,
    verdict,
)
from kwta_lightning.attacks.evaluate import Evaluator, ProgressLog, result_rows
from kwta_lightning.attacks.store import ResultCache, file_sha256, result_key
from kwta_lightning.core.activations import activation_label, uses_gamma
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.console import duration, print_config_tree, quiet_libraries

log = logging.getLogger(__name__)


def radii(value: Any, threat: Mapping[str, Any] | None, key: str) -> list[float]:
    """The configured radii as a sorted list, or those of the data set's threat model."""
    if value is None:
        if not threat or key not in threat:
            raise ConfigError(
                f"{key} is null and the checkpoint has no threat model (threat.{key}) of its "
                f"data set; give {key}=[...]"
            )
        value = threat[key]
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{key} must be a number or a list of numbers, got {value!r}")
    if any(v < 0 for v in values):
        raise ConfigError(f"{key} must be >= 0, got {values}")
    return sorted({float(v) for v in values})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available")
    return device


def build_attacks(cfg: DictConfig) -> dict[str, Attack]:
    if not cfg.get("attack"):
        raise ConfigError("no attack selected; choose some, e.g. attack=[pgd,nes_pgd]")
    return {name: instantiate(node, name=name) for name, node in cfg.attack.items()}


def attack_params(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Every attack's hyper-parameters as configured (resolved), for the report."""
    return {name: OmegaConf.to_container(node, resolve=True) for name, node in cfg.attack.items()}


def log_estimate(
    attacks: Mapping[str, Attack],
    epsilons: Mapping[str, Sequence[float]],
    cached: set[str],
    diagnostic_passes: float,
    n_inputs: int,
    seconds_per_pass: float,
) -> None:
    """The suite's duration, from each attack's budget and the time of one pass."""
    passes, unknown = diagnostic_passes, []
    for name, attack in attacks.items():
        budget = attack.passes()
        if name in cached:
            continue
        if budget is None:
            unknown.append(name)
            continue
        passes += budget * (1 if attack.shares_epsilons else len(epsilons[attack.norm]))
    todo = len(attacks) - len(cached)
    log.info(
        "estimate: about %s for %d attack%s%s (one forward-backward pass: %.2f ms an image); "
        "less where attacks stop early or inputs are fooled on the way%s",
        duration(passes * n_inputs * seconds_per_pass),
        todo,
        "" if todo == 1 else "s",
        f" ({len(cached)} more from the cache)" if cached else "",
        1000 * seconds_per_pass,
        f"; not counted: {', '.join(unknown)}" if unknown else "",
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; write the report after every attack and return the last."""
    started = time.perf_counter()
    quiet_libraries()
    if cfg.print_config:
        print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    ckpt = load_checkpoint(cfg.ckpt_path)
    data_name = ckpt["datamodule_hyper_parameters"]["name"]
    threat = ckpt["datamodule_hyper_parameters"].get("threat")
    attacks = build_attacks(cfg)
    norms = {a.norm for a in attacks.values()}
    epsilons = {
        norm: radii(cfg[key], threat, key)
        for norm, key in (("linf", "eps"), ("l2", "l2_eps"))
        if norm in norms
    }
    params = attack_params(cfg)
    device = pick_device(cfg.device)
    model = build_model(ckpt)
    data = build_data(ckpt, cfg.paths.data_dir)
    x, y, indices = choose_samples(data, cfg.n_samples, cfg.seed)
    log.info(
        "attacking %s on %d of the %d %s test images (a random choice, seed %d), eps %s",
        cfg.ckpt_path,
        len(x),
        len(data.test_set),
        data_name,
        cfg.seed,
        epsilons,
    )
    sha = file_sha256(cfg.ckpt_path)

    def key(attack: Attack, eps: Sequence[float], attack_params: Mapping[str, Any]) -> str:
        return result_key(
            attack=attack.name,
            params=attack_params,
            eps=list(eps),
            indices=indices,
            batch_size=cfg.batch_size,
            device=device.type,
        )

    total = sum(len(epsilons[a.norm]) for a in attacks.values())
    pgd_radii = len(epsilons["linf"]) if "pgd" in attacks else 0
    total += planned_runs(attacks, pgd_radii, cfg.diagnostics.convergence_doublings)
    cache = ResultCache(cfg.cache_dir, sha)
    cached = {
        name
        for name, a in attacks.items()
        if cache.has(name, key(a, epsilons[a.norm], params[name]))
    }
    evaluator = Evaluator(
        model,
        x,
        y,
        cfg.batch_size,
        device,
        cfg.n_examples,
        cache,
        key,
        ProgressLog(total, sum(len(epsilons[attacks[name].norm]) for name in cached)),
    )
    diagnostic_passes = planned_passes(
        attacks, pgd_radii, cfg.diagnostics.unbounded_steps, cfg.diagnostics.convergence_doublings
    )
    log_estimate(attacks, epsilons, cached, diagnostic_passes, len(x), evaluator.seconds_per_pass())
    evaluation = evaluator.evaluation
    hparams = ckpt["hyper_parameters"]
    options = hparams.get("activation_options")
    summary = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "checkpoint_sha256": sha,
        "training_run": report.training_run(cfg.ckpt_path),
        "data": data_name,
        "model": hparams["backbone"],
        "activation": activation_label(hparams["activation"], options),
        "gamma": hparams["gamma"] if uses_gamma(hparams["activation"], options) else None,
        "n_samples": len(x),
        "seed": cfg.seed,
        "device": str(device),
        "epsilons": epsilons,
        "clean_acc": int(evaluation.clean_correct.sum()) / len(x),
        "complete": False,
        "verdict": [],
        "results": [],
        "diagnostics": [],
        "wall_time_s": None,
    }
    output_dir = Path(cfg.paths.output_dir)

    def write(extra: Sequence[AttackResult] = (), diagnostics: Sequence[Diagnostic] = ()) -> None:
        results = [*evaluation.results, *extra]
        summary["results"] = result_rows(results, evaluation.clean_correct, params)
        summary["verdict"] = verdict(results, evaluation.clean_correct, diagnostics)
        summary["diagnostics"] = [d.as_dict() for d in diagnostics]
        summary["wall_time_s"] = round(time.perf_counter() - started, 1)
        report.write(summary, evaluation, results, y, indices, output_dir)

    for name, attack in attacks.items():
        evaluation.results += evaluator.run(attack, epsilons[attack.norm], params[name])
        write()  # a killed run keeps every attack it finished
    diagnostics, extra, extra_params = run_diagnostics(
        evaluator, attacks, params, data.num_classes, **cfg.diagnostics
    )
    summary["complete"] = True
    params |= extra_params
    write(extra, diagnostics)
    report.print_console(summary, output_dir)
    report.log_wandb(summary, output_dir, **cfg.wandb)
    return summary
