"""The reproduction's targeted vanilla gradient ascent (VGA).

From the k-WTA reproduction report (after CS4803/7643 problem set 2, "fooling images"): for each
class other than the true one, ascend that class's logit with steps of ``step_size`` along the
L2-normalised input gradient, at most ``steps`` times, stopping once the target is predicted.
Here every step is projected back onto the eps ball and [0, 1] so the result is a valid bounded
attack. An input is robust only if every target fails; ``targeted_success_rate`` is the share of
targets reached.
"""

import torch
from torch import nn

from kwta_lightning.attacks.base import Attack, AttackOutput, project


class VGA(Attack):
    def __init__(
        self,
        steps: int = 20,
        step_size: float = 10.0,
        norm: str = "linf",
        kind: str = "gradient",
        name: str = "",
    ) -> None:
        super().__init__(norm, kind, name)
        self.steps, self.step_size = steps, step_size

    def passes(self) -> None:
        return None  # steps for each wrong class: the count of classes comes with the model

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        x_adv, fooled = x.clone(), torch.zeros_like(y, dtype=torch.bool)
        reached = torch.zeros(len(y), device=x.device)
        for target in range(num_classes):
            candidate = self._ascend(model, x, torch.full_like(y, target), eps)
            with torch.no_grad():
                pred = model(candidate).argmax(1)
            reached += ((pred == target) & (y != target)).float()
            new = (pred != y) & ~fooled
            x_adv[new], fooled = candidate[new], fooled | new
        return AttackOutput(x_adv, {"targeted_success_rate": reached / (num_classes - 1)})

    def _ascend(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float
    ) -> torch.Tensor:
        x_adv = x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            active = logits.argmax(1) != target
            if not active.any():
                break
            (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x_adv)
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            step = self.step_size * grad / norms * active.view_as(norms)
            x_adv = project(x_adv.detach() + step, x, eps, self.norm)
        return x_adv.detach()
