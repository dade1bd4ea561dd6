"""ACL: adversarial contrastive learning (Jiang, Chen, Chen & Wang, NeurIPS 2020), with DynACL's schedule.

Seed 001 (Zhang & Xu, "Towards robust foundation models: adversarial contrastive learning",
ICLR 2024 blog) and the authors' code (github.com/GodXuxilie/Enhancing_ACL_via_AIR). With
``h = g o f`` (encoder ``f``, projector ``g``), two augmented views ``x^i, x^j`` of each image and
the SimCLR loss ``CL`` (:func:`~rayrcm.objectives.contrastive.nt_xent`, temperature ``t = 0.5``):

    L_ACL = (1 - w) * CL(h(x^i), h(x^j)) + (1 + w) * CL(h(x~^i), h(x~^j))

    (x~^i, x~^j) = argmax_{x~^u in B_eps[x^u]} CL(h(x~^i), h(x~^j))      (contrastive PGD, no labels)

* The attack is :func:`~rayrcm.attacks.pgd` on the pair (both views move together): ``T = 5``
  steps of size ``2/255`` in the L-inf ball ``eps = 8/255``, uniform random start, pixels kept in
  [0, 1], network in eval mode on the adversarial BatchNorm branch (as the authors' code).
* Dual BatchNorm (``dual_bn``, the authors' ``--ACL_DS``): natural views use the ``nat`` branch,
  adversarial views the ``adv`` branch (:mod:`rayrcm.models.dual_bn`). The exported encoder is a
  plain one holding the ``export_bn`` branch (``adv``, as the authors fine-tune from).
* ``w``: fixed ``weight`` (0 for ACL), or DynACL (Luo, Wang & Wang, ICLR 2023; ``dynamic=True``):
  augmentation strength ``s_e = 1 - floor(e / K) * K / E`` stepped down every ``K = 50`` of ``E``
  epochs, ``w_e = (2/3) * (1 - s_e)``; the ``dynaug`` view pipeline follows ``s_e``.
* ``w = -1`` leaves ``2 * CL`` on natural views (the adversarial term has weight 0): CL up to a
  constant factor. Plain CL is ``adversarial=False`` (:mod:`rayrcm.objectives.simclr`): no attack,
  no adversarial forward pass, ``L = CL(nat)``.
* AIR adds invariance regularizers through :meth:`ACLObjective.regularizer`
  (:mod:`rayrcm.objectives.air`).
* The network is the authors': the projector is their ``proj_head``
  (:class:`~rayrcm.models.ACLProjector`, ``fc-BN-ReLU-fc-BN-ReLU-fc-BN``, or ``fc-BN-ReLU-fc-BN``
  with ``two_layer_proj`` as the RCS authors' ImageNet-32 ``proj_head_module``), and the encoder is
  initialized as their ResNet / WRN (:func:`authors_init`: every convolution
  ``kaiming_normal(fan_out, relu)``, every BatchNorm weight 1 and bias 0).
* ``scale`` multiplies the whole loss: the RCS authors' scripts (``DynACL_RCS.py``,
  ``ACL_RCS.py``) train on ``L_ACL / 2``; with LARS this is not a no-op (weight decay and the
  zero-norm parameters see the halved gradient).

Shapes: ``views = [x^i, x^j]`` (``+ [x]``, the un-augmented image, for AIR), each ``(B, 3, H, W)``
in [0, 1]; labels are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from rayrcm.attacks.pgd import NORMS, PGDConfig, pgd
from rayrcm.errors import ConfigError
from rayrcm.models import (
    ACLProjector,
    Normalize,
    bn_route,
    build_encoder,
    convert_dual_bn,
    single_bn_state,
)
from rayrcm.objectives.base import EpochContext, EpochPlan, LossOutput, MethodConfig, Objective
from rayrcm.objectives.contrastive import nt_xent

if TYPE_CHECKING:
    from rayrcm.objectives.rcs_schedule import CoresetSchedule
    from rayrcm.sections import Experiment, ModelConfig


def acl_loss(cl_nat: torch.Tensor, cl_adv: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - w) * CL(nat) + (1 + w) * CL(adv)``."""
    return (1 - weight) * cl_nat + (1 + weight) * cl_adv


