"""The k-WTA paper's two pixel black-box attacks, foolbox 1's ``SinglePixelAttack`` and
``LocalSearchAttack`` (Narodytska and Kasiviswanathan 2017), bounded to an L-inf eps ball.

Both query the model's output only. Foolbox 1 let them change pixels arbitrarily (the paper judged
their results by their L-inf distance afterwards); here every image they return, and every image
the local search checks, lies within eps of the input and in [0, 1], so at eps >= 1 they are
foolbox 1's attacks. Inputs the model already misclassifies are returned as they are; inputs no
search fools come back unchanged.
"""

import torch
from torch import nn

from kwta_lightning.attacks.base import Attack, AttackOutput, project
from kwta_lightning.errors import ConfigError

# Written by hand: foolbox 3 dropped both attacks, advertorch's ports (0.2.3) do not import with
# torch >= 1.9, and torchattacks' OnePixel and ART's PixelAttack are a different attack (Su et
# al.'s differential evolution); this follows foolbox 1's code, batched over inputs.


def _predicts(model: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits of ``x`` in chunks of ``chunk`` images, without gradients."""
    with torch.no_grad():
        return torch.cat([model(part) for part in x.split(chunk)])


class SinglePixel(Attack):
    """Foolbox 1's single-pixel attack: in a random order, at most ``max_pixels`` pixels, each set
    in every channel to the low then the high end of [x - eps, x + eps] and [0, 1] (at eps >= 1:
    to 0 then 1, foolbox's min and max), until one such image is misclassified.

    ``chunk``: candidate images per forward pass (speed and memory only: the first misclassified
    candidate in the search's order is returned, as if they were tried one by one).
    """

    def __init__(
        self,
        max_pixels: int = 500,
        chunk: int = 1024,
        seed: int = 0,
        norm: str = "linf",
        kind: str = "black_box",
        name: str = "",
    ) -> None:
        super().__init__(norm, kind, name)
        self.max_pixels, self.chunk, self.seed = max_pixels, chunk, seed

    def passes(self) -> float:
        """Forwards: the input, then two candidates for each of ``max_pixels`` pixels (fewer when
        the image has fewer pixels or a candidate is misclassified)."""
        return (1 + 2 * self.max_pixels) / 3

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        x_adv = x.clone()
        if eps == 0:
            return AttackOutput(x_adv)
        n, _, height, width = x.shape
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.stack([torch.randperm(height * width, generator=generator) for _ in y])
        order = order[:, : self.max_pixels].to(x.device)
        ends = torch.stack([(x - eps).clamp(0, 1), (x + eps).clamp(0, 1)])  # (2, n, c, h, w)
        active = _predicts(model, x, self.chunk).argmax(1) == y
        per_pixel = max(1, self.chunk // (2 * n))  # pixels tried per forward pass
        for start in range(0, order.shape[1], per_pixel):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            pixels = order[idx, start : start + per_pixel]  # (a, k)
            rows, cols = pixels // width, pixels % width
            k = pixels.shape[1]
            # candidates in the search's order: pixel by pixel, low end then high end
            owner = idx.repeat_interleave(2 * k)
            which = torch.arange(2, device=x.device).repeat(len(idx) * k)
            row = rows.repeat_interleave(2, dim=1).flatten()
            col = cols.repeat_interleave(2, dim=1).flatten()
            candidates = x[owner].clone()
            every = torch.arange(len(owner), device=x.device)
            candidates[every, :, row, col] = ends[which, owner, :, row, col]
            fooled = (_predicts(model, candidates, self.chunk).argmax(1) != y[owner]).view(
                len(idx), 2 * k
            )
            found = fooled.any(1)
            first = fooled.float().argmax(1)  # the first misclassified candidate of each input
            for i in found.nonzero().squeeze(1).tolist():
                x_adv[idx[i]] = candidates[i * 2 * k + first[i]]
            active[idx[found]] = False
        return AttackOutput(x_adv)


class LocalSearch(Attack):
    """Foolbox 1's local search attack (Narodytska and Kasiviswanathan 2017), bounded to the eps
    ball. Pixel values are centred to [-1/2, 1/2]. Each round: probe at most ``max_locations``
    of the current locations (at first a random 10% of the pixels, at most ``max_locations``), each
    probe the current image with that pixel set to ``p * sign(value)`` in every channel (outside
    [0, 1] for p > 1/2, as foolbox 1 queried it); the ``t`` probes with the lowest softmax
    probability of the true class pick the pixels to change: each channel ``v`` of them becomes
    ``r * v``, wrapped back into [-1/2, 1/2] (foolbox 1's cyclic perturbation), and the image is
    projected onto the eps ball and [0, 1]. It stops when that image is misclassified, else the
    next round's locations are the (2 d + 1)^2 squares around the chosen pixels; at most
    ``rounds`` rounds (foolbox 1's R).

    ``chunk``: probes per forward pass (speed and memory only).
    """

    def __init__(
        self,
        r: float = 1.5,
        p: float = 10.0,
        d: int = 5,
        t: int = 5,
        rounds: int = 150,
        max_locations: int = 128,
        chunk: int = 4096,
        seed: int = 0,
        norm: str = "linf",
        kind: str = "black_box",
        name: str = "",
    ) -> None:
        super().__init__(norm, kind, name)
        if not 0 <= r <= 2:
            raise ConfigError(f"attack {name}: r must be in [0, 2], got {r}")
        self.r, self.p, self.d, self.t = r, p, d, t
        self.rounds, self.max_locations, self.chunk, self.seed = rounds, max_locations, chunk, seed

    def passes(self) -> float:
        """Forwards: the input, then each round ``max_locations`` probes and a check (fewer when
        there are fewer locations or the image is misclassified early)."""
        return (1 + self.rounds * (self.max_locations + 1)) / 3

    def _cyclic(self, v: torch.Tensor) -> torch.Tensor:
        v = self.r * v
        return torch.where(v < -0.5, v + 1, torch.where(v > 0.5, v - 1, v))

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        x_adv = x.clone()
        if eps == 0:
            return AttackOutput(x_adv)
        n, _, height, width = x.shape
        generator = torch.Generator().manual_seed(self.seed)
        first = min(int(0.1 * height * width), self.max_locations)
        locations = [torch.randperm(height * width, generator=generator)[:first] for _ in y]
        current = x.clone()
        active = (_predicts(model, x, self.chunk).argmax(1) == y).tolist()
        for _ in range(self.rounds):
            idx = [i for i in range(n) if active[i]]
            if not idx:
                break
            probes, owner, chosen = [], [], []
            for i in idx:
                keep = torch.randperm(len(locations[i]), generator=generator)
                locations[i] = locations[i][keep[: self.max_locations]]
                at = locations[i].to(x.device)
                rows, cols = at // width, at % width
                image = current[i].expand(len(at), *current[i].shape).clone()
                centred = current[i][:, rows, cols].T - 0.5  # (k, c)
                image[torch.arange(len(at), device=x.device), :, rows, cols] = (
                    self.p * centred.sign() + 0.5
                )
                probes.append(image)
                owner += [i] * len(rows)
            probes = torch.cat(probes)
            owner = torch.tensor(owner, device=x.device)
            scores = _predicts(model, probes, self.chunk).softmax(1)
            scores = (
                scores.gather(1, y[owner][:, None])
                .squeeze(1)
                .split([len(locations[i]) for i in idx])
            )
            for i, score in zip(idx, scores, strict=True):
                best = locations[i][score.argsort()[: self.t].cpu()]
                chosen.append(best)
                rows, cols = best.to(x.device) // width, best.to(x.device) % width
                current[i][:, rows, cols] = self._cyclic(current[i][:, rows, cols] - 0.5) + 0.5
            current[idx] = project(current[idx], x[idx], eps, self.norm)
            fooled = _predicts(model, current[idx], self.chunk).argmax(1) != y[idx]
            for i, best, is_fooled in zip(idx, chosen, fooled.tolist(), strict=True):
                if is_fooled:
                    x_adv[i], active[i] = current[i], False
                    continue
                square = torch.zeros(height, width, dtype=torch.bool)
                for row, col in zip((best // width).tolist(), (best % width).tolist(), strict=True):
                    square[
                        max(0, row - self.d) : row + self.d + 1,
                        max(0, col - self.d) : col + self.d + 1,
                    ] = True
                locations[i] = square.flatten().nonzero().squeeze(1)
        return AttackOutput(x_adv)
