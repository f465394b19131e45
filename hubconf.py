"""torch.hub entry points: a network exported by ``kwta-export model``, rebuilt without Lightning.

net = torch.hub.load("path/to/kwta-lightning", "kwta_classifier", source="local",
                     weights="export/model.safetensors")
"""

from kwta_lightning.apps.export import load_network

dependencies = ["torch", "torchvision", "safetensors"]


def kwta_classifier(weights: str, info: str | None = None):
    """The exported classifier in eval mode: it takes pixels in [0, 1] and returns logits.

    ``weights``: model.safetensors; ``info``: its model.json (default: beside the weights).
    """
    return load_network(weights, info)
