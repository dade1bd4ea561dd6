"""The contrastive core shared by every contrastive objective: InfoNCE with optional cross-worker negatives.

For queries ``q`` ``(B, D)`` and keys ``k`` ``(B, D)`` whose row ``i`` is the positive of query ``i``:

    loss_i = -log( exp(cos(q_i, k_i) / t) / sum_j exp(cos(q_i, k_j) / t) )

where ``j`` runs over all keys of the global batch when ``gather=True`` and a process group is
initialized (keys of the other workers are extra negatives), and over the local batch otherwise.
The mean over ``i`` is returned. (van den Oord et al. 2018; He et al. 2020; Chen et al. 2020.)

Example: with ``B`` orthogonal unit queries equal to their keys and ``t = 1``,
``loss = -log(e / (e + B - 1))``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F


def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All keys of the global batch in rank order and the offset of this rank's block.

    Gradients flow back only to the local block (through ``torch.distributed.nn`` when ``k``
    requires grad); with no process group this is ``(k, 0)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    rank = dist.get_rank()
    if k.requires_grad:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(k))
    else:
        parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, k.contiguous())
    return torch.cat(parts, dim=0), rank * k.shape[0]


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, *, gather: bool = False) -> torch.Tensor:
    """Mean InfoNCE of ``(B, D)`` queries against ``(B, D)`` positives (see the module docstring)."""
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be (B, D)")
    keys, offset = gather_keys(k) if gather else (k, 0)
    q = F.normalize(q.flatten(1).float(), dim=1)
    keys = F.normalize(keys.flatten(1).float(), dim=1)
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels)
