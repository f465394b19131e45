"""The model side: k-WTA layers, backbones, the LightningModule, data and the training callbacks.

Core imports nothing from ``run``, ``attacks`` or ``apps``.
"""
