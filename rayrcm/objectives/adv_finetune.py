"""Fine-tuning a pretrained encoder for a downstream task: SLF, ALF and AFF (seed 001).

A linear head is appended to the pretrained encoder (``model.init_from``) and trained with labels:

* ``slf`` (standard linear fine-tuning): encoder frozen (weights and BatchNorm statistics, eval
  mode), ``L = CE(F(x), y)``.
* ``alf`` (adversarial linear fine-tuning): encoder frozen, ``L = CE(F(x~), y)`` with ``x~`` from
  PGD-10 on CE (L-inf ``eps = 8/255``, step ``2/255``, random start) against the whole classifier
  in eval mode (Madry et al., ICLR 2018).
* ``aff`` (adversarial full fine-tuning): all weights train, with TRADES (Zhang et al., ICML 2019):
  ``L = CE(F(x), y) + beta * (1/B) sum_b KL( softmax(F(x_b)) || softmax(F(x~_b)) )``,
  ``x~`` from 10 PGD steps on that KL from ``x + 0.001 N(0, I)`` (eval mode), ``beta = 6``.
  With ``dual_bn`` (the default, the authors' ``--dualBN 1`` and ``trades_loss_dual``) the encoder's
  BatchNorms are dual (:mod:`rayrcm.models.dual_bn`): the natural input ``x`` always goes through
  the ``nat`` branch (the authors' ``'normal'``) and ``x~`` through the ``adv`` branch (``'pgd'``),
  in the attack (eval mode) and in the loss (train mode). Both branches start from the pretrained
  encoder's BatchNorms (its adversarial branch). The exported and evaluated classifier is the plain
  network holding the ``adv`` branch, as the authors' ``cvt_state_dict_AFF`` with ``bnNameCnt=1``
  (:meth:`AdvFinetuneObjective.export`: a view sharing the trained weights).

The linear head starts at zero (weight and bias), as the authors' ``get_model`` sets ``fc``.

The authors' ``--mode ALL`` runs the three in sequence from the same pretrained encoder; the
recipes do the same (one run each) and print SA / PGD-20 / AA for each (:mod:`rayrcm.eval.robust`,
evaluated once at the end of training on the test split).

Shapes: ``views = [x]``, ``x`` ``(B, 3, H, W)`` in [0, 1]; ``target`` ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.attacks.budget import AttackBudget
from rayrcm.attacks.pgd import PGDConfig, pgd_ce, pgd_kl
from rayrcm.errors import ConfigError
from rayrcm.eval.robust import RobustEvalConfig
from rayrcm.models import Classifier, bn_route, branch_view, build_classifier, convert_dual_bn
from rayrcm.objectives.base import LossOutput, MethodConfig, Objective

if TYPE_CHECKING:
    from rayrcm.sections import Experiment

MODES = ("slf", "alf", "aff")


@dataclass(frozen=True)
class AdvFinetuneConfig(MethodConfig):
    export: ClassVar[str] = "classifier"
    name: str = "adv_finetune"
    mode: str = "slf"
    norm: str = "linf"
    eps: float = 8 / 255  # pixel units
    step_size: float = 2 / 255
    pgd_steps: int = 10  # ALF's PGD and TRADES' inner maximization
    beta: float = 6.0  # TRADES
    dual_bn: bool = True  # AFF: natural inputs on the nat BatchNorm branch, adversarial on adv (the authors' default)
    eval_pgd_steps: int = 20
    eval_autoattack: bool = True
    eval_aa_iters: int = 100
    eval_aa_targets: int = 9
    eval_max_images: int = 0  # 0 = the whole test split
    eval_aa_version: str = "standard"  # standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) | apgd (an upper bound)
    eval_aa_queries: int = 5000  # Square's queries in the standard version

    @property
    def budget(self) -> AttackBudget:
        """The training attack's budget (the flat ``method.norm/eps/step_size/pgd_steps`` keys)."""
        return AttackBudget(self.norm, self.eps, self.step_size, self.pgd_steps)

    def attack(self) -> PGDConfig:
        return PGDConfig.of(self.budget)

    def robust_eval(self) -> RobustEvalConfig:
        """The evaluation: the training budget with ``eval_pgd_steps`` steps, and AutoAttack."""
        return RobustEvalConfig.of(replace(self.budget, steps=self.eval_pgd_steps), autoattack=self.eval_autoattack,
                                   aa_iters=self.eval_aa_iters, aa_targets=self.eval_aa_targets,
                                   max_images=self.eval_max_images, aa_version=self.eval_aa_version,
                                   aa_queries=self.eval_aa_queries)

    def evals(self) -> tuple[str, ...]:
        return ("robust",)  # SA / PGD-20 / AA on the test split, the seed's protocol

    def validate(self, cfg: Experiment) -> None:
        if self.mode not in MODES:
            raise ConfigError("method.mode", self.mode, f"choose one of: {', '.join(MODES)} (ALL = the three in sequence, a recipe stage)")
        if self.pgd_steps < 1:
            raise ConfigError("method.pgd_steps", self.pgd_steps, "must be >= 1")
        if self.beta < 0:
            raise ConfigError("method.beta", self.beta, "must be >= 0")
        self.attack().validate("method")
        self.robust_eval().validate("method.eval")


