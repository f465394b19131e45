"""Evaluate the robustness of a train.py checkpoint, adaptive attacks included.

uv run python attack.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
uv run python attack.py ckpt_path=... attack=[pgd,deepfool,nes_pgd,square] eps=[0.01,0.031,0.1]
uv run python attack.py ckpt_path=... preset=mnist_kwta
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kwta_lightning.console import exit_on_user_error
from kwta_lightning.overrides import exit_on_bad_override

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="attack")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from kwta_lightning.attacks.runner import run  # torch and the libraries: after the checks

    run(cfg)


if __name__ == "__main__":
    exit_on_bad_override(CONF, "attack", sys.argv[1:])
    main()
