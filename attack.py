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

CONF = Path(__file__).resolve().parent / "conf"


def check_attack_names(argv: list[str]) -> None:
    """Refuse unknown names in ``attack=[...]`` and ``preset=...`` in one line that lists the
    known ones.

    Hydra's own error for a missing option in a list names the option but not the choices, and
    an unknown option of the optional preset group is silently ignored.
    """
    for arg in argv:
        key, _, value = arg.partition("=")
        group = key.lstrip("+~")
        if group not in ("attack", "preset"):
            continue
        known = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        names = [n.strip() for n in value.strip("[]").split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            print(
                f"error: unknown {group} {', '.join(unknown)}; known: {', '.join(known)}",
                file=sys.stderr,
            )
            sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="attack")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from kwta_lightning.attacks.runner import run  # torch and the libraries: after the checks

    run(cfg)


if __name__ == "__main__":
    check_attack_names(sys.argv[1:])
    main()
