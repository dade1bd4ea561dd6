"""Collectives over the training job's process group, passed in rather than assumed.

``Collectives(world, device)`` wraps ``torch.distributed`` for a job of ``world`` processes and is
the identity on one process, so pure code (evaluations, coreset selection, checkpoint selection)
runs unchanged on a laptop and on many workers. Tensors are moved to ``device`` for the
collective (NCCL needs CUDA tensors) and come back on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Collectives:
    world: int = 1
    device: torch.device | str = "cpu"

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over workers (counts of evaluations)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = t.to(self.device)
        dist.all_reduce(out)
        return out.cpu()

    def gather(self, block: torch.Tensor) -> torch.Tensor:
        """Equal-sized ``(n, ...)`` blocks of every worker, concatenated in rank order."""
        if self.world == 1:
            return block
        import torch.distributed as dist

        parts = [torch.empty_like(block.to(self.device)) for _ in range(self.world)]
        dist.all_gather(parts, block.to(self.device))
        return torch.cat(parts).cpu()

    def agree(self, values: list[int]) -> list[int]:
        """Rank 0's list of ints, bit for bit, on every worker (same length everywhere)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, device=self.device)
        dist.broadcast(t, 0)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
