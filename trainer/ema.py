"""Exponential moving average of G's weights: the generator that is evaluated and exported."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema = d * ema + (1 - d) * G after every optimizer step, skipped ones included (G's
    weights are unchanged then), with a warm-up of the decay,
    d = min(decay, (1 + n) / (10 + n)) after n updates (as in timm and many GAN codebases):
    without it, a short run would export mostly its random initial weights
    (0.999 ** 600 = 55% of them after 600 steps)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Accelerate's prepare_model replaces the inner module's forward by an instance
        # attribute (autocast + outputs to fp32, the original kept in `_original_forward`);
        # the deepcopy carries it over, bound to the copy. The average runs in its own
        # precision (validation, images): back to the class's forward, on the copy only.
        for attribute in ("forward", "_original_forward"):
            self.model.__dict__.pop(attribute, None)
        self.num_updates = 0  # a host int: the decay needs no read of a tensor

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = self.num_updates
        decay = min(self.decay, (1 + n) / (10 + n))
        # one kernel launch per list, not one per tensor
        params = [p.detach().to(e.dtype) for e, p in zip(self.model.parameters(),
                                                         model.parameters())]
        torch._foreach_lerp_(list(self.model.parameters()), params, 1.0 - decay)
        buffers = list(self.model.buffers())
        if buffers:  # normalization statistics are copied, not averaged
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {**self.model.state_dict(),
                "_num_updates": torch.tensor(self.num_updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.num_updates = int(state.pop("_num_updates"))
        self.model.load_state_dict(state)
