"""k-WTA networks with PyTorch Lightning and Hydra."""
