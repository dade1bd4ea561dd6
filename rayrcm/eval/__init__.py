"""Evaluations without Ray, one registry line each (see :mod:`rayrcm.eval.base` for the contract)."""

from rayrcm.eval import accuracy, certified, knn, robust
from rayrcm.eval.base import EVALUATIONS, Evaluation, build_evaluations, evaluate

EVALUATIONS.register("noisy")(accuracy.NoisyAccuracy.from_config)  # clean + one noise draw at train.eval_sigmas
EVALUATIONS.register("smoothed")(accuracy.SmoothedAccuracy.from_config)  # majority vote of train.eval_votes draws
EVALUATIONS.register("certified")(certified.CertifiedAccuracy.from_config)  # sequential certification at train.eval_radii
EVALUATIONS.register("knn")(knn.KNNAccuracy.from_config)  # weighted k-NN on frozen features (solo-learn's), train split as reference
EVALUATIONS.register("robust")(robust.RobustAccuracy.from_config)  # SA / PGD-k / AutoAttack (standard) and its APGD upper bound

__all__ = ["EVALUATIONS", "Evaluation", "build_evaluations", "evaluate"]
