"""StableRep: multi-positive contrastive learning (Tian, Fan, Isola, Chang & Krishnan, NeurIPS 2023,
"StableRep: Synthetic Images from Text-to-Image Models Make Strong Visual Representation Learners",
arXiv:2306.00984; seed 003). The authors' code is google-research/syn-rep-learn (``StableRep/``):
the loss is ``MultiPosConLoss`` (``models/losses.py:49-106``), the model ``models/StableRep.py``.

A worker holds ``nB`` features ``h`` (``B`` groups x ``n`` images, view-major) with integer
pseudo-labels ``l`` (images of one group share a label; different groups never do). With
``z = h / ||h||``, ``Z = all_gather(z)`` over the workers *with* gradient and ``L`` the gathered labels,
for a local anchor ``i`` whose own global column is ``g(i) = i + rank * nB``:

    s_ij = z_i . Z_j / tau,          s_{i, g(i)} = -inf                   (self-similarity masked)
    p_ij = 1[l_i = L_j, j != g(i)] / max(1, sum_j 1[l_i = L_j, j != g(i)])  (uniform over the positives)
    loss = -(1 / nB) sum_i sum_j p_ij log softmax_j(s_i.)

``tau = 0.1``. An anchor without positives has ``p_i. = 0``: it contributes 0 but still counts in
the mean (``1 / nB``). With ``n = 2`` (one positive per anchor) this is exactly SimCLR's NT-Xent
(:func:`~rayrcm.objectives.contrastive.nt_xent`). DDP averages the workers' losses, so the
gradient is that of the global mean (the workers' losses are equal in expectation, not value).

Worked example: ``G`` groups of ``n`` identical unit vectors, groups mutually orthogonal,
``N = G n``: ``loss = ln((n - 1) e^{1/tau} + N - n) - 1/tau`` (``G, n, tau = 2, 2, 1``: 0.551445).

Groups (``method.groups``):

* ``image``: the ``n`` views of one image are one group (pseudo-labels ``arange(B) + rank * B``,
  the authors' ``main_stablerep.py:325-326``); ``n = 2`` is SimCLR.
* ``label``: the dataset's class label is the group: every image of a class in the global batch
  is a positive of every other (how the bundled digits run StableRep's "same-class groups").

Data: ``data.name=caption_groups`` (:mod:`rayrcm.data.captions`) is the authors' reader: item ``r``
is the images of CSV row ``r`` in ``n`` roots of ``data.folders`` drawn without replacement
(``dataset/data.py:74-81``), view ``k`` of image ``k``; with ``method.groups=image`` each row is its
own group, as the authors' pseudo-labels. Before each epoch :meth:`StableRepObjective.on_epoch`
hands ``(train.seed, epoch)`` to the reader, which draws each item's roots from them and its index.

Views: StableRep's augmentation (``method.view=stablerep``: RandomResizedCrop(0.08-1), jitter, grey,
blur p 0.5, flip, and the 5% downsample; :func:`~rayrcm.data.views.mocov2_view`). The random horizontal
flip is on whatever ``data.hflip`` says, as the authors' pipeline always flips (``main_stablerep.py:185-195``).

The model: the encoder, then the authors' MLP ``Linear(D, 4096)-BN-ReLU-Linear(4096, 4096)-BN-ReLU-
Linear(4096, 256)`` (``model.proj_hidden_dim`` / ``model.proj_dim``), run once per view chunk so that
each view gets its own BatchNorm statistics (``models/StableRep.py:47-57``). The encoder is exported.

Shapes: ``views = [x_1, ..., x_n]``, each ``(B, 3, H, W)`` in [0, 1]; labels ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from rayrcm.data.captions import set_dataset_epoch
from rayrcm.errors import ConfigError
from rayrcm.models import Encoder, Normalize, build_encoder
from rayrcm.objectives.base import EpochContext, EpochPlan, LossOutput, MethodConfig, Objective
from rayrcm.objectives.contrastive import gather_keys
from rayrcm.sections import AUGMENTATIONS

if TYPE_CHECKING:
    from rayrcm.sections import Experiment

GROUPS = ("image", "label")
VIEWS = (*AUGMENTATIONS, "mocov2", "stablerep")


def multi_positive_loss(h: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, *,
                        gather: bool = False) -> torch.Tensor:
    """StableRep's multi-positive contrastive loss of ``(N, D)`` features with ``(N,)`` integer labels
    (see the module docstring). ``gather=True`` with a process group: the features of all workers
    (with gradient, in rank order) and their labels are the candidates of every local anchor."""
    if h.ndim != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"features {tuple(h.shape)} must be (N, D) and labels {tuple(labels.shape)} (N,)")
    z = F.normalize(h.float(), dim=1)
    if gather:
        keys, offset = gather_keys(z)
        all_labels, _ = gather_keys(labels.detach())
    else:
        keys, offset, all_labels = z, 0, labels
    n = z.shape[0]
    own = torch.arange(n, device=z.device) + offset  # each anchor's own global column
    self_mask = torch.zeros(n, keys.shape[0], dtype=torch.bool, device=z.device).scatter_(1, own[:, None], True)
    positives = (labels[:, None] == all_labels[None, :]) & ~self_mask
    p = positives.float() / positives.sum(1, keepdim=True).clamp(min=1)
    logits = (z @ keys.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = torch.log_softmax(logits, dim=1).masked_fill(self_mask, 0.0)  # 0 * -inf would be nan
    return -(p * log_prob).sum(1).mean()


class StableRepHead(nn.Module):
    """The authors' ``image_mlp``: ``Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear`` (biases on)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.net(x))


