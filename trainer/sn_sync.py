"""Keeping the discriminator's spectral-norm state identical on every rank.

`torch.nn.utils.parametrizations.spectral_norm` keeps power-iteration vectors `_u` and `_v`
as buffers and updates them in every train-mode forward. DDP's gradient all-reduce keeps the
weights equal, but nothing forces the buffers to agree: ranks seeded differently start with
different `u`, and a forward that runs on one rank only (images, validation) moves that
rank's `u` alone.

Our rule: after start-up, after a resume, after every training step and after any
single-rank forward, `broadcast_spectral_norm(D)` copies rank 0's `u` and `v` to every rank
(one coalesced broadcast of a few KB). With weights and vectors identical, sigma = u^T W v is
identical too. DDP's own `broadcast_buffers` would do the same at the start of each DDP
forward, but the G step runs the unwrapped D (so DDP does not wait for gradients D never
gets), and the state must be equal *between* steps, where checkpoints and logs read it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def spectral_norm_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The `_u` and `_v` buffers of every spectrally normalized layer, by name."""
    return {
        name: buf
        for name, buf in model.named_buffers()
        if name.endswith("._u") or name.endswith("._v")
    }


@torch.no_grad()
def spectral_norm_sigmas(model: nn.Module) -> dict[str, Tensor]:
    """sigma = u^T W v per layer: the estimate each weight is divided by."""
    sigmas = {}
    for name, module in model.named_modules():
        parametrizations = getattr(module, "parametrizations", None)
        if parametrizations is None or "weight" not in parametrizations:
            continue
        sn = parametrizations.weight[0]
        weight = parametrizations.weight.original
        matrix = sn._reshape_weight_to_matrix(weight.float())
        sigmas[name] = torch.dot(sn._u.float(), torch.mv(matrix, sn._v.float()))
    return sigmas


@torch.no_grad()
def broadcast_spectral_norm(model: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s power-iteration vectors to every rank (no-op without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = list(spectral_norm_buffers(model).values())
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.broadcast(flat, src)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


@torch.no_grad()
def ranks_disagree(model: nn.Module) -> list[str]:
    """Names of D's weights, `u`/`v` buffers and sigmas that differ (bitwise) between ranks.

    A collective: every rank must call it. Empty on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    state = {f"param:{n}": p for n, p in model.named_parameters()}
    state |= {f"buffer:{n}": b for n, b in spectral_norm_buffers(model).items()}
    state |= {f"sigma:{n}": s.reshape(1) for n, s in spectral_norm_sigmas(model).items()}
    bad = []
    for name, tensor in state.items():
        local = tensor.detach().float().contiguous()
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            bad.append(name)
    return bad
