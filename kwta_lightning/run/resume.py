"""What a resumed run needs beyond Lightning's checkpoint: RNG states, the run's config, checks.

Lightning restores the weights, optimizer, schedulers and loop counters, but not the random
number generators, so a resumed run draws other numbers than the run that died. ``ResumeState``
keeps them in the checkpoint with the run's config; :func:`check_same_run` refuses to continue a
run folder with a config that would make it another run.
"""

import random
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from kwta_lightning.errors import ConfigError

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
UNSET = "<unset>"

# Keys a resume may change: where and how long it runs, how it logs, how often it checkpoints.
RESUME_SAFE = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.sync_batchnorm",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "logger",
    "paths",
    "data.root",
    "data.download",
    "data.num_workers",
    "callbacks.periodic_checkpoint",
    "callbacks.log_progress",
    "callbacks.learning_rate",
    "print_config",
    "ckpt_path",
    "resume",
    "test",
    "objective",
)


def rng_states() -> dict[str, Any]:
    """Every global generator a training step draws from, as tensors and plain values.

    Plain values (no numpy arrays), so the checkpoint still loads weights-only.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Put back what :func:`rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(Callback):
    """Saves the RNG states, the run's config and its .hydra files in every checkpoint.

    The RNG states are put back at the start of the resumed training, after Lightning's set-up
    (which draws numbers of its own) and before the first batch, where the run that died drew
    its next number. The config is what a later resume is checked against; the .hydra files are
    what the run folder gets back when a resume is refused (Hydra has already overwritten them).
    """

    def __init__(self, config: dict[str, Any], hydra_dir: Path | None = None) -> None:
        self.config = config
        self.hydra_files = {
            name: (hydra_dir / name).read_text()
            for name in HYDRA_FILES
            if hydra_dir is not None and (hydra_dir / name).is_file()
        }
        self._states_to_load: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states(), "config": self.config, "hydra_files": self.hydra_files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._states_to_load = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._states_to_load is not None:
            set_rng_states(self._states_to_load)
            self._states_to_load = None


def saved_state(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ResumeState a checkpoint holds, or None (a checkpoint from an older version)."""
    return ckpt.get("callbacks", {}).get(ResumeState.__qualname__)


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


def _resume_safe(key: str) -> bool:
    return any(key == safe or key.startswith(f"{safe}.") for safe in RESUME_SAFE)


def changed_keys(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys (dotted) whose values differ between two configs, resume-safe keys left out."""
    old, now = dict(_flatten(saved)), dict(_flatten(new))
    keys = dict.fromkeys([*old, *now])
    return [k for k in keys if old.get(k, UNSET) != now.get(k, UNSET) and not _resume_safe(k)]


def describe_changes(saved: Mapping[str, Any], new: Mapping[str, Any], keys: list[str]) -> str:
    old, now = dict(_flatten(saved)), dict(_flatten(new))
    shown = [f"{k}: {old.get(k, UNSET)} -> {now.get(k, UNSET)}" for k in keys[:6]]
    more = f", and {len(keys) - 6} more" if len(keys) > 6 else ""
    return ", ".join(shown) + more


def check_same_run(
    output_dir: Path, ckpt_path: Path, ckpt: Mapping[str, Any], config: Mapping[str, Any]
) -> None:
    """Refuse to continue the run in ``output_dir`` with a config that makes it another run.

    On refusal the folder's .hydra files get the saved run's back, so the folder still says
    what its checkpoints and metrics are.
    """
    state = saved_state(ckpt)
    if state is None:
        return  # a checkpoint from before configs were saved: nothing to compare
    keys = changed_keys(state["config"], config)
    if not keys:
        return
    for name, text in state.get("hydra_files", {}).items():
        (output_dir / ".hydra" / name).write_text(text)
    raise ConfigError(
        f"run folder {output_dir} holds a run with another config "
        f"({describe_changes(state['config'], config, keys)}); resume it with its own config, "
        f"or pass resume=false to start it over (the earlier run is kept in "
        f"{output_dir / 'previous'}); checkpoint: {ckpt_path.name}"
    )


RUN_OUTPUTS = ("checkpoints", "csv", "tensorboard", "wandb", "metrics.json", "error.txt")


def move_previous_run(output_dir: Path) -> Path | None:
    """Move what an earlier run left in ``output_dir`` to previous/<time>/; return where, if any."""
    leftovers = [output_dir / n for n in RUN_OUTPUTS if (output_dir / n).exists()]
    if not leftovers:
        return None
    target = output_dir / "previous" / time.strftime("%Y-%m-%d_%H-%M-%S")
    target.mkdir(parents=True)
    for path in leftovers:
        shutil.move(path, target / path.name)
    return target
