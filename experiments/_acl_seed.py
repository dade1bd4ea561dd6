"""Shared by the adversarial contrastive recipes (seed 001): the authors' command-line values turned
into rayrcm configs, and the stage command line.

Pretraining (``pretraining.py`` of github.com/GodXuxilie/Enhancing_ACL_via_AIR and
``DynACL_RCS.py`` of github.com/GodXuxilie/Efficient_ACL_via_RCS), every method on ResNet-18:
batch 512, 1000 epochs, the authors' LARS (``LARS(model.parameters(), lr=5.0, weight_decay=1e-6)``:
momentum 0.9, trust coefficient 0.001, every parameter decayed and trust-ratio scaled) with their
per-step schedule (linear warm-up over 10 epochs, then a cosine to 1e-6), the authors' projector
``proj_head(512)`` (fc-BN-ReLU-fc-BN-ReLU-fc-BN, 512 wide), temperature 0.5, contrastive PGD with
5 steps of ``eps / 4`` in the L-inf ball ``eps = 8/255``, dual BatchNorm (``--ACL_DS``), and the
SimCLR augmentation at DynACL's strength (``--DynAug``). CL, ACL and AIR train on the whole
training set; ACL + RCS holds out 1% as RCS's unlabeled validation set (``DynACL_RCS.py``) and,
as that script, trains on ``((1 - w) CL(nat) + (1 + w) CL(adv)) / 2`` with the greedy step 0.01
(``--Coreset_lr``). The seed's commands:

* CL:  ``--pgd_iter 0 --lambda1 0 --lambda2 0``  -> ``method.name=simclr``
* ACL: ``--DynAug --lambda1 0 --lambda2 0``      -> ``acl`` with DynACL's schedule
* AIR: ``--DynAug`` (lambda1 = lambda2 = 0.5)    -> ``air``
* ACL + RCS: ``DynACL_RCS.py --ACL_DS --fraction 0.2`` -> ``acl`` + ``method.rcs_fraction=0.2``
  (warm-up 100 epochs, a new coreset every 20; ``--fraction 0.05`` on ImageNet-32)

Fine-tuning (``finetuning.py --mode ALL``, ``setup_hyperparameter``, CIFAR-100 downstream): SGD
momentum 0.9, weight decay 2e-4, 25 epochs, lr x 0.1 at the milestones; SLF and ALF batch 512,
milestones 10 and 20, lr 0.05 after DynACL-family pretraining (``--pretraining DynACL``: CL, ACL,
ACL + RCS) and 0.1 after AIR (``--pretraining DynACL-AIR``); AFF (TRADES, beta 6, dual BatchNorm)
batch 128, lr 0.1, milestones 15 and 20; attacks L-inf 8/255, step 2/255, 10 steps in training, 20
in evaluation, then AutoAttack. The encoder keeps the adversarial BatchNorm branch
(``bnNameCnt=1``). The authors evaluate the last epoch; so do we (no validation split is held out).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import yaml

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict

METHODS = ("cl", "acl", "air", "acl_rcs")
MODES = ("slf", "alf", "aff")
# lr_warmup: the schedule's linear warm-up in epochs (cosine_annealing's warmup_steps = 10 * len(train_loader));
# min_lr: where the cosine ends (1e-6 / args.lr as LambdaLR's factor); ch: proj_head(ch) = the encoder's width
PRETRAIN_COMMON = {"batch_size": 512, "epochs": 1000, "optimizer": "lars", "lr": 5.0, "weight_decay": 1e-6, "lr_warmup": 10,
                   "min_lr": 1e-6, "eps": 8, "pgd_iter": 5, "temperature": 0.5, "ch": 512, "twoLayerProj": False,
                   "val_fraction": 0.0}
PRETRAIN = {
    "cl": {"pgd_iter": 0, "lambda1": 0.0, "lambda2": 0.0, "DynAug": False},
    "acl": {"DynAug": True, "lambda1": 0.0, "lambda2": 0.0},
    "air": {"DynAug": True, "lambda1": 0.5, "lambda2": 0.5},
    # DynACL_RCS.py: --fraction 0.2 --warmup 100 --fre 20 --Coreset_lr 0.01, 1% held out, loss halved
    "acl_rcs": {"DynAug": True, "lambda1": 0.0, "lambda2": 0.0, "fraction": 0.2, "warmup": 100, "interval": 20,
                "coreset_lr": 0.01, "val_fraction": 0.01, "loss_scale": 0.5},
}
FINETUNE = {  # CIFAR-100 downstream, DynACL-family pretraining
    "slf": {"batch_size": 512, "lr": 0.05, "epochs": 25, "decreasing_lr": (10, 20)},
    "alf": {"batch_size": 512, "lr": 0.05, "epochs": 25, "decreasing_lr": (10, 20)},
    "aff": {"batch_size": 128, "lr": 0.1, "epochs": 25, "decreasing_lr": (15, 20)},
}
FINETUNE_BY_METHOD = {  # setup_hyperparameter's CIFAR-100 values that differ by pretraining method
    "air": {"slf": {"lr": 0.1}, "alf": {"lr": 0.1}},  # --pretraining DynACL-AIR
}
FINETUNE_COMMON = {"momentum": 0.9, "weight_decay": 2e-4, "epsilon": 8, "step_size": 2, "num_steps_train": 10,
                   "num_steps_test": 20, "beta": 6.0}


def finetune_cmd(mode: str, method: str) -> dict[str, Any]:
    """The authors' fine-tuning values for ``mode`` after pretraining with ``method`` (CIFAR-100 downstream)."""
    return {**FINETUNE[mode], **FINETUNE_BY_METHOD.get(method, {}).get(mode, {})}


