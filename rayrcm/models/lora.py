"""LoRA on the q and v projections of a timm ViT (``model.lora_rank``, ``model.lora_alpha``).

FT-CADIS fine-tunes its ImageNet classifier this way (``classifier.py:84-85``: ``LoRA_ViT_timm(vit,
r=4, alpha=4)``; ``third_party/lora_vit/lora.py:324-421``, ``train_utils.py:43-62``). timm fuses
q, k and v in one ``qkv = nn.Linear(D, 3D)``; LoRA adds low-rank terms to the q and v slices only::

    qkv(x) = [W_q x + s B_q A_q x,  W_k x,  W_v x + s B_v A_v x] (+ bias),   s = alpha / r

with ``A`` ``(r, D)`` initialised as ``nn.Linear`` (kaiming-uniform, ``a = sqrt(5)``) and ``B``
``(D, r)`` zero (``lora.py:502-506``), so at initialisation the output is the base model's exactly.
:func:`apply_lora` freezes every parameter of the ViT (``requires_grad = False``) before adding
the trainable ``A`` and ``B`` of every block; the classifier's head stays trainable (the authors'
``lora_vit.head``).

Differences from the authors (docs/fidelity.md): their scale is ``alpha // r`` (integer division,
``lora.py:359-360``), which equals ``alpha / r`` for their r = alpha = 4 but is 0 for alpha < r;
rayrcm uses ``alpha / r``. :class:`LoRAQKV` is an ``nn.Linear`` that keeps the base weight and bias
under their own names (``...attn.qkv.weight``), so a state dict of the plain model (an off-the-shelf
classifier or encoder) loads into the LoRA model, leaving ``A`` and ``B`` at their initial values
when the file holds none of them. :func:`merge_lora` folds the low-rank terms into plain
``nn.Linear`` layers (``W + s [B_q A_q; 0; B_v A_v]``): the same function, to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

LORA_NAMES = ("lora_a_q", "lora_b_q", "lora_a_v", "lora_b_v")


class LoRAQKV(nn.Linear):
    """A fused ``qkv`` Linear ``(D -> 3D)`` plus ``s B_q A_q x`` on the q slice and ``s B_v A_v x`` on v."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        if base.out_features % 3:
            raise ValueError(f"a fused qkv Linear has 3 * D outputs, not {base.out_features}")
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(alpha) / int(rank)
        d_in, d = base.in_features, base.out_features // 3
        linear = partial(nn.Linear, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a_q, self.lora_b_q = linear(d_in, rank), linear(rank, d)
        self.lora_a_v, self.lora_b_v = linear(d_in, rank), linear(rank, d)
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """``A`` as ``nn.Linear`` (kaiming-uniform, ``a = sqrt(5)``), ``B = 0`` (``lora.py:502-506``)."""
        for a in (self.lora_a_q, self.lora_a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.lora_b_q, self.lora_b_v):
            nn.init.zeros_(b.weight)

    def delta_weight(self) -> torch.Tensor:
        """``s [B_q A_q; 0; B_v A_v]``, ``(3D, D_in)``: what :func:`merge_lora` adds to the weight."""
        dq = self.lora_b_q.weight @ self.lora_a_q.weight
        dv = self.lora_b_v.weight @ self.lora_a_v.weight
        return self.scaling * torch.cat([dq, torch.zeros_like(dq), dv])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.weight, self.bias).chunk(3, dim=-1)
        q = q + self.scaling * self.lora_b_q(self.lora_a_q(x))
        v = v + self.scaling * self.lora_b_v(self.lora_a_v(x))
        return torch.cat([q, k, v], dim=-1)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's function: ``W + delta_weight()``, same bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # A file of the plain model (no LoRA keys at all under this layer): load W and b, keep A and B.
        names = [f"{prefix}{n}.weight" for n in LORA_NAMES]
        if not any(n in state_dict for n in names):
            for n, module in zip(names, (self.lora_a_q, self.lora_b_q, self.lora_a_v, self.lora_b_v)):
                state_dict[n] = module.weight.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_alpha={self.alpha}"


def apply_lora(vit: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze every parameter of the timm ViT ``vit`` and wrap each block's ``attn.qkv`` in
    :class:`LoRAQKV` (q and v, all blocks, as ``LoRA_ViT_timm(lora_layer=None)``), in place."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, not {rank}")
    for p in vit.parameters():
        p.requires_grad_(False)
    for block in cast("Iterable[Any]", vit.blocks):  # timm's blocks: an nn.Sequential of Blocks with attn.qkv
        if not isinstance(block.attn.qkv, nn.Linear) or isinstance(block.attn.qkv, LoRAQKV):
            raise ValueError(f"expected a plain fused qkv nn.Linear, found {type(block.attn.qkv).__name__}")
        block.attn.qkv = LoRAQKV(block.attn.qkv, rank, alpha)
    return vit


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every :class:`LoRAQKV` in ``module`` by its merged ``nn.Linear``, in place (base weights
    stay frozen); the returned module computes the same function without LoRA layers."""
    for name, child in list(module.named_children()):
        if isinstance(child, LoRAQKV):
            merged = child.merged()
            merged.requires_grad_(False)
            setattr(module, name, merged)
        else:
            merge_lora(child)
    return module

