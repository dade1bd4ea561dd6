"""StableRep's multi-positive contrastive learning (seed 003) on the bundled digits, on a laptop CPU.

    python experiments/stablerep_digits.py pretrain [--groups label|image] [--set key=value ...]
    python experiments/stablerep_digits.py probe    --from <pretrain run id | models:/... | path> [--set key=value ...]
    python experiments/stablerep_digits.py all      [--set key=value | STAGE:key=value ...]   # the table, one job
    (pretrain, probe, all) --dry-run    # print the resolved config (all: the stages, with what is reused)

There are no captions to generate images from, so a group is a class: every digits image of a
class in the global batch is a positive of every other (``method.groups=label``); ``--groups image``
makes the two views of one image the only positives, which is SimCLR at temperature 0.1 (the
control). The seed's method settings: temperature 0.1, the 3-layer BN MLP head with per-view
BatchNorm statistics (all-reduced over the two CPU workers), StableRep's views (RandomResizedCrop
0.08-1, jitter, grey, blur p 0.5, horizontal flip, the 5% downsample), AdamW with wd 0.1, warm-up
then cosine. At digits scale: the small digits ViT, a 512-wide head to 128, 400 steps of batch 128
with 2 views, lr 2e-3 after 20 warm-up steps (the seed's blr 1e-4 x 256 / 256 barely moves in 400 steps).

``probe`` is the linear-probe stage (``linear_probe``, StableRep's protocol): ten heads on the
frozen encoder in eval mode, one per base lr of the seed's grid (x 128 / 256), SGD momentum 0.9,
wd 0, per-step cosine, 30 epochs; the head best on the held-out split is kept. Its training view is
a random resized crop and a horizontal flip (``main_linear.py:133-138``).

Both stages flip as the authors do (``main_stablerep.py:185-195``, ``main_linear.py:133-138``), though
digits are not mirror-symmetric: the recipe keeps the method's views as they are.
"""

from __future__ import annotations

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict

REGISTER_AS = "stablerep-digits"
EXPERIMENT = "rayrcm-stablerep-digits"
DATA = {"name": "digits", "image_size": 16, "hflip": True, "val_fraction": 0.1, "batch_size": 128}
ENCODER = "vit_digits"


def pretrain_config(groups: str = "label", n_views: int = 2) -> ExperimentConfig:
    """The digits pretraining; ``groups="image"`` with two views is SimCLR at temperature 0.1."""
    return from_dict({
        "data": {**DATA},
        "model": {"encoder": ENCODER, "proj_hidden_dim": 512, "proj_dim": 128},
        "method": {"name": "stablerep", "temperature": 0.1, "n_views": n_views, "groups": groups, "gather": True,
                   "view": "stablerep"},
        # the README's training command's betas (StableRep/README.md: --beta1 0.9 --beta2 0.98)
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 20, "schedule": "cosine",
                  "betas": (0.9, 0.98)},
        "train": {"name": f"{REGISTER_AS}-{groups}", "steps": 400, "workers": 2, "sync_bn": True, "use_gpu": False,
                  "checkpoint_every": 200, "log_every": 50},
        "tracking": {"experiment": EXPERIMENT, "register_as": REGISTER_AS, "alias": groups},
    })


def probe_config(init_from: str, epochs: int = 30) -> ExperimentConfig:
    """StableRep's linear probe as the shared stage: ten heads over the seed's base lrs (x batch / 256),
    SGD momentum 0.9, wd 0, per-step cosine; the best head chosen on the held-out split."""
    from rayrcm.objectives.linear_probe import recipe

    tree = recipe("stablerep", init_from=init_from, encoder=ENCODER, epochs=epochs, name=f"{REGISTER_AS}-probe",
                  experiment=EXPERIMENT, data={**DATA, "augmentation": "crop", "val_fraction": 0.1})
    tree["train"].update(workers=2, use_gpu=False, checkpoint_epochs=epochs / 2, log_every=50)
    return from_dict(tree)


def table_stages() -> list:
    """The seed's comparison as stages: StableRep's class groups of 4 views and SimCLR (``groups=image``,
    2 views), each followed by the linear probe (a row each: the pretraining's k-NN accuracy, the probe's test accuracy)."""
    from functools import partial

    from rayrcm.pipeline import Stage

    out = []
    for groups, row in (("image", "SimCLR"), ("label", "StableRep (class groups)")):
        out.append(Stage(f"pretrain-{groups}", "train", partial(pretrain_config, groups, 4 if groups == "label" else 2),
                         row=row, columns={"k-NN": "test_knn_acc"}))
        out.append(Stage(f"probe-{groups}", "train", partial(probe_config, "placeholder"), row=row,
                            inputs={"model.init_from": f"pretrain-{groups}"}, columns={"linear probe": "test_acc_clean"}))
    return out


def main(argv: list[str] | None = None) -> None:
    groups = recipe_cli.option("--groups", default="label", choices=("label", "image"),
                               help="label: StableRep's class groups of 4 views (default); image: SimCLR's pairs")
    source = recipe_cli.option("--from", dest="init_from", default=f"models:/{REGISTER_AS}@label",
                               help="the pretrained encoder to probe (default models:/stablerep-digits@label)")
    recipe_cli.main(argv, doc=__doc__, commands=[
        recipe_cli.train("pretrain", "StableRep multi-positive contrastive pretraining (Ray Train)",
                         lambda a: pretrain_config(a.groups), options=[groups],
                         example="python {prog} pretrain --groups label"),
        recipe_cli.train("probe", "linear probe of a pretrained encoder (Ray Train)",
                         lambda a: probe_config(a.init_from), options=[source], example="python {prog} probe"),
        recipe_cli.table("stablerep-digits", lambda a: table_stages(),
                         help="the whole table in one resumable job: SimCLR and StableRep, each probed",
                         example="python {prog} all [--set pretrain-label:train.steps=600] [--dry-run]",
                         names="pretrain-image, pretrain-label, probe-image, probe-label"),
    ])


if __name__ == "__main__":
    main()
