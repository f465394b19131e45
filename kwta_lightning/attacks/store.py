"""Finished attacks on disk: a per-checkpoint cache that lets a killed or extended evaluation
resume, and the per-input outcomes file written with every report.

An attack's results are cached under ``<cache_dir>/<checkpoint sha256>/<attack>-<key>.pt``; the
key hashes everything the results depend on (the attack's resolved config, its radii, the chosen
test images, the batch size), so a changed setting is never mistaken for a finished one.
"""

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kwta_lightning.attacks.base import AttackResult

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def result_key(**parts: Any) -> str:
    """A short hash of everything an attack's results depend on."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _as_dict(r: AttackResult) -> dict[str, Any]:
    return {
        "attack": r.attack,
        "norm": r.norm,
        "kind": r.kind,
        "eps": r.eps,
        "robust": r.robust,
        "norms": r.norms,
        "extra": r.extra,
        "wall_time_s": r.wall_time_s,
        "examples": r.examples,
        "example_preds": r.example_preds,
    }


class ResultCache:
    """Finished attacks of one checkpoint; ``root=None`` caches nothing."""

    def __init__(self, root: str | Path | None, checkpoint_sha256: str) -> None:
        self.folder = None if root is None else Path(root) / checkpoint_sha256[:16]

    def _path(self, name: str, key: str) -> Path:
        return self.folder / f"{name}-{key}.pt"

    def has(self, name: str, key: str) -> bool:
        return self.folder is not None and self._path(name, key).is_file()

    def load(self, name: str, key: str) -> tuple[list[AttackResult], list[str]] | None:
        """The results and library warnings of a finished attack, or None."""
        if self.folder is None or not self._path(name, key).is_file():
            return None
        try:
            saved = torch.load(self._path(name, key), map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable: run the attack again rather than stop
            log.warning("%s: cached results unreadable (%s); running it again", name, err)
            return None
        return [AttackResult(**r) for r in saved["results"]], saved["warnings"]

    def save(
        self, name: str, key: str, results: Sequence[AttackResult], warnings: Sequence[str]
    ) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(name, key).with_suffix(".tmp")
        torch.save({"results": [_as_dict(r) for r in results], "warnings": list(warnings)}, tmp)
        tmp.replace(self._path(name, key))  # atomic: a kill never leaves half a file


def bits(mask: torch.Tensor) -> str:
    """A boolean vector as a string of 0 and 1, one character per input."""
    return "".join("1" if b else "0" for b in mask.tolist())


def from_bits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def outcomes(
    summary: dict[str, Any],
    indices: Sequence[int],
    clean_correct: torch.Tensor,
    results: Sequence[AttackResult],
) -> dict[str, Any]:
    """outcomes.json: per input (by test-set index) whether it survived each attack at each eps,
    and the size of each adversarial perturbation."""
    return {
        "checkpoint": summary["checkpoint"],
        "checkpoint_sha256": summary["checkpoint_sha256"],
        "data": summary["data"],
        "indices": list(indices),
        "clean_correct": bits(clean_correct),
        "results": [
            {
                "attack": r.attack,
                "kind": r.kind,
                "norm": r.norm,
                "eps": r.eps,
                "robust": bits(r.robust),
                "norms": [round(v, 6) for v in r.norms.tolist()],
                "wall_time_s": r.wall_time_s,
            }
            for r in results
        ],
    }
