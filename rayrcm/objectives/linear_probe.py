"""Linear probe: linear heads on a frozen pretrained encoder (seeds 003 StableRep and 004 MoCo).

The encoder (``model.init_from``: any encoder in the registry that a pretraining method exported,
RCM, ACL, MoCo, StableRep, ...) is frozen: eval mode always (BatchNorm statistics frozen), no
gradient, its weights never change. ``H`` linear heads train in parallel on its features
``f = encoder(x)`` (the classifier's features, :mod:`rayrcm.models.classifier`)::

    logits_h = W_h BN_h(f) + b_h,        L = sum_h CE(logits_h, y),

so each head receives exactly the gradient of its own cross-entropy. ``BN_h`` is
``BatchNorm1d(d, affine=False, eps=1e-6)`` when ``method.use_bn`` (StableRep's ``--use_bn``), else
the identity; ``W_h ~ N(0, init_std^2)``, ``b_h = 0``. Head ``h`` is its own optimizer param
group with learning rate

    lr_h = base_lr_h * B / lr_batch        (B = data.batch_size, the global batch; lr_batch = 0: lr_h = base_lr_h)

and the run's schedule (timm's, ``optim.schedule``) scales every group alike. ``optim.lr`` is not
used by the heads. ``optim.name=sgd`` is plain momentum (``optim.nesterov=false``), as both
seeds' ``torch.optim.SGD``.

Before every validation (:meth:`LinearProbeObjective.on_validation`) each head's accuracy is
counted on the held-out validation split (never the test set); the best head (the first on ties)
is the selected one, and the exported network is a plain classifier, encoder plus that head with
its BatchNorm folded in (``W' = W / sqrt(var + eps)``, ``b' = b - W' mean``, exact in eval mode),
so ``rayrcm certify``/``evaluate`` load it like any classifier. With ``train.select_metric``
(``val_acc_clean``) the kept checkpoint is the best over heads and over validations, as the seeds
report the maximum over heads and epochs, but selected on the held-out split.

Protocols (``method.protocol``; each value below stays overridable):

* ``stablerep`` (Tian et al., NeurIPS 2023, ``main_linear.py``): 10 heads, base lrs
  {.001, .002, .005, .01, .02, .05, .1, .2, .3, .5}, ``lr = blr * B / 256``; in the recipe
  (:func:`recipe`): SGD momentum 0.9, wd 0, 90 epochs, per-iteration cosine to 0 without warm-up,
  batch 1024 (128 x 8 GPUs).
* ``moco`` (He et al., CVPR 2020 / Chen et al. 2020, ``main_lincls.py``, seed 004's command): one
  head, lr 10 (no batch scaling); in the recipe: SGD momentum 0.9, wd 0, batch 128, 60 epochs,
  lr x 0.1 at epochs 30, 40, 50.

Both seeds initialise the heads from N(0, 0.01) with zero bias.

Shapes: ``views = [x]``, ``x`` ``(B, 3, H, W)`` in [0, 1]; ``target`` ``(B,)`` integer labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from rayrcm.errors import ConfigError
from rayrcm.models import Classifier, build_classifier
from rayrcm.objectives.base import LossOutput, MethodConfig, Objective

if TYPE_CHECKING:
    from rayrcm.sections import Experiment, OptimConfig

STABLEREP_LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # main_linear.py:82-83
PROTOCOLS: dict[str, dict[str, Any]] = {
    "stablerep": {"base_lrs": STABLEREP_LRS, "lr_batch": 256},
    "moco": {"base_lrs": (10.0,), "lr_batch": 0},
}
# the seeds' optimizer and run length (recipe()): SGD momentum 0.9, wd 0; StableRep per-step cosine
# over 90 epochs at 1024 images per step, MoCo lr x0.1 at 30/40/50 of 60 epochs at 128 per step
PROTOCOL_RUNS: dict[str, dict[str, Any]] = {
    "stablerep": {"epochs": 90, "batch_size": 1024, "optim": {"schedule": "cosine", "warmup_steps": 0}},
    "moco": {"epochs": 60, "batch_size": 128, "optim": {"schedule": "step", "gamma": 0.1}, "milestones": (30, 40, 50)},
}


@dataclass(frozen=True)
class LinearProbeConfig(MethodConfig):
    export: ClassVar[str] = "classifier"
    child_of_source: ClassVar[bool] = True  # the run is a child of the run that logged the encoder
    name: str = "linear_probe"
    protocol: str = "stablerep"  # stablerep | moco: the defaults of base_lrs and lr_batch
    base_lrs: tuple[float, ...] = ()  # one head per value; (): the protocol's (StableRep's 10-lr grid, MoCo's 10)
    lr_batch: int = -1  # head lr = base_lr * data.batch_size / lr_batch (0: base_lr as is); -1: the protocol's (256, 0)
    use_bn: bool = False  # BatchNorm1d(affine=False, eps=1e-6) before each head (StableRep's --use_bn)
    init_std: float = 0.01  # heads' weights ~ N(0, init_std^2), bias 0

    @property
    def lrs_base(self) -> tuple[float, ...]:
        return tuple(self.base_lrs) or tuple(PROTOCOLS[self.protocol]["base_lrs"])

    @property
    def lr_reference(self) -> int:
        return self.lr_batch if self.lr_batch >= 0 else int(PROTOCOLS[self.protocol]["lr_batch"])

    def head_lrs(self, global_batch: int) -> tuple[float, ...]:
        """Each head's peak learning rate for a global batch of ``global_batch`` images."""
        scale = global_batch / self.lr_reference if self.lr_reference > 0 else 1.0
        return tuple(b * scale for b in self.lrs_base)

    def validate(self, cfg: Experiment) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError("method.protocol", self.protocol, f"choose one of: {', '.join(PROTOCOLS)}")
        if not all(math.isfinite(b) and b > 0 for b in self.lrs_base):
            raise ConfigError("method.base_lrs", self.base_lrs, "every base lr must be > 0")
        if self.lr_batch < -1:
            raise ConfigError("method.lr_batch", self.lr_batch, "must be >= 0 (0: no batch scaling), or -1 for the protocol's")
        if self.init_std < 0:
            raise ConfigError("method.init_std", self.init_std, "must be >= 0")
        if not cfg.model.init_from:
            raise ConfigError("model.init_from", cfg.model.init_from, "a linear probe needs a pretrained encoder "
                              "(a registry URI, a run id or a model.pt path)")
        if cfg.model.head_hidden_dim:
            raise ConfigError("model.head_hidden_dim", cfg.model.head_hidden_dim, "must be 0 for a linear probe (linear heads)")
        if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
            raise ConfigError("data.mixup" if cfg.data.mixup > 0 else "data.cutmix", cfg.data.mixup or cfg.data.cutmix,
                              "must be 0 for a linear probe (integer labels)")
        if len(self.lrs_base) > 1 and cfg.data.val_fraction <= 0:
            raise ConfigError("data.val_fraction", cfg.data.val_fraction,
                              f"must be > 0: the best of {len(self.lrs_base)} heads is selected on the held-out split")


