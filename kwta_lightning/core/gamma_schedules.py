"""Schedules of gamma: the epoch about to start (0-based) -> the k-WTA layers' gamma.

:class:`~kwta_lightning.core.callbacks.SparsityAnnealing` calls one at each epoch's start;
being functions of the epoch, they continue where they were in a resumed run.
"""

import math
from dataclasses import dataclass
from typing import Protocol

from kwta_lightning.core.activations import check_gamma
from kwta_lightning.errors import ConfigError


class GammaSchedule(Protocol):
    def __call__(self, epoch: int) -> float: ...


def _check_epochs(epochs: int, name: str = "epochs") -> None:
    if epochs < 1:
        raise ConfigError(f"sparsity schedule: {name} must be >= 1, got {epochs}")


@dataclass(frozen=True)
class LinearGamma:
    """gamma_start at epoch 0, linearly to gamma_end at epoch ``epochs``, then constant."""

    gamma_start: float
    gamma_end: float
    epochs: int

    def __post_init__(self) -> None:
        check_gamma(self.gamma_start), check_gamma(self.gamma_end), _check_epochs(self.epochs)

    def __call__(self, epoch: int) -> float:
        t = min(epoch / self.epochs, 1.0)
        return self.gamma_start + t * (self.gamma_end - self.gamma_start)


@dataclass(frozen=True)
class StepGamma:
    """gamma_start to gamma_end in ``steps`` equal steps, evenly spaced over ``epochs`` epochs.

    StepGamma(0.2, 0.1, epochs=4, steps=2): 0.2, 0.2, 0.15, 0.15, 0.1, 0.1, ...
    """

    gamma_start: float
    gamma_end: float
    epochs: int
    steps: int = 1

    def __post_init__(self) -> None:
        check_gamma(self.gamma_start), check_gamma(self.gamma_end)
        _check_epochs(self.epochs), _check_epochs(self.steps, "steps")

    def __call__(self, epoch: int) -> float:
        done = min(math.floor(epoch * self.steps / self.epochs), self.steps)
        return self.gamma_start + done / self.steps * (self.gamma_end - self.gamma_start)


@dataclass(frozen=True)
class MilestoneGamma:
    """``[[epoch, gamma], ...]``: each gamma holds from its epoch on; the first epoch is 0."""

    milestones: list[list[float]]

    def __post_init__(self) -> None:
        pairs = [tuple(m) for m in self.milestones]
        epochs = [e for e, _ in pairs]
        if (
            not pairs
            or any(len(p) != 2 for p in pairs)
            or epochs[0] != 0
            or epochs != sorted(epochs)
        ):
            raise ConfigError(
                f"sparsity milestones must be [[epoch, gamma], ...] with increasing epochs "
                f"starting at 0, got {self.milestones}"
            )
        for _, gamma in pairs:
            check_gamma(gamma)

    def __call__(self, epoch: int) -> float:
        return [g for e, g in self.milestones if e <= epoch][-1]


@dataclass(frozen=True)
class PaperGamma:
    """The paper's rule: gamma_start, minus ``delta`` every ``every_n_epochs``, floored."""

    gamma_start: float
    delta: float
    every_n_epochs: int
    floor: float

    def __post_init__(self) -> None:
        check_gamma(self.gamma_start), check_gamma(self.floor)
        _check_epochs(self.every_n_epochs, "every_n_epochs")
        if self.delta <= 0:
            raise ConfigError(f"sparsity schedule: delta must be > 0, got {self.delta}")

    def __call__(self, epoch: int) -> float:
        return max(self.floor, self.gamma_start - self.delta * (epoch // self.every_n_epochs))
