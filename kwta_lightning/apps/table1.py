"""The k-WTA reproduction's Table 1 in one command: train, attack, tabulate.

``kwta-table1`` runs each stage of ``conf/table1.yaml`` as its own command, in this run's folder:
``train.py`` for every training stage (a k-WTA stage warm-started from the stage before it),
``attack.py`` on each stage's best checkpoint, then ``kwta-summarize`` over all of them, whose
``summary.md`` is the table. Each stage is the command a user would type (printed before it
runs), so any one can be rerun by hand. A stage whose output is there (``metrics.json``, the
attack's ``report.json``) is kept, so the same command continues an interrupted pipeline.
"""

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from kwta_lightning.errors import ConfigError, KWTAError

log = logging.getLogger(__name__)


def _command(script: str) -> list[str]:
    """The installed console script ``script`` of this environment."""
    return [str(Path(sys.executable).parent / script)]


def train_overrides(stage: DictConfig, previous: Path | None, extra: Sequence[str]) -> list[str]:
    """The overrides that train ``stage``: its activation, its gamma, the warm start, then
    ``extra`` (``conf/table1.yaml``'s ``train_overrides``: they win)."""
    overrides = [f"act={stage.act}"]
    if stage.gamma is not None:
        overrides.append(f"gamma={stage.gamma}")
    if previous is None:
        overrides.append("model.pretrained=true")  # torchvision's ImageNet weights
    else:
        overrides.append(f"init_from='{previous / 'checkpoints' / 'best.ckpt'}'")
    return [*overrides, *extra]


def _run(step: str, argv: list[str]) -> None:
    log.info("%s: %s", step, " ".join(argv))
    if subprocess.run(argv).returncode != 0:
        raise KWTAError(f"{step} failed; its log is in the folder named above")


def check(cfg: DictConfig) -> None:
    """One line naming the key when the pipeline's config cannot describe a pipeline."""
    stages = cfg.stages
    if not isinstance(stages, ListConfig) or not stages:
        raise ConfigError(f"stages={stages}: must be a list of {{name, act, gamma}}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, DictConfig) or not {"name", "act", "gamma"} <= set(stage):
            raise ConfigError(f"stages[{i}]={stage}: must have name, act and gamma")
    for key in ("train_overrides", "attack_overrides"):
        if not isinstance(cfg[key], ListConfig):
            raise ConfigError(f"{key}={cfg[key]}: must be a list of overrides")


def run(cfg: DictConfig) -> None:
    check(cfg)
    out = Path(cfg.paths.output_dir)
    n_steps = 2 * len(cfg.stages) + 1
    step, previous = 0, None
    runs = []
    for stage in cfg.stages:
        step += 1
        run_dir = out / stage.name
        if (run_dir / "metrics.json").is_file():
            log.info("step %d/%d: %s trained already (%s)", step, n_steps, stage.name, run_dir)
        else:
            overrides = train_overrides(stage, previous, cfg.train_overrides)
            _run(
                f"step {step}/{n_steps}: train {stage.name}",
                [*_command("kwta-train"), *overrides, f"hydra.run.dir='{run_dir}'"],
            )
        previous = run_dir
        runs.append(run_dir)
    reports = []
    for run_dir in runs:
        step += 1
        attack_dir = out / f"attack_{run_dir.name}"
        reports.append(attack_dir / "report.json")
        if reports[-1].is_file():
            log.info("step %d/%d: %s attacked already", step, n_steps, run_dir.name)
            continue
        ckpt = run_dir / "checkpoints" / "best.ckpt"
        _run(
            f"step {step}/{n_steps}: attack {run_dir.name}",
            [
                *_command("kwta-attack"),
                f"ckpt_path='{ckpt}'",
                *cfg.attack_overrides,
                f"hydra.run.dir='{attack_dir}'",
            ],
        )
    step += 1
    _run(
        f"step {step}/{n_steps}: the table",
        [*_command("kwta-summarize"), *map(str, runs), *map(str, reports), "--out", str(out)],
    )
    log.info("Table 1:\n%s", (out / "summary.md").read_text())
