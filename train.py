"""Train a classifier with k-WTA or ReLU.

uv run python train.py model=resnet18 act=kwta gamma=0.1
uv run python train.py -m model=cnn,resnet18 gamma=0.05,0.1,0.2     # a sweep
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kwta_lightning.console import exit_on_user_error
from kwta_lightning.jobs import ddp_child_argv
from kwta_lightning.overrides import exit_on_bad_override


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Return ``cfg.objective`` (default val_acc_best), the value hyper-parameter sweepers read."""
    from kwta_lightning.training import run_job  # torch and Lightning: after the config checks

    return run_job(cfg)


if __name__ == "__main__":
    sys.argv = ddp_child_argv(sys.argv)
    exit_on_bad_override(Path(__file__).resolve().parent / "conf", "train", sys.argv[1:])
    main()