def probe_head(dim: int, num_classes: int, use_bn: bool, init_std: float) -> nn.Sequential:
    """``[BatchNorm1d(dim, affine=False, eps=1e-6),] Linear(dim, num_classes)`` with ``W ~ N(0, init_std^2)``, ``b = 0``."""
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, mean=0.0, std=init_std)
    nn.init.zeros_(linear.bias)
    layers: list[nn.Module] = [nn.BatchNorm1d(dim, affine=False, eps=1e-6)] if use_bn else []
    return nn.Sequential(*layers, linear)


@torch.no_grad()
def fold_head(head: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of the single linear map equal to ``head`` in eval mode (BatchNorm folded in)."""
    linear = cast(nn.Linear, head[-1])
    w, b = linear.weight.double(), linear.bias.double()
    if len(head) > 1:
        bn = cast(nn.BatchNorm1d, head[0])
        mean, var = bn.running_mean, bn.running_var
        assert mean is not None and var is not None  # probe_head's BatchNorm tracks its running statistics
        inv = torch.rsqrt(var.double() + bn.eps)
        w = w * inv[None, :]
        b = b - w @ mean.double()
    return w.to(linear.weight.dtype), b.to(linear.bias.dtype)


class LinearProbeObjective(Objective):
    selected: torch.Tensor  # a buffer: the index of the exported head

    def __init__(self, cfg: LinearProbeConfig, classifier: Classifier, global_batch: int, optim_name: str = "sgd",
                 smoothing: float = 0.0) -> None:
        super().__init__()
        self.cfg, self.smoothing, self.optim_name = cfg, smoothing, optim_name
        self.classifier = classifier  # normalize + frozen encoder + the exported (selected, folded) head
        for p in classifier.parameters():
            p.requires_grad_(False)
        d = classifier.encoder.num_features
        self.lrs = cfg.head_lrs(global_batch)
        self.heads = nn.ModuleList(probe_head(d, classifier.num_classes, cfg.use_bn, cfg.init_std) for _ in self.lrs)
        self.register_buffer("selected", torch.zeros((), dtype=torch.long))
        self._stale = True  # the exported head is refreshed from the selected head before it is used
        self.classifier.eval()

    def train(self, mode: bool = True) -> LinearProbeObjective:
        super().train(mode)
        self.classifier.eval()  # frozen: BatchNorm statistics never move
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        clf = self.classifier
        with torch.no_grad():
            return cast(torch.Tensor, clf.norm(clf.encoder.forward_features(clf.normalize(x), final_norm=clf.final_norm)))

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits ``(B, K)`` on [0, 1] images ``x``."""
        f = self.features(x)
        return [head(f) for head in self.heads]

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        outs = self.logits(views[0])
        losses = torch.stack([F.cross_entropy(o.float(), target, label_smoothing=self.smoothing) for o in outs])
        accs = torch.stack([(o.argmax(1) == target).float().mean() for o in outs]).detach()
        # the sum: each head gets its own gradient; logged as the seeds do, the best head's numbers
        return LossOutput(losses.sum(), {"train_acc": accs.max(), "min_head_loss": losses.min().detach()})

    def on_step_end(self, step: int) -> None:
        self._stale = True

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._stale = True  # a resumed run exports the selected head of the restored heads
        return out

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """One optimizer param group per head, with that head's learning rate (see the module docstring)."""
        return [{"params": list(head.parameters()), "lr": lr, "weight_decay": optim.weight_decay}
                for head, lr in zip(self.heads, self.lrs)]

    @torch.no_grad()
    def head_counts(self, dataset: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                    batch_size: int = 256) -> torch.Tensor:
        """``[total, correct_0, ..., correct_{H-1}]`` over this worker's shard ``rank::world`` of ``dataset``."""
        was = self.training
        self.eval()
        counts = torch.zeros(1 + len(self.heads), dtype=torch.long)
        shard = Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
        for views, y in DataLoader(shard, batch_size=batch_size):
            x = (views[0] if isinstance(views, (list, tuple)) else views).to(device)
            y = y.to(device)
            counts[0] += len(y)
            for h, o in enumerate(self.logits(x)):
                counts[1 + h] += int((o.argmax(1) == y).sum())
        self.train(was)
        return counts

    def on_validation(self, val_set: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                      reduce: Callable[[torch.Tensor], torch.Tensor] = lambda c: c) -> dict[str, float]:
        """Count every head's accuracy on the validation split, select the best (first on ties)
        and export it; returns ``val_head<h>_acc`` per head and ``val_selected_head``."""
        counts = reduce(self.head_counts(val_set, device=device, rank=rank, world=world)).cpu()
        total = max(int(counts[0]), 1)
        accs = counts[1:].double() / total
        self.select(int(torch.argmax(counts[1:])))  # argmax returns the first maximum
        out = {f"val_head{h}_acc": float(a) for h, a in enumerate(accs)}
        out["val_selected_head"] = float(self.selected)
        out["val_selected_lr"] = float(self.lrs[int(self.selected)])
        return out

    @torch.no_grad()
    def select(self, h: int) -> None:
        """Make head ``h`` the exported one."""
        self.selected.fill_(h)
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        w, b = fold_head(cast(nn.Sequential, self.heads[int(self.selected)]))
        head = cast(nn.Linear, self.classifier.head)
        head.weight.copy_(w)
        head.bias.copy_(b)
        self._stale = False

    def export(self) -> nn.Module:
        """The classifier: the frozen encoder and the selected head, folded into one ``nn.Linear``."""
        if self._stale:
            self._refresh()
        return self.classifier


def build(cfg: Experiment, num_classes: int) -> LinearProbeObjective:
    clf = build_classifier(cfg.model, cfg.data.image_size, num_classes)
    return LinearProbeObjective(cfg.method, clf, cfg.data.batch_size, cfg.optim.name, cfg.data.label_smoothing)


def recipe(protocol: str, *, init_from: str, encoder: str, data: dict[str, Any] | None = None, epochs: float | None = None,
           name: str = "", experiment: str = "rayrcm", **method: Any) -> dict[str, Any]:
    """A recipe dict (for :func:`rayrcm.config.from_dict`) running ``protocol``'s linear probe as the
    seed does: its optimizer, schedule, run length and global batch, the best head kept on
    ``val_acc_clean``. ``data`` overrides the data section (``batch_size`` included), ``epochs`` the
    seed's; ``method`` sets further method keys (``use_bn=True``, ``base_lrs=...``)."""
    if protocol not in PROTOCOL_RUNS:
        raise ConfigError("method.protocol", protocol, f"choose one of: {', '.join(PROTOCOL_RUNS)}")
    run = PROTOCOL_RUNS[protocol]
    epochs = float(epochs if epochs is not None else run["epochs"])
    optim = {"name": "sgd", "momentum": 0.9, "weight_decay": 0.0, **run["optim"]}
    if "milestones" in run:
        optim["milestone_epochs"] = tuple(m * epochs / run["epochs"] for m in run["milestones"])
    return {
        "data": {"batch_size": run["batch_size"], "val_fraction": 0.1, **(data or {})},
        "model": {"encoder": encoder, "init_from": init_from},
        "method": {"name": "linear_probe", "protocol": protocol, **method},
        "optim": optim,
        "train": {"name": name, "epochs": epochs, "checkpoint_epochs": 1.0, "evals": ("noisy",), "eval_sigmas": (),
                  "select_metric": "val_acc_clean"},
        "tracking": {"experiment": experiment},
    }
