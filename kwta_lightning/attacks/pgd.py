"""L-inf PGD with a decaying step and restarts, on true or estimated gradients.

Written here because foolbox's and torchattacks' PGD take one fixed step for every iteration and
have no restarts: a step that starts large (a quarter of eps) and halves late in the run finds
adversarial inputs that a fixed eps/30 step misses, on smooth models as on k-WTA ones. The same
loop serves every PGD of the suite: white-box (``PGD``), on a BPDA copy of the model, and on
gradients estimated from the loss alone (``NESPGD`` in ``adaptive``).
"""

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kwta_lightning.attacks.base import Attack, AttackOutput, check_choice, margin_loss, project
from kwta_lightning.errors import ConfigError

log = logging.getLogger(__name__)

LOSSES = ("ce", "margin")


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return margin_loss(logits, y)


class PGD(Attack):
    """Sign steps of ``rel_stepsize * eps``, halved at each fraction of ``steps`` in ``decay_at``.

    Every restart starts uniformly in the eps ball and runs only on the inputs that no earlier
    restart fooled; an input counts as fooled at the first iterate the model misclassifies, and
    that iterate is kept.
    """

    def __init__(
        self,
        steps: int = 100,
        restarts: int = 1,
        rel_stepsize: float = 0.25,
        decay_at: Sequence[float] = (0.5, 0.75),
        loss: str = "ce",
        random_start: bool = True,
        momentum: float = 0.0,
        seed: int = 0,
        norm: str = "linf",
        kind: str = "gradient",
        name: str = "",
    ) -> None:
        super().__init__(norm, kind, name)
        if norm != "linf":
            raise ConfigError(f"attack {name}: this PGD is L-inf only; use l2_pgd for L2")
        if steps < 1 or restarts < 1:
            raise ConfigError(
                f"attack {name}: steps and restarts must be >= 1, got {steps} and {restarts}"
            )
        if not 0 < rel_stepsize <= 1:
            raise ConfigError(f"attack {name}: rel_stepsize must lie in (0, 1], got {rel_stepsize}")
        check_choice(name, "loss", loss, LOSSES)
        self.steps, self.restarts, self.rel_stepsize = steps, restarts, rel_stepsize
        self.decay_at, self.loss = sorted(decay_at), loss
        self.random_start, self.momentum, self.seed = random_start, momentum, seed

    def passes(self) -> float:
        return self.steps * self.restarts

    def phase(self, step: int) -> int:
        """How many decay points iteration ``step`` has passed (0 before the first)."""
        return sum(step >= fraction * self.steps for fraction in self.decay_at)

    def step_size(self, step: int, eps: float) -> float:
        """The step at iteration ``step``: halved once for every decay point already passed."""
        return self.rel_stepsize * eps * 0.5 ** self.phase(step)

    def gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input gradient of the summed loss and the predictions at x, from one forward
        pass (``NESPGD`` estimates the gradient instead)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            (grad,) = torch.autograd.grad(per_sample_loss(logits, y, self.loss).sum(), x)
        return grad, logits.argmax(1)

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        x_best = x.clone()
        if eps == 0:
            return AttackOutput(x_best)
        self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        todo = torch.arange(len(x), device=x.device)
        with torch.no_grad():
            todo = todo[model(x).argmax(1) == y]
        for restart in range(self.restarts):
            if len(todo) == 0:
                break
            self.progress = f"{self.name} eps={eps:g} restart {restart + 1}/{self.restarts}"
            x_adv, fooled = self._single_run(model, x[todo], y[todo], eps)
            x_best[todo[fooled]] = x_adv[fooled]
            todo = todo[~fooled]
        return AttackOutput(x_best)

    def _single_run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One run from a random start: the kept iterates and which inputs they fool."""
        x_adv = x.clone()
        if self.random_start:
            noise = torch.rand(x.shape, generator=self.generator, device=x.device)
            x_adv = project(x + (2 * noise - 1) * eps, x, eps, "linf")
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        active = torch.arange(len(x), device=x.device)
        velocity = torch.zeros_like(x)
        quarters = {self.steps * q // 4 for q in (1, 2, 3)}
        for step in range(self.steps):
            if step in quarters:  # long runs on one batch show life in the log
                log.info(
                    "%s: step %d/%d, %d/%d inputs not yet fooled",
                    self.progress,
                    step,
                    self.steps,
                    len(active),
                    len(x),
                )
            grad, preds = self.gradient(model, x_adv[active], y[active], step)
            wrong = preds != y[active]
            fooled[active[wrong]] = True
            active, grad = active[~wrong], grad[~wrong]
            if len(active) == 0:
                return x_adv, fooled
            if self.momentum:  # MI-FGSM's accumulation of L1-normalised gradients
                scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12)
                grad = self.momentum * velocity[active] + grad / scale.view(
                    -1, *[1] * (x.dim() - 1)
                )
                velocity[active] = grad
            moved = x_adv[active] + self.step_size(step, eps) * grad.sign()
            x_adv[active] = project(moved, x[active], eps, "linf")
        with torch.no_grad():
            fooled[active] = model(x_adv[active]).argmax(1) != y[active]
        return x_adv, fooled
