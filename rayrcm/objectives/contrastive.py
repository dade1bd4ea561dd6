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
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated in favour of a private module without this autograd rule
            warnings.simplefilter("ignore", FutureWarning)
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


def nt_xent(zi: torch.Tensor, zj: torch.Tensor, temperature: float = 0.5, *, gather: bool = False) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., ICML 2020) of a batch of positive pairs ``(zi_k, zj_k)``, ``(B, D)`` each.

    Over the ``2B`` views ``u``, with ``pos(u)`` the other view of the same image:

        loss = mean_u -log( exp(cos(u, pos(u)) / t) / sum_{v != u} exp(cos(u, v) / t) )

    i.e. each view has one positive and ``2B - 2`` negatives (both views of every other image),
    exactly the ``CL`` loss of the ACL/AIR authors' code (seed 001). With ``gather=True`` and a
    process group, the views of all workers are negatives too (the loss of the global batch, as
    the authors' single-process ``DataParallel`` computes it).

    Example: ``B`` orthogonal unit pairs with ``zi = zj`` and ``t = 1`` give
    ``-log(e / (e + 2B - 2))``.
    """
    if zi.shape != zj.shape or zi.ndim != 2:
        raise ValueError(f"zi {tuple(zi.shape)} and zj {tuple(zj.shape)} must both be (B, D)")
    b = zi.shape[0]
    local = F.normalize(torch.cat([zi, zj]).float(), dim=1)  # (2B, D): rows 0..B-1 view i, B..2B-1 view j
    if gather:
        zi_all, offset = gather_keys(F.normalize(zi.float(), dim=1))
        zj_all, _ = gather_keys(F.normalize(zj.float(), dim=1))
    else:
        zi_all, zj_all, offset = local[:b], local[b:], 0
    n = zi_all.shape[0]
    keys = torch.cat([zi_all, zj_all])  # (2N, D), global
    logits = local @ keys.T / temperature
    rows = torch.arange(2 * b, device=zi.device)
    own = torch.where(rows < b, rows + offset, rows - b + n + offset)  # each view's own column
    pos = torch.where(rows < b, rows + offset + n, rows - b + offset)  # its pair's column
    logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter_(1, own[:, None], True), float("-inf"))
    return F.cross_entropy(logits, pos)
