"""The ``rayrcm evaluate`` job's config (pure): every key is a ``--set KEY=VALUE``. Validation, the
suites and the job's cells and shards are :mod:`rayrcm.eval.suite` and :mod:`rayrcm.eval.suites`."""

from __future__ import annotations

from dataclasses import dataclass, field

from rayrcm.attacks.budget import AttackBudget
from rayrcm.errors import ConfigError
from rayrcm.overrides import parse_dotted, update_dataclass
from rayrcm.sections import TrackingConfig, default_storage


@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation job. Every key is a ``--set KEY=VALUE`` of ``rayrcm evaluate`` (the budget's
    keys stay flat, ``eps=...``; :attr:`budget` hands them out as one
    :class:`~rayrcm.attacks.AttackBudget`)."""

    model: str = ""  # models:/name@alias, models:/name/3, runs:/<id>/model, a run id, or a model.pt path
    suite: tuple[str, ...] = ("clean", "corruptions")
    severities: tuple[int, ...] = (1, 3, 5)
    corruptions: tuple[str, ...] = ()  # () = every generated corruption (or every file of c_path)
    c_path: str = ""  # a released CIFAR-10-C / CIFAR-100-C folder (ImageNet-C for imagefolder); "" = generate
    shift_path: str = ""  # the CIFAR-10.1 folder of the ``shift`` part (= shifts cifar10.1=PATH)
    shifts: tuple[str, ...] = ()  # NAME=PATH of the ``shift`` part, NAME: cifar10.1, sketch, r, stylized
    class_list: str = ""  # the model's classes (one wnid per line, output order); "" = the dataset's class folders
    dataset: str = ""  # default: the dataset the model was trained on
    data_path: str = ""  # default: the model's training data path
    split: str = "test"
    skip: int = 1  # every skip-th image of the split
    max_images: int = 0  # at most this many images (after skip); 0 = all
    seed: int = 0  # corruption draws and attack starts
    shard_size: int = 500  # images per row of work
    batch: int = 256  # images per forward pass
    eps: float = 8 / 255  # L-inf budget of pgd, aa and aa-apgd, [0, 1] pixel units
    step_size: float = 2 / 255
    pgd_steps: int = 20
    aa_iters: int = 100  # APGD's and FAB-T's iterations
    aa_targets: int = 9  # APGD-T's and FAB-T's target classes
    aa_queries: int = 5000  # Square's queries (aa)
    name: str = ""  # job name (results folder and MLflow run); rerunning it resumes
    out_dir: str = field(default_factory=lambda: default_storage("evaluate"))
    workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    flush_every: int = 8  # shards per Parquet part
    progress_every_s: float = 10.0
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment=""))  # "" = the model's
    plugins: tuple[str, ...] = ()

    @property
    def budget(self) -> AttackBudget:
        """The attacks' budget (L-inf; PGD's steps are ``pgd_steps``)."""
        return AttackBudget("linf", self.eps, self.step_size, self.pgd_steps)


def config_from_args(overrides: list[str], base: EvaluateConfig | None = None) -> EvaluateConfig:
    """An :class:`EvaluateConfig` from ``key=value`` items (``suite=clean,pgd``; ``tracking.enabled=false``)."""
    return update_dataclass(base or EvaluateConfig(), parse_dotted(overrides))


def check(ok: bool, key: str, value: object, allowed: str) -> None:
    """A one-line :class:`~rayrcm.errors.ConfigError` unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, allowed)


__all__ = ["EvaluateConfig", "check", "config_from_args"]
