"""MoCo-v2 with non-semantic negatives (seed 004).

MoCo: He, Fan, Wu, Xie & Girshick, CVPR 2020; MoCo v2: Chen, Fan, Girshick & He, arXiv:2003.04297;
non-semantic negatives: Ge, Mishra, Li, Wang & Jacobs, "Robust Contrastive Learning
Using Negative Samples with Diminished Semantics", NeurIPS 2021, arXiv:2110.14189. The authors' code is
songweige/Contrastive-Learning-with-Non-Semantic-Negatives (``moco/builder.py``, ``moco/loader.py``).

With ``n(.)`` the L2 normalisation, query encoder ``f_q`` (encoder + head), momentum key encoder
``f_k``, the queue ``Q`` ``(d, K)`` of past keys and ``n_t`` non-semantic negatives ``t_m`` of each query:

    q = n(f_q(x_q)),  k = n(f_k(x_k)),  t_m = n(f_k(x_t^m))
    logits = [q.k, q.Q_1, ..., q.Q_K, alpha q.t_1, ..., alpha q.t_n] / T,   L = CE(logits, 0)

(``builder.py:116-171``). ``alpha`` multiplies before the division by ``T``; each query sees only its
own ``t``; the ``t`` never enter the queue. ``alpha = 0`` is not plain MoCo (the ``t`` columns are
still in the softmax at logit 0); ``negatives=none`` is plain MoCo v2.

* Momentum: ``theta_k <- m theta_k + (1 - m) theta_q`` (parameters; the key encoder's BatchNorm
  keeps its own statistics), applied in ``forward`` before the keys are computed (``45-51``),
  ``m = 0.999``.
* Queue: the keys of all workers (gathered without gradient, rank order) are written at ``ptr``,
  ``ptr <- (ptr + B_global) mod K``; ``K`` must be a multiple of the global batch (``53-67``). The
  queue enters the loss as a detached copy (``159``): it is updated in place before backward. Queue
  and pointer are buffers, so a resumed run continues exactly.
* Shuffle BN (``69-114``), separately for ``k`` and each ``t_m``: the global batch of inputs is
  gathered, permuted, each worker encodes its shard, the outputs are gathered and unshuffled. The
  authors broadcast rank 0's ``randperm``; here the permutation comes from a generator seeded by
  ``(train.seed, step, call)`` (:func:`shuffle_permutation`), identical on every rank without a
  broadcast. Each worker encodes in ``shuffle_groups`` BatchNorm groups (queries: contiguous chunks
  of its batch; keys: chunks of its shuffled shard), so one worker with ``G`` groups computes what
  ``G`` workers compute (the authors refuse to run on one GPU). BatchNorm must stay per worker
  (``train.sync_bn=false`` with several workers).
* Views: MoCo v2's augmentation with blur (``method.view=mocov2``, :func:`~rayrcm.data.views.mocov2_view`),
  the random horizontal flip included whatever ``data.hflip`` says: the authors' ``--aug-plus``
  pipeline always flips (``moco-non-sem-neg.py:244-256``).
* Head: MoCo v2's ``Linear(D, D) -> ReLU -> Linear(D, dim)`` (biases on), ``dim = 128``.
* Init: the authors' encoder is torchvision's ``resnet50`` (``models.__dict__[args.arch]``,
  ``moco-non-sem-neg.py:180-182``): every ``Conv2d`` ``kaiming_normal_(fan_out, relu)``, every
  BatchNorm weight 1 and bias 0, no zero-initialised residual branch (``zero_init_residual=False``).
  :func:`build` applies that init (:func:`~rayrcm.objectives.acl.authors_init`, the helper ACL uses)
  to every non-ViT encoder; it undoes timm's ``zero_init_last`` (the last BatchNorm weight of each
  residual block set to 0). The key encoder is a copy of the initialised query encoder (``builder.py:34-36``).
* Patch-based negatives (``loader.py:153-181``): from the augmented query ``x_q``, ``p ~ U{lo..hi}``
  (``16..72`` at 224 px, scaled by ``image_size / 224``), ``c = floor(S / p) + 1`` cells per side,
  cell ``(i, j)`` is the crop ``x_q[:, h:h+p, w:w+p]`` with ``h, w ~ U{0..S-1-p}``, the ``(cp)^2``
  canvas cut to ``S x S`` (:func:`patch_negatives`, built on the device; copying pixels commutes
  with normalisation).
* Texture-based negatives (``loader.py:74-137``, ``method.negatives=texture``): each photo's texture
  (``data.texture_path``, ``<split>/<wnid>/<name>.png``; :mod:`rayrcm.data.texture`) is a third view,
  augmented with the query's random draws (the authors re-seed before the query and again before the
  texture, ``128-136``); ``t = n(f_k(x_t))`` with shuffle BN, one per query (the authors assert
  ``--num-nonsem 1``, ``moco-non-sem-neg.py:271``).
* The query encoder is exported.

Worked example (``q = k = e1``, ``Q = [e2, e3]``, ``t = q``, ``T = 1``, ``alpha = 2``):
``logits = [1, 0, 0, 2]``, ``L = ln(e + 2 + e^2) - 1 = 1.493812``.

Shapes: ``views = [x_q, x_k]`` (texture negatives: ``[x_q, x_k, x_t]``), each ``(B, 3, H, W)`` in
[0, 1]; labels are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from rayrcm.data.views import TEXTURE_VIEW
from rayrcm.errors import ConfigError
from rayrcm.models import Encoder, Normalize, build_encoder, ema_update, make_frozen_copy
from rayrcm.models.encoders import ViTEncoder
from rayrcm.objectives.acl import authors_init
from rayrcm.objectives.base import LossOutput, MethodConfig, Objective
from rayrcm.objectives.contrastive import gather_keys
from rayrcm.sections import AUGMENTATIONS

if TYPE_CHECKING:
    from rayrcm.sections import Experiment

NEGATIVES = ("none", "patch", "texture")
VIEWS = (*AUGMENTATIONS, "mocov2", "stablerep")


class MoCoV2Head(nn.Module):
    """MoCo v2's MLP head: ``Linear(D, D) -> ReLU -> Linear(D, dim)`` (``mlp=False``: MoCo v1's ``Linear(D, dim)``)."""

    def __init__(self, in_dim: int, out_dim: int = 128, *, mlp: bool = True) -> None:
        super().__init__()
        fc = nn.Linear(in_dim, out_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), fc) if mlp else nn.Sequential(fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.net(x))


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, ts: Sequence[torch.Tensor] = (),
                alpha: float = 1.0, temperature: float = 0.2) -> torch.Tensor:
    """``[q.k, q.Q, alpha q.t_1, ..., alpha q.t_n] / T`` of normalised ``(B, d)`` queries, keys and
    negatives ``t_m`` (row ``i`` is query ``i``'s own) and the ``(d, K)`` queue: ``(B, 1 + K + n)``."""
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue
    l_t = [alpha * (q * t).sum(1, keepdim=True) for t in ts]
    return torch.cat([l_pos, l_neg, *l_t], dim=1) / temperature


def moco_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against column 0 (the positive key)."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def shuffle_permutation(seed: int, step: int, call: int, n: int) -> torch.Tensor:
    """The shuffle-BN permutation of a global batch of ``n`` at ``step`` (``call``: 0 for the keys,
    ``1 + m`` for the ``m``-th non-semantic negatives): a pure function of its arguments, so every
    worker draws the same one without a broadcast. Undo it with ``out[perm] = shuffled``."""
    g = torch.Generator().manual_seed((seed * 998_244_353 + step * 1_000_003 + call * 7_919 + 0x5F1E) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def patch_bounds(image_size: int, patch_min: int = 16, patch_max: int = 72) -> tuple[int, int]:
    """The patch side range ``(lo, hi)`` at ``image_size``: the authors' 224 px range scaled by
    ``image_size / 224``, at least 1 and below the image side."""
    lo = max(1, round(patch_min * image_size / 224))
    hi = min(max(lo, round(patch_max * image_size / 224)), image_size - 1)
    return min(lo, hi), hi


def patch_negatives(x: torch.Tensor, lo: int, hi: int, *, params: bool = False) -> Any:
    """Patch-based non-semantic negatives of images ``x`` ``(B, C, H, W)``, on ``x``'s device and from
    the global RNG (see the module docstring): per image a side ``p ~ U{lo..hi}``, cells
    ``(i, j)`` of side ``p`` each an independent crop ``x[:, h_ij:h_ij+p, w_ij:w_ij+p]`` with
    ``h_ij ~ U{0..H-1-p}``, ``w_ij ~ U{0..W-1-p}``; the canvas cut to ``H x W``. ``params=True``
    also returns ``(p, h, w)``: ``(B,)`` and ``(B, rows, cols)`` (cell grid)."""
    b, _, height, width = x.shape
    if not 1 <= lo <= hi < min(height, width):
        raise ValueError(f"patch sides {lo}..{hi} must lie in [1, {min(height, width) - 1}]")
    dev = x.device
    p = torch.randint(lo, hi + 1, (b,), device=dev)
    rows, cols = height // lo + 1, width // lo + 1
    h = (torch.rand(b, rows, cols, device=dev) * (height - p).view(b, 1, 1)).long()
    w = (torch.rand(b, rows, cols, device=dev) * (width - p).view(b, 1, 1)).long()
    ys, xs = torch.arange(height, device=dev), torch.arange(width, device=dev)
    cy, oy = ys[None] // p[:, None], ys[None] % p[:, None]  # (B, H): cell row, offset in the cell
    cx, ox = xs[None] // p[:, None], xs[None] % p[:, None]  # (B, W)
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    src_y = h[bi, cy[:, :, None], cx[:, None, :]] + oy[:, :, None]  # (B, H, W)
    src_x = w[bi, cy[:, :, None], cx[:, None, :]] + ox[:, None, :]
    out = x[bi, :, src_y, src_x].permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)
    return (out, p, h, w) if params else out


@dataclass(frozen=True)
class MoCoConfig(MethodConfig):
    name: str = "moco"
    temperature: float = 0.2  # --moco-t
    queue_size: int = 16384  # --moco-k (K)
    momentum: float = 0.999  # --moco-m
    dim: int = 128  # --moco-dim
    mlp: bool = True  # MoCo v2's MLP head
    negatives: str = "none"  # none | patch | texture (data.texture_path: a texture per photo)
    alpha: float = 2.0  # weight of the non-semantic negatives' logits
    n_negatives: int = 1  # non-semantic negatives per query (the seed's commands: 1)
    patch_min: int = 16  # patch side range at 224 px (--patch-ratio 16 72), scaled with the image size
    patch_max: int = 72
    shuffle_groups: int = 0  # BatchNorm groups per worker; 0: 1 with several workers, 2 with one
    monitor: bool = False  # negatives=none: log the mean q.t of patch negatives anyway (a diagnostic pass)
    view: str = "mocov2"  # the augmentation of both views ("": data.augmentation)

    def views(self, augmentation: str) -> tuple[str, ...]:
        view = self.view or augmentation
        return (view, view, view + TEXTURE_VIEW) if self.negatives == "texture" else (view, view)

    def groups(self, world: int) -> int:
        return self.shuffle_groups or (1 if world > 1 else 2)

    def validate(self, cfg: Experiment) -> None:
        if self.temperature <= 0:
            raise ConfigError("method.temperature", self.temperature, "must be > 0")
        if self.view and self.view not in VIEWS:
            raise ConfigError("method.view", self.view,
                              f"choose one of: {', '.join(VIEWS)} (or '' for data.augmentation)")
        batch = cfg.data.batch_size
        if self.queue_size < 1 or self.queue_size % batch:
            raise ConfigError("method.queue_size", self.queue_size,
                              f"must be a multiple of the global batch data.batch_size={batch}")
        if not 0 <= self.momentum <= 1:
            raise ConfigError("method.momentum", self.momentum, "must be in [0, 1]")
        if self.dim < 1:
            raise ConfigError("method.dim", self.dim, "must be >= 1")
        if self.negatives not in NEGATIVES:
            raise ConfigError("method.negatives", self.negatives, f"choose one of: {', '.join(NEGATIVES)}")
        if self.alpha < 0:
            raise ConfigError("method.alpha", self.alpha, "must be >= 0")
        if self.n_negatives < 1:
            raise ConfigError("method.n_negatives", self.n_negatives, "must be >= 1")
        if self.negatives == "texture":
            self._validate_texture(cfg)
        if not 1 <= self.patch_min <= self.patch_max:
            raise ConfigError("method.patch_min", self.patch_min, f"need 1 <= patch_min <= patch_max={self.patch_max}")
        if self.shuffle_groups < 0:
            raise ConfigError("method.shuffle_groups", self.shuffle_groups, "must be >= 0 (0 = automatic)")
        workers = max(cfg.train.workers, 1)
        groups = self.groups(workers)
        if (batch // workers) % groups:
            raise ConfigError("method.shuffle_groups", self.shuffle_groups,
                              f"the per-worker batch {batch // workers} must split into {groups} BatchNorm groups")
        if workers > 1 and cfg.train.sync_bn:
            raise ConfigError("train.sync_bn", True,
                              "moco uses shuffle BN (per-worker BatchNorm): set train.sync_bn=false")


    def _validate_texture(self, cfg: Experiment) -> None:
        if self.n_negatives != 1:
            raise ConfigError("method.n_negatives", self.n_negatives,
                              "texture negatives are one per query (the seed asserts --num-nonsem 1)")
        if cfg.data.name != "imagefolder":
            raise ConfigError("data.name", cfg.data.name,
                              "texture negatives pair image files: use data.name=imagefolder")
        if not cfg.data.texture_path:
            raise ConfigError("data.texture_path", cfg.data.texture_path, "method.negatives=texture needs the "
                              "texture tree: <split>/<wnid>/<name>.png for each photo <split>/<wnid>/<name>.<ext>")


def _world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class MoCoObjective(Objective):
    """Query encoder + head, their momentum copies, the key queue and the non-semantic negatives."""

    queue: torch.Tensor  # buffers: the (dim, queue_size) keys and the write pointer
    queue_ptr: torch.Tensor

    def __init__(self, cfg: MoCoConfig, encoder: Encoder, image_size: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.patch_range = patch_bounds(image_size, cfg.patch_min, cfg.patch_max)
        self.normalize = Normalize()
        self.encoder = encoder
        self.head = MoCoV2Head(encoder.num_features, cfg.dim, mlp=cfg.mlp)
        self.key_encoder = cast(Encoder, make_frozen_copy(encoder))
        self.key_head = make_frozen_copy(self.head)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _encode(self, encoder: Encoder, head: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
        """``head(encoder(x))`` in ``groups`` contiguous BatchNorm groups."""
        if x.shape[0] % groups:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {groups} shuffle-BN groups")
        return torch.cat([head(encoder.forward_features(self.normalize(c))) for c in x.chunk(groups)])

    @torch.no_grad()
    def key_features(self, x: torch.Tensor, step: int, call: int) -> torch.Tensor:
        """``n(f_k(x))`` with shuffle BN: gather, permute, encode this rank's shard in groups, gather, unshuffle."""
        world, rank = _world_rank()
        x_all, offset = gather_keys(x.detach())
        b = x.shape[0]
        perm = shuffle_permutation(self.seed, step, call, x_all.shape[0]).to(x.device)
        shard = x_all[perm[rank * b:(rank + 1) * b]]
        out = self._encode(self.key_encoder, self.key_head, shard, self.cfg.groups(world))
        out_all, _ = gather_keys(out.contiguous())
        restored = torch.empty_like(out_all)
        restored[perm] = out_all
        return F.normalize(restored[offset:offset + b].float(), dim=1)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q`` for encoder and head (parameters only)."""
        ema_update(self.key_encoder, self.encoder, self.cfg.momentum, copy_buffers=False)
        ema_update(self.key_head, self.head, self.cfg.momentum, copy_buffers=False)

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Write the keys of all workers (rank order) at the pointer and advance it by the global batch."""
        keys, _ = gather_keys(k.detach())
        size, n = self.queue.shape[1], keys.shape[0]
        if size % n:
            raise ValueError(f"queue of {size} keys is not a multiple of the global batch {n}")
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + n] = keys.T.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)

    def patch_features(self, xq: torch.Tensor, step: int) -> list[torch.Tensor]:
        """The normalised key-encoder features of each query's patch-based negatives."""
        lo, hi = self.patch_range
        return [self.key_features(patch_negatives(xq, lo, hi), step, 1 + m) for m in range(self.cfg.n_negatives)]

    def negatives(self, views: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The normalised key-encoder features ``t_m`` of the non-semantic negatives (none: ``[]``)."""
        if self.cfg.negatives == "patch":
            return self.patch_features(views[0], step)
        if self.cfg.negatives == "texture":
            if len(views) < 3:
                raise ValueError("texture negatives need a third view (the texture): method.views gives it")
            return [self.key_features(views[2], step, 1)]
        return []

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        cfg = self.cfg
        xq, xk = views[0], views[1]
        world, _ = _world_rank()
        q = F.normalize(self._encode(self.encoder, self.head, xq, cfg.groups(world)).float(), dim=1)
        if self.training:
            self.momentum_update()  # before the keys, as MoCo
        k = self.key_features(xk, step, 0)
        ts = self.negatives(views, step)
        logits = moco_logits(q, k, self.queue.clone().detach(), ts, cfg.alpha, cfg.temperature)
        loss = moco_loss(logits)
        with torch.no_grad():
            metrics = {"pos_logit": (q * k).sum(1).mean(), "queue_logit": (q @ self.queue).mean(),
                       "accuracy": (logits.argmax(1) == 0).float().mean()}
            if cfg.negatives == "none" and cfg.monitor:
                ts = self.patch_features(xq, step)
            if ts:
                metrics["nonsem_logit"] = torch.stack([(q * t).sum(1).mean() for t in ts]).mean()
        if self.training:
            self.enqueue(k)
        return LossOutput(loss, {name: v.detach() for name, v in metrics.items()})

    def export(self) -> nn.Module:
        return self.encoder


def build(cfg: Experiment, num_classes: int) -> MoCoObjective:
    encoder = build_encoder(cfg.model, cfg.data.image_size)
    if not isinstance(encoder, ViTEncoder):
        authors_init(encoder)  # torchvision's ResNet init: timm's zero-initialised last BatchNorms back to 1
    return MoCoObjective(cfg.method, encoder, cfg.data.image_size, seed=cfg.train.seed)


__all__ = ["MoCoConfig", "MoCoObjective", "MoCoV2Head", "build", "moco_logits", "moco_loss", "patch_bounds",
           "patch_negatives", "shuffle_permutation"]
