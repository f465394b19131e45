"""Evaluate the robustness of a train.py checkpoint, adaptive attacks included (the same as
``kwta-attack``).

uv run python attack.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
uv run python attack.py ckpt_path=... attack=[pgd,deepfool,nes_pgd,square] eps=[0.01,0.031,0.1]
uv run python attack.py ckpt_path=... preset=mnist_kwta
"""

from kwta_lightning.cli import attack

if __name__ == "__main__":
    attack()
