"""Exponential moving average of G's weights: the generator that is evaluated and exported."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema = d * ema + (1 - d) * G after every G step, with a warm-up of the decay,
    d = min(decay, (1 + n) / (10 + n)) after n updates (as in timm and many GAN codebases):
    without it, a short run would export mostly its random initial weights
    (0.999 ** 600 = 55% of them after 600 steps)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = torch.zeros((), dtype=torch.int64)  # saved with the checkpoint

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)  # normalization statistics are copied, not averaged
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {**self.model.state_dict(), "_num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.num_updates.copy_(state.pop("_num_updates"))
        self.model.load_state_dict(state)
