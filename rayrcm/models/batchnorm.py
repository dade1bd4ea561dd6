"""BatchNorm over the global batch of a multi-worker job.

The methods' authors compute BatchNorm statistics over the whole batch: SyncBatchNorm across
GPUs (RCM) or one GPU holding all 512 images (ACL, AIR, RCS). With ``W`` data-parallel workers
each BatchNorm would otherwise see ``B / W`` images. :func:`sync_batchnorm` converts a network:

* on CUDA devices, to PyTorch's :class:`torch.nn.SyncBatchNorm`;
* on CPU workers (gloo), where ``SyncBatchNorm`` refuses to run, to :class:`AllReduceBatchNorm`:
  the batch mean and variance are summed over workers with the differentiable
  ``torch.distributed.nn.functional.all_reduce``. Its backward sums the incoming gradients over
  workers, so each worker's input gradient is that of the sum of all workers' losses; averaged
  over workers by DDP, the parameter gradients are those of BatchNorm over the concatenated batch
  (checked against one process on the concatenated batch in the tests).

Statistics (two passes, as numerically stable as one-process BatchNorm):
``mean = sum_w sum_i x / N``, ``var = sum_w sum_i (x - mean)^2 / N`` (biased, used to normalize),
running variance updated with ``var * N / (N - 1)``, all as ``nn.BatchNorm`` does. State-dict keys
are the plain BatchNorm's, so checkpoints load into either.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over workers (its backward sums the gradients over workers)."""
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a private module without this autograd rule
        warnings.simplefilter("ignore", FutureWarning)
        return cast(torch.Tensor, all_reduce(t))


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any input rank ``(N, C, ...)``) whose training statistics span every worker."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        import torch.distributed as dist

        use_batch = self.training or not self.track_running_stats
        if not (use_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local_n = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=torch.float32, device=x.device)
        sums = _all_reduce(torch.cat([xf.sum(dims), local_n]))
        n = sums[-1]
        mean = sums[:-1] / n
        centered = xf - mean.view(shape)
        var = _all_reduce((centered * centered).sum(dims)) / n
        if self.training and self.track_running_stats:
            with torch.no_grad():
                assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def _convert(module: nn.Module, make: type[nn.modules.batchnorm._BatchNorm]) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, make):
        new = make(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = _convert(child, make)
        if converted is not child:
            setattr(module, name, converted)
    return module


def sync_batchnorm(module: nn.Module, device: torch.device | str, world: int) -> nn.Module:
    """``module`` with every BatchNorm computing statistics over all ``world`` workers (in place
    where possible; returns the module to use). One worker: unchanged."""
    if world <= 1:
        return module
    if torch.device(device).type == "cuda":
        return cast(nn.Module, nn.SyncBatchNorm.convert_sync_batchnorm(module))
    return _convert(module, AllReduceBatchNorm)


__all__ = ["AllReduceBatchNorm", "sync_batchnorm"]