def dynacl_strength(epoch: int, epochs: int, period: int = 50) -> float:
    """DynACL's augmentation strength at (zero-based) ``epoch`` of ``epochs``: ``1 - floor(e/K) K / E``."""
    return 1.0 - (epoch // period) * period / max(epochs, 1)


@dataclass(frozen=True)
class ACLConfig(MethodConfig):
    name: str = "acl"
    temperature: float = 0.5
    weight: float = 0.0  # w; DynACL replaces it by dynamic_lambda * (1 - strength)
    dynamic: bool = False  # DynACL schedule
    dynamic_period: int = 50  # epochs between strength steps (K)
    dynamic_lambda: float = 2 / 3
    norm: str = "linf"
    eps: float = 8 / 255  # pixel units
    step_size: float = 2 / 255
    pgd_steps: int = 5
    random_start: bool = True
    dual_bn: bool = True
    export_bn: str = "adv"  # which BatchNorm branch the exported encoder keeps
    gather: bool = True  # negatives from all workers (the global batch, as the authors' DataParallel)
    adversarial: bool = True  # False: plain CL (SimCLR), no attack
    two_layer_proj: bool = False  # the authors' --twoLayerProj (fc-BN-ReLU-fc-BN)
    scale: float = 1.0  # loss multiplier (0.5: the RCS authors' (CL(nat) + CL(adv)) / 2)
    # RCS coreset selection (rayrcm.objectives.rcs); fraction 1 = off
    rcs_fraction: float = 1.0
    rcs_warmup_epochs: int = 100
    rcs_interval_epochs: int = 20
    rcs_unit: int = 0  # samples per selection unit (0 = the global batch, as the authors score mini-batches)
    rcs_val_images: int = 0  # unlabeled validation images for the RD loss (0 = the whole validation split)
    rcs_lr: float = 0.01  # the authors' Coreset_lr: greedy step on the fc layers (applied twice per pick, as theirs)
    rcs_pgd_steps: int = 3  # the RD attack (the authors' Coreset_pgd_iter); 0 = no attack
    rcs_eps: float = 8 / 255  # its L-inf ball (pixel units)
    rcs_step_size: float = 0.0  # its step (0 = (10/255) / rcs_pgd_steps, the authors' rule)

    def attack(self) -> PGDConfig:
        return PGDConfig(self.norm, self.eps, self.step_size, self.pgd_steps, self.random_start)

    def views(self, augmentation: str) -> tuple[str, ...]:
        return (augmentation, augmentation)

    def epoch_samples(self, epoch: int, n: int) -> int:
        """Samples trained on in ``epoch``: the coreset's after RCS's warm-up, else all ``n``."""
        from rayrcm.objectives.rcs_schedule import epoch_samples

        return epoch_samples(epoch, n, self.rcs_fraction, self.rcs_warmup_epochs)

    def validate(self, cfg: Experiment) -> None:
        if self.temperature <= 0:
            raise ConfigError("method.temperature", self.temperature, "must be > 0")
        if not -1 <= self.weight <= 1:
            raise ConfigError("method.weight", self.weight, "must be in [-1, 1] (w of (1 - w) CL(nat) + (1 + w) CL(adv))")
        if self.dynamic_period < 1:
            raise ConfigError("method.dynamic_period", self.dynamic_period, "must be >= 1 (epochs)")
        if not 0 <= self.dynamic_lambda <= 1:
            raise ConfigError("method.dynamic_lambda", self.dynamic_lambda, "must be in [0, 1]")
        if self.norm not in NORMS:
            raise ConfigError("method.norm", self.norm, f"choose one of: {', '.join(NORMS)}")
        if self.export_bn not in ("nat", "adv"):
            raise ConfigError("method.export_bn", self.export_bn, "choose one of: nat, adv")
        if self.pgd_steps < 0:
            raise ConfigError("method.pgd_steps", self.pgd_steps, "must be >= 0 (0 = no attack)")
        if self.scale <= 0:
            raise ConfigError("method.scale", self.scale, "must be > 0 (the loss multiplier)")
        self.attack().validate("method")
        if not 0 < self.rcs_fraction <= 1:
            raise ConfigError("method.rcs_fraction", self.rcs_fraction, "must be in (0, 1] (1 = no coreset)")
        for key in ("rcs_warmup_epochs", "rcs_unit", "rcs_val_images", "rcs_pgd_steps", "rcs_eps", "rcs_step_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}", getattr(self, key), "must be >= 0")
        if self.rcs_interval_epochs < 1:
            raise ConfigError("method.rcs_interval_epochs", self.rcs_interval_epochs, "must be >= 1")
        if self.rcs_lr <= 0:
            raise ConfigError("method.rcs_lr", self.rcs_lr, "must be > 0 (the greedy step; the authors' 0.01)")
        if self.rcs_fraction < 1 and cfg.data.val_fraction <= 0:
            raise ConfigError("data.val_fraction", cfg.data.val_fraction, "RCS needs an unlabeled validation split (> 0)")


@torch.no_grad()
def authors_init(module: nn.Module) -> None:
    """The ACL/AIR/RCS authors' initialization of their ResNet and WRN, in place: every ``Conv2d``
    ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` (the WRN's ``normal(0, sqrt(2 / (k^2 C_out)))``
    is the same), every BatchNorm weight 1 and bias 0. timm's ResNet differs in two ways this undoes:
    it zero-initializes the last BatchNorm weight of every residual block, and a CIFAR stem keeps
    PyTorch's default convolution init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ACLObjective(Objective):
    """Encoder + the authors' projector (both dual-BN when asked), contrastive PGD and the ACL loss."""

    def __init__(self, cfg: ACLConfig, model_cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        self.cfg, self.model_cfg, self.image_size = cfg, model_cfg, image_size
        self.normalize = Normalize()
        self.encoder = build_encoder(model_cfg, image_size)
        authors_init(self.encoder)
        self.projector = ACLProjector(self.encoder.num_features, model_cfg.proj_hidden_dim, model_cfg.proj_dim,
                                      two_layer=cfg.two_layer_proj)
        if cfg.dual_bn:
            convert_dual_bn(self.encoder)
            convert_dual_bn(self.projector)
        self.weight = cfg.weight
        self.gather = cfg.gather
        self._coresets: CoresetSchedule | None = None  # RCS's, made at the first epoch

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.projector(self.encoder.forward_features(self.normalize(x))))

    def adversarial_views(self, xi: torch.Tensor, xj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Contrastive PGD on the pair, in eval mode on the adversarial BN branch."""
        was_training = self.training
        self.eval()
        try:
            with bn_route(self, "adv"):
                xi_adv, xj_adv = pgd(lambda a, b: nt_xent(self.project(a), self.project(b), self.cfg.temperature),
                                     [xi, xj], self.cfg.attack())
        finally:
            self.train(was_training)
        return xi_adv, xj_adv

    def regularizer(self, z: dict[str, torch.Tensor], x_orig: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Extra loss terms on the projections ``z`` (keys ``i``, ``j``, ``i_adv``, ``j_adv``); none for ACL."""
        return torch.zeros((), device=z["i"].device), {}

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        xi, xj = views[0], views[1]
        cfg, b = self.cfg, views[0].shape[0]
        with bn_route(self, "nat"):
            zi, zj = self.project(torch.cat([xi, xj])).split(b)
        cl_nat = nt_xent(zi, zj, cfg.temperature, gather=self.gather)
        z = {"i": zi, "j": zj}
        metrics = {"cl_nat": cl_nat.detach(), "weight": torch.tensor(float(self.weight))}
        if not cfg.adversarial:  # plain CL
            loss = cl_nat
        else:
            xi_adv, xj_adv = self.adversarial_views(xi, xj)
            with bn_route(self, "adv"):
                z["i_adv"], z["j_adv"] = self.project(torch.cat([xi_adv, xj_adv])).split(b)
            cl_adv = nt_xent(z["i_adv"], z["j_adv"], cfg.temperature, gather=self.gather)
            loss = acl_loss(cl_nat, cl_adv, self.weight)
            metrics["cl_adv"] = cl_adv.detach()
        reg, reg_metrics = self.regularizer(z, views[2] if len(views) > 2 else None)
        metrics.update(reg_metrics)
        return LossOutput(cfg.scale * (loss + reg), metrics)

    def on_epoch(self, epoch: int, ctx: EpochContext) -> EpochPlan:
        """DynACL's strength and weight for this epoch; with RCS, the coreset it trains on."""
        plan = EpochPlan()
        if self.cfg.dynamic:
            strength = dynacl_strength(epoch, ctx.epochs, self.cfg.dynamic_period)
            self.weight = self.cfg.dynamic_lambda * (1 - strength)
            plan.augmentation_strength = strength
            plan.metrics["augmentation_strength"] = strength
        if self.cfg.rcs_fraction < 1:
            if plan.augmentation_strength is not None and hasattr(ctx.train_set, "set_augmentation_strength"):
                ctx.train_set.set_augmentation_strength(plan.augmentation_strength)  # the authors select with this epoch's views
            if self._coresets is None:
                from rayrcm.objectives.rcs_schedule import CoresetSchedule

                self._coresets = CoresetSchedule.for_context(self, self.cfg, ctx)
            plan.pool = self._coresets(epoch)
        return plan

    # --- RCS hooks (rayrcm.objectives.rcs): the RCS authors' selection works on the projector's fc layers

    def rcs_params(self) -> dict[str, nn.Parameter]:
        """``fc1.weight``, ``fc1.bias``, ``fc2.weight`` [, ``fc3.weight``]: the parameters whose gradients
        RCS scores and steps (the authors' ``'fc' in name`` over ``proj_head``, BatchNorm affines left out)."""
        return {n: p for n, p in self.projector.named_parameters() if n.split(".")[0] in ("fc1", "fc2", "fc3")}

    def rcs_features(self, x: torch.Tensor, route: str) -> torch.Tensor:
        """Encoder features of images ``x`` on BatchNorm branch ``route`` (the authors' ``get_feature``)."""
        with bn_route(self.encoder, route):
            return self.encoder.forward_features(self.normalize(x))

    def rcs_head(self, features: torch.Tensor, route: str, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The projector on ``features`` on branch ``route``, with ``params`` (name -> tensor) in place of its own."""
        with bn_route(self.projector, route):
            if params is None:
                return cast(torch.Tensor, self.projector(features))
            return cast(torch.Tensor, torch.func.functional_call(self.projector, params, (features,)))

    def rcs_unit_gradient(self, views: list[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        """Gradients w.r.t. :meth:`rcs_params` of the RCS authors' unit loss ``(CL(nat) + CL(adv)) / 2``
        (``RCS.py``: the training attack, encoder features without gradient, natural views on the
        natural branch and adversarial ones on the adversarial branch, eval mode, the unit's own
        negatives), whatever this method's training loss; ``CL(nat)`` alone without an attack."""
        xi, xj = views[0], views[1]
        b, t = xi.shape[0], self.cfg.temperature
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                f_nat = self.rcs_features(torch.cat([xi, xj]), "nat")
            f_adv = None
            if self.cfg.adversarial:
                xi_adv, xj_adv = self.adversarial_views(xi, xj)
                with torch.no_grad():
                    f_adv = self.rcs_features(torch.cat([xi_adv, xj_adv]), "adv")
            params = self.rcs_params()
            with torch.enable_grad():
                zi, zj = self.rcs_head(f_nat, "nat").split(b)
                loss = nt_xent(zi, zj, t)
                if f_adv is not None:
                    zi_adv, zj_adv = self.rcs_head(f_adv, "adv").split(b)
                    loss = (loss + nt_xent(zi_adv, zj_adv, t)) / 2
                return list(torch.autograd.grad(loss, list(params.values())))
        finally:
            self.train(was_training)

    def export(self) -> nn.Module:
        plain = build_encoder(self.model_cfg, self.image_size)
        state = single_bn_state(self.encoder, self.cfg.export_bn) if self.cfg.dual_bn else self.encoder.state_dict()
        plain.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True)
        return plain


def build(cfg: Experiment, num_classes: int) -> ACLObjective:
    return ACLObjective(cfg.method, cfg.model, cfg.data.image_size)


__all__ = ["ACLConfig", "ACLObjective", "acl_loss", "authors_init", "build", "dynacl_strength"]