@dataclass(frozen=True)
class StableRepConfig(MethodConfig):
    name: str = "stablerep"
    temperature: float = 0.1  # main_stablerep.py:60-61
    n_views: int = 6  # images (views) per group and item: the README's n_img 6
    groups: str = "image"  # image | label (see the module docstring)
    gather: bool = True  # candidates from all workers, with gradient (losses.py:75)
    view: str = "stablerep"  # the augmentation of every view ("": data.augmentation)

    def views(self, augmentation: str) -> tuple[str, ...]:
        return (self.view or augmentation,) * self.n_views

    def validate(self, cfg: Experiment) -> None:
        if self.temperature <= 0:
            raise ConfigError("method.temperature", self.temperature, "must be > 0")
        if self.view and self.view not in VIEWS:
            raise ConfigError("method.view", self.view,
                              f"choose one of: {', '.join(VIEWS)} (or '' for data.augmentation)")
        if self.groups not in GROUPS:
            raise ConfigError("method.groups", self.groups, f"choose one of: {', '.join(GROUPS)}")
        if self.n_views < (2 if self.groups == "image" else 1):
            raise ConfigError("method.n_views", self.n_views,
                              "must be >= 2 with method.groups=image (>= 1 with groups=label)")
        if cfg.data.name == "caption_groups":
            if self.groups != "image":
                raise ConfigError("method.groups", self.groups,
                                  "data.name=caption_groups makes each CSV row its own group: use method.groups=image")
            if self.n_views > len(cfg.data.folders):
                raise ConfigError("method.n_views", self.n_views, f"draws that many roots without replacement from "
                                  f"the {len(cfg.data.folders)} of data.folders: use at most {len(cfg.data.folders)}")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class StableRepObjective(Objective):
    """Encoder + the per-view BN MLP head + the multi-positive contrastive loss."""

    def __init__(self, cfg: StableRepConfig, encoder: Encoder, proj_hidden: int, proj_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize()
        self.encoder = encoder
        self.projector = StableRepHead(encoder.num_features, proj_hidden, proj_dim)

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        cfg, b, n = self.cfg, views[0].shape[0], len(views)
        feats = self.encoder.forward_features(self.normalize(torch.cat(views)))  # one encoder pass
        h = torch.cat([self.projector(f) for f in feats.split(b)])  # per-view BN statistics
        if cfg.groups == "image":
            group = torch.arange(b, device=h.device) + _rank() * b
        else:
            group = target.to(h.device).long()
        loss = multi_positive_loss(h, group.repeat(n), cfg.temperature, gather=cfg.gather)
        return LossOutput(loss, {"multi_pos": loss.detach()})

    def on_epoch(self, epoch: int, ctx: EpochContext) -> EpochPlan:
        """Caption groups draw each item's roots from ``(train.seed, epoch, index)``: hand them the epoch."""
        set_dataset_epoch(ctx.train_set, epoch, ctx.seed)
        return EpochPlan()

    def export(self) -> nn.Module:
        return self.encoder


def build(cfg: Experiment, num_classes: int) -> StableRepObjective:
    encoder = build_encoder(cfg.model, cfg.data.image_size)
    return StableRepObjective(cfg.method, encoder, cfg.model.proj_hidden_dim, cfg.model.proj_dim)


__all__ = ["StableRepConfig", "StableRepHead", "StableRepObjective", "build", "multi_positive_loss"]