def pretrain_tree(method: str, cmd: dict[str, Any], *, data: dict[str, Any], encoder: str, register_as: str,
                  experiment: str, workers: int, use_gpu: bool = True) -> dict[str, Any]:
    """A config tree from one of the seed's pretraining commands (``cmd`` = common values + flags)."""
    name = {"cl": "simclr", "acl": "acl", "air": "air", "acl_rcs": "acl"}[method]
    m: dict[str, Any] = {"name": name, "temperature": cmd["temperature"], "two_layer_proj": cmd["twoLayerProj"],
                         "scale": cmd.get("loss_scale", 1.0)}
    if name != "simclr":
        m.update(eps=cmd["eps"] / 255, step_size=cmd["eps"] / 4 / 255, pgd_steps=cmd["pgd_iter"], dual_bn=True,
                 export_bn="adv", dynamic=cmd["DynAug"], weight=0.0)
    if name == "air":
        m.update(lambda1=cmd["lambda1"], lambda2=cmd["lambda2"])
    if "fraction" in cmd:
        m.update(rcs_fraction=cmd["fraction"], rcs_warmup_epochs=cmd["warmup"], rcs_interval_epochs=cmd["interval"],
                 rcs_lr=cmd["coreset_lr"])
    return {
        "data": {**data, "augmentation": "simclr", "batch_size": cmd["batch_size"], "val_fraction": cmd["val_fraction"]},
        "model": {"encoder": encoder, "proj_hidden_dim": cmd["ch"], "proj_dim": cmd["ch"]},
        "method": m,
        # the authors' LARS(model.parameters(), weight_decay=1e-6): one group, every parameter decays
        "optim": {"name": cmd["optimizer"], "lr": cmd["lr"], "weight_decay": cmd["weight_decay"], "weight_decay_all": True,
                  "warmup_epochs": cmd["lr_warmup"], "min_lr": cmd["min_lr"],
                  "schedule_offset": 1},  # scheduler.step() before each update: update s runs at lr(s + 1)
        "train": {"name": f"{register_as}-{method}", "epochs": cmd["epochs"], "workers": workers, "use_gpu": use_gpu,
                  "checkpoint_epochs": cmd.get("checkpoint_epochs", 100), "log_every": cmd.get("log_every", 50)},
        "tracking": {"experiment": experiment, "register_as": register_as, "alias": method.replace("_", "-")},
    }


