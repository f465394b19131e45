"""Evaluate the robustness of a train.py checkpoint, adaptive attacks included.

uv run python attack.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
uv run python attack.py ckpt_path=... attack=[pgd,deepfool,vga,eot_pgd,square] eps=[0.01,0.031,0.1]
"""

import hydra
from omegaconf import DictConfig

from kwta_lightning.attacks.runner import run
from kwta_lightning.console import exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf", config_name="attack")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