def trades_adversary(model: nn.Module, x: torch.Tensor, cfg: PGDConfig) -> torch.Tensor:
    """TRADES' inner maximization (:func:`~rayrcm.attacks.pgd.pgd_kl`) on a (possibly dual-BN)
    ``model``: the reference output on the ``nat`` branch, the adversarial one on the ``adv`` branch
    (the authors' ``trades_loss_dual``; one branch: ``trades_loss``). Call it in eval mode."""

    def natural(xa: torch.Tensor) -> torch.Tensor:
        with bn_route(model, "nat"):
            return cast(torch.Tensor, model(xa))

    with bn_route(model, "adv"):
        return pgd_kl(model, x, cfg, natural=natural)


class AdvFinetuneObjective(Objective):
    def __init__(self, cfg: AdvFinetuneConfig, classifier: Classifier) -> None:
        super().__init__()
        self.cfg, self.classifier = cfg, classifier
        self.frozen = cfg.mode in ("slf", "alf")
        if self.frozen:
            for p in classifier.encoder.parameters():
                p.requires_grad_(False)
        if isinstance(classifier.head, nn.Linear):  # the authors' fc starts at zero
            nn.init.zeros_(classifier.head.weight)
            nn.init.zeros_(classifier.head.bias)
        self.dual = cfg.mode == "aff" and cfg.dual_bn
        if self.dual:  # both branches start from the pretrained (adversarial) BatchNorms
            convert_dual_bn(classifier.encoder)

    def train(self, mode: bool = True) -> AdvFinetuneObjective:
        super().train(mode)
        if self.frozen:  # a frozen encoder keeps its BatchNorm statistics
            self.classifier.encoder.eval()
        return self

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        x, cfg, clf = views[0], self.cfg, self.classifier
        was_training = self.training
        metrics: dict[str, torch.Tensor] = {}
        if cfg.mode == "slf":
            logits = clf(x)
            loss = F.cross_entropy(logits.float(), target)
        elif cfg.mode == "alf":  # the classifier is in eval mode anyway (frozen encoder, linear head)
            logits = clf(pgd_ce(clf, x, target, cfg.attack()))
            loss = F.cross_entropy(logits.float(), target)
        else:
            clf.eval()
            x_adv = trades_adversary(clf, x, cfg.attack())
            self.train(was_training)
            with bn_route(clf, "nat"):  # two passes, as the TRADES code (separate BN batches)
                logits = clf(x)
            with bn_route(clf, "adv"):
                logits_adv = clf(x_adv)
            natural = F.cross_entropy(logits.float(), target)
            robust = F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits.float(), 1), reduction="batchmean")
            loss = natural + cfg.beta * robust
            metrics.update(trades_natural=natural.detach(), trades_kl=robust.detach())
        metrics["train_acc"] = (logits.argmax(1) == target).float().mean().detach()
        return LossOutput(loss, metrics)

    def export(self) -> nn.Module:
        """The classifier; with dual BatchNorm, the plain classifier holding the ``adv`` branch (shared weights)."""
        return branch_view(self.classifier, "adv") if self.dual else self.classifier


def build(cfg: Experiment, num_classes: int) -> AdvFinetuneObjective:
    return AdvFinetuneObjective(cfg.method, build_classifier(cfg.model, cfg.data.image_size, num_classes))