def finetune_tree(mode: str, cmd: dict[str, Any], common: dict[str, Any], *, init_from: str, data: dict[str, Any],
                  encoder: str, name: str, experiment: str, workers: int, use_gpu: bool = True,
                  eval_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config tree for one fine-tuning mode from the authors' ``finetuning.py`` settings."""
    return {
        "data": {**data, "batch_size": cmd["batch_size"], "val_fraction": 0.0},
        "model": {"encoder": encoder, "init_from": init_from},
        "method": {"name": "adv_finetune", "mode": mode, "eps": common["epsilon"] / 255, "step_size": common["step_size"] / 255,
                   "pgd_steps": common["num_steps_train"], "beta": common["beta"], "eval_pgd_steps": common["num_steps_test"],
                   **(eval_extra or {})},
        "optim": {"name": "sgd", "lr": cmd["lr"], "momentum": common["momentum"], "weight_decay": common["weight_decay"],
                  "nesterov": bool(common.get("nesterov", False)),
                  "schedule": "step", "milestone_epochs": list(cmd["decreasing_lr"]), "gamma": 0.1},
        "train": {"name": f"{name}-{mode}", "epochs": cmd["epochs"], "workers": workers, "use_gpu": use_gpu,
                  "eval_sigmas": (0.25,), "checkpoint_epochs": cmd.get("checkpoint_epochs", 5),
                  "log_every": cmd.get("log_every", 50)},
        "tracking": {"experiment": experiment},
    }


def table_stages(pretrain: Callable[[str], ExperimentConfig],
                 finetune: Callable[[str, str, str | None], ExperimentConfig], method: str) -> list:
    """The seed's table as stages: the pretraining, then SLF, ALF and AFF from it (a row each: SA, PGD-20,
    AutoAttack)."""
    from rayrcm.pipeline import Stage

    out = [Stage("pretrain", "train", partial(pretrain, method))]
    out += [Stage(f"finetune-{m}", "train", partial(finetune, m, method, "placeholder"),
                     inputs={"model.init_from": "pretrain"}, row=m.upper()) for m in MODES]
    return out


def _finetune(finetune: Callable[[str, str, str | None], ExperimentConfig], args: Any) -> None:
    """``finetune --mode slf|alf|aff|all``: one mode, or the three in sequence (one parent run, a child per mode)."""
    from rayrcm.config import apply_overrides, to_dict, validate

    modes = MODES if args.mode == "all" else (args.mode,)
    cfgs = {m: validate(apply_overrides(finetune(m, args.method, args.init_from), args.overrides),
                        check_paths=not args.dry_run) for m in modes}
    if args.dry_run:
        print(yaml.safe_dump({m: to_dict(c) for m, c in cfgs.items()}, sort_keys=False), end="")
        return
    from rayrcm.orchestration.transfer import run_all

    run_all(cfgs, name=cfgs[modes[0]].train.name.rsplit("-", 1)[0])


def commands(*, pretrain: Callable[[str], ExperimentConfig], finetune: Callable[[str, str, str | None], ExperimentConfig],
             recipe: str = "acl") -> list[recipe_cli.Command]:
    """``pretrain --method M``; ``finetune --mode slf|alf|aff|all --method M [--from REF]``; ``all
    --method M`` (the table in one job) (:mod:`rayrcm.recipe_cli`)."""
    method = recipe_cli.option("--method", default="air", choices=METHODS, help="pretraining method (default air)")
    mode = recipe_cli.option("--mode", default="all", choices=[*MODES, "all"],
                             help="SLF, ALF, AFF or all three in sequence")
    source = recipe_cli.option("--from", dest="init_from",
                               help="the pretrained encoder (default: the registry alias of --method)")
    pre = "adversarial contrastive pretraining of the encoder (Ray Train)"
    ft = "SLF / ALF / AFF fine-tuning with SA, PGD-20 and AutoAttack (Ray Train)"
    return [
        recipe_cli.train("pretrain", pre, lambda a: pretrain(a.method), options=[method],
                         example="python {prog} pretrain --method acl_rcs --set data.path=DIR"),
        recipe_cli.Command("finetune", ft, partial(_finetune, finetune), options=[method, mode, source],
                           example="python {prog} finetune --method acl_rcs --mode all --set data.path=DIR"),
        recipe_cli.table(recipe, lambda a: table_stages(pretrain, finetune, a.method), options=[method],
                         help="the whole table in one resumable job: pretrain, then SLF, ALF and AFF",
                         description="the whole table in one resumable job: pretrain, then SLF, ALF and AFF side by "
                                     "side (SA, PGD-20, AutoAttack per mode)",
                         example="python {prog} all --method air [--set finetune-aff:optim.lr=0.01] [--dry-run]",
                         names="pretrain, finetune-slf, finetune-alf, finetune-aff"),
    ]


__all__ = ["FINETUNE", "FINETUNE_BY_METHOD", "FINETUNE_COMMON", "METHODS", "MODES", "PRETRAIN", "PRETRAIN_COMMON",
           "commands", "finetune_cmd", "finetune_tree", "from_dict", "pretrain_tree", "table_stages"]
