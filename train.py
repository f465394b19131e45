"""Train a classifier with k-WTA or ReLU (the same as ``kwta-train``).

uv run python train.py model=resnet18 act=kwta gamma=0.1
uv run python train.py -m model=cnn,resnet18 gamma=0.05,0.1,0.2     # a sweep
"""

from kwta_lightning.cli import train

if __name__ == "__main__":
    train()
