"""Train a classifier with k-WTA or ReLU.

uv run python train.py model=resnet18 act=kwta gamma=0.1
"""

import hydra
from omegaconf import DictConfig

from kwta_lightning.console import exit_on_user_error
from kwta_lightning.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Return the best validation accuracy, the objective hyper-parameter sweepers read."""
    return train(cfg)["val_acc_best"]


if __name__ == "__main__":
    main()
