"""Every app's command line. ``pyproject.toml`` installs them as ``kwta-train``, ``kwta-attack``,
``kwta-landscape``, ``kwta-toy1d``, ``kwta-table1``, ``kwta-summarize``, ``kwta-merge`` and
``kwta-export``; ``python train.py`` and ``python attack.py`` call the same functions.

A Hydra app checks its overrides before Hydra composes them and its values before any work; its
task imports torch, Lightning and the attack libraries only then, so a wrong input is refused in
about a second.
"""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from kwta_lightning.run.console import exit_on_user_error
from kwta_lightning.run.jobs import ddp_child_argv
from kwta_lightning.run.overrides import exit_on_bad_override

CONF = Path(__file__).resolve().parents[1] / "conf"  # the checkout's conf/ (an editable install)


def _hydra_app(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """The console entry of the Hydra app ``conf/<config_name>.yaml`` that runs ``task``."""

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name=config_name)
    @exit_on_user_error
    def main(cfg: DictConfig) -> Any:
        return task(cfg)

    def app() -> None:
        exit_on_bad_override(CONF, config_name, sys.argv[1:])
        main()

    return app


def _train(cfg: DictConfig) -> float | None:
    """Return ``cfg.objective`` (default val_acc_best), the value hyper-parameter sweepers read."""
    from kwta_lightning.run.training import run_job

    return run_job(cfg)


def _attack(cfg: DictConfig) -> None:
    from kwta_lightning.attacks.runner import run

    run(cfg)


def _landscape(cfg: DictConfig) -> None:
    from kwta_lightning.apps.landscape import run

    run(cfg)


def _toy1d(cfg: DictConfig) -> None:
    from kwta_lightning.apps.toy1d import run

    run(cfg)


def _table1(cfg: DictConfig) -> None:
    from kwta_lightning.apps.table1 import run

    run(cfg)


def train() -> None:
    sys.argv = ddp_child_argv(sys.argv)
    _hydra_app("train", _train)()


attack = _hydra_app("attack", _attack)
landscape = _hydra_app("landscape", _landscape)
toy1d = _hydra_app("toy1d", _toy1d)
table1 = _hydra_app("table1", _table1)


def summarize() -> None:
    from kwta_lightning.apps.summarize import main

    exit_on_user_error(main)()


def merge() -> None:
    from kwta_lightning.attacks.merge import main

    main()


def export() -> None:
    from kwta_lightning.apps.export import main

    exit_on_user_error(main)()
