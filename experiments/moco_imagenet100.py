"""MoCo-v2 with patch- or texture-based non-semantic negatives on ImageNet-100 (seed 004), the seed's commands.

    python experiments/moco_imagenet100.py pretrain [--setting table1|readme] [--negatives none|patch|texture] \\
        [--alpha 2|3] [--queue 16384|8192|65536] --set data.path=DIR [--set data.texture_path=DIR-texture]
    python experiments/moco_imagenet100.py probe    --from <pretrain run id | models:/... | path> --set data.path=DIR
    (pretrain, probe) --dry-run

``data.path`` is an ImageNet-100 folder with ``train/`` and ``val/`` class folders: the 100 classes of
CMC's list (:data:`IMAGENET100`), as the authors' ``preprocess/imagenet_100_subset.py`` makes it.

Pretraining: the authors' README (songweige/Contrastive-Learning-with-Non-Semantic-Negatives at
5fbdc4d) trains with::

    python moco-non-sem-neg.py -a resnet50 --lr 0.8 --batch-size 512 --moco-m 0.99 --dist-url 'tcp://localhost:10001' \\
      --multiprocessing-distributed --world-size 1 --rank 0 \\
      --mlp --moco-t 0.2 --aug-plus --cos --moco-k 16384 \\
      --robust patch --num-nonsem 1 --alpha 2 --epochs 200 --patch-ratio 16 72 \\
      --ckpt_path ./ckpts/mocov2_mocok16384_bs512_lr0.8_nonsem_16_72_noaug_nn1_alpha2_epoch200  \\
      /path/to/imagenet-100/

(and the same with ``--robust texture --num-nonsem 1 --alpha 2`` and no ``--patch-ratio`` on
``/path/to/imagenet-100-texture/``). Two named settings (``--setting``) differ only in three flags:

* ``table1`` (the default): ``--lr 0.03 --batch-size 128`` and ``--moco-m 0.999`` (the argparse
  default). These produced the paper's Table 1, the README table's first six rows (MoCo 77.88,
  +Texture 77.76, +Patch 79.35 (alpha 2) and 75.58 (alpha 3) at K 16384; MoCo 77.73, +Patch 79.54
  at K 8192): the README's linear-evaluation command, "used to reproduce MoCo-v2 + patch-based NS
  model reported in Table 1", loads ``mocov2_mocok16384_bs128_lr0.03_nonsem_16_72_noaug_nn1_alpha2_epoch200``,
  and the README's commands read ``--lr 0.03 --batch-size 128`` until the commit of 2021-12-05
  (52e8ef1) that brought the current ones. Run names and registry aliases as before
  (``k16384-patch-a2``).
* ``readme``: the README's commands, ``--lr 0.8 --batch-size 512 --moco-m 0.99``: IFM's ImageNet-100
  hyperparameters (the README's News; joshr17/IFM trains MoCo-v2 with these flags). They are the
  README table's rows added with them: MoCo* 80.00 (K 65536), +Patch 81.18 (K 65536, alpha 2) and
  +Patch 81.49 (alpha 2, K "16394", presumably the command's 16384). The README's texture command
  uses them too, but no texture number was published with them. Runs are named ``...-readme-...``.

Both: ``-a resnet50`` (torchvision's init, see :mod:`rayrcm.objectives.moco`), SGD momentum 0.9,
wd 1e-4, cosine without warm-up over 200 epochs, T 0.2, 128-d MLP head, MoCo v2's ``--aug-plus``
views (blur and the random horizontal flip), one non-semantic negative per query, ``--moco-k 16384``
(``--queue 8192`` and ``--alpha 3`` the table's other rows; the README: "Change ``--alpha`` and
``--moco-k`` to reproduce results with different configurations"). Shuffle BN over 8 GPU workers
(``--multiprocessing-distributed --world-size 1``: the GPUs of one machine; the README does not say
how many), per-GPU BatchNorm. ``--batch-size`` is the global batch (the authors divide it by the GPUs).

Texture negatives (``--negatives texture``, also spelt as the seed's ``--robust texture``):
``data.texture_path`` is the texture tree the authors' ``preprocess/imangenet_texture_syn.py`` writes
next to the photos, ``<data.path>-texture/train/<wnid>/<name>.png``; each photo's texture gets the
query's augmentation.

Linear evaluation (the README: ``main_lincls.py -a resnet50 --lr 10.0 --batch-size 128 --epochs 60``):
frozen encoder in eval mode, SGD momentum 0.9, wd 0, lr x0.1 at epochs 30, 40, 50, RandomResizedCrop + flip.
"""

from __future__ import annotations

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict

REGISTER_AS = "moco-imagenet100"
EXPERIMENT = "rayrcm-moco-imagenet100"
DATA = {"name": "imagefolder", "image_size": 224, "hflip": True, "val_fraction": 0.01, "batch_size": 128,
        "num_workers": 8}
WORKERS = 8
# CMC's ImageNet-100 (HobbitLong/CMC imagenet100.txt), as listed in the authors' preprocess/imagenet_100_subset.py
IMAGENET100 = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797 "
    "n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 "
    "n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 "
    "n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 "
    "n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051 "
    "n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 "
    "n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 "
    "n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 "
    "n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622"
).split()
# the flags both settings share (moco-non-sem-neg.py; the table's other rows: K 8192, alpha 3)
SEED = {"arch": "resnet50", "moco_t": 0.2, "moco_k": 16384, "moco_dim": 128, "num_nonsem": 1, "alpha": 2.0,
        "epochs": 200, "patch_ratio": (16, 72), "momentum": 0.9, "weight_decay": 1e-4}
# the three flags that differ (see the module docstring): --lr, --batch-size (global), --moco-m
SETTINGS = {
    "table1": {"lr": 0.03, "batch_size": 128, "moco_m": 0.999},  # the paper's Table 1 (bs128_lr0.03 checkpoints)
    "readme": {"lr": 0.8, "batch_size": 512, "moco_m": 0.99},  # the README's commands at 5fbdc4d (IFM's values)
}
LINCLS = {"lr": 10.0, "batch_size": 128, "epochs": 60, "schedule": (30, 40, 50), "weight_decay": 0.0, "momentum": 0.9}


def pretrain_config(negatives: str = "patch", alpha: float = 2.0, queue: int = 16384,
                    texture_path: str | None = None, setting: str = "table1") -> ExperimentConfig:
    """The seed's pretraining in ``setting`` (``table1`` or ``readme``, :data:`SETTINGS`);
    ``negatives="texture"`` reads each photo's texture from ``texture_path`` (``data.texture_path``,
    which may also be set with ``--set``)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r}: choose one of {', '.join(SETTINGS)}")
    s = {**SEED, **SETTINGS[setting]}
    alias = "plain" if negatives == "none" else f"{negatives}-a{alpha:g}"
    alias = f"k{queue}-{alias}" if setting == "table1" else f"{setting}-k{queue}-{alias}"
    return from_dict({
        "data": {**DATA, "batch_size": s["batch_size"], "texture_path": texture_path},
        "model": {"encoder": s["arch"]},
        "method": {"name": "moco", "temperature": s["moco_t"], "queue_size": queue, "momentum": s["moco_m"],
                   "dim": s["moco_dim"], "mlp": True, "negatives": negatives, "alpha": alpha,
                   "n_negatives": s["num_nonsem"], "patch_min": s["patch_ratio"][0], "patch_max": s["patch_ratio"][1],
                   "view": "mocov2", "shuffle_groups": 1},
        "optim": {"name": "sgd", "lr": s["lr"], "momentum": s["momentum"], "weight_decay": s["weight_decay"],
                  "weight_decay_all": True, "schedule": "cosine", "warmup_steps": 0},
        "train": {"name": f"{REGISTER_AS}-{alias}", "epochs": s["epochs"], "workers": WORKERS, "use_gpu": True,
                  "sync_bn": False, "checkpoint_epochs": 10, "log_every": 50},
        "tracking": {"experiment": EXPERIMENT, "register_as": REGISTER_AS, "alias": alias},
    })


def probe_config(init_from: str) -> ExperimentConfig:
    """MoCo's ``main_lincls.py`` as the shared linear-probe stage (one head, lr 10, x0.1 at 30/40/50)."""
    from rayrcm.objectives.linear_probe import recipe

    c = LINCLS
    tree = recipe("moco", init_from=init_from, encoder=SEED["arch"], epochs=c["epochs"], name=f"{REGISTER_AS}-lincls",
                  experiment=EXPERIMENT, base_lrs=(c["lr"],),
                  data={**DATA, "batch_size": c["batch_size"], "augmentation": "crop", "crop_min": 0.08})
    tree["optim"].update(momentum=c["momentum"], weight_decay=c["weight_decay"])
    tree["train"].update(workers=WORKERS, use_gpu=True, checkpoint_epochs=5, log_every=50)
    return from_dict(tree)


def main(argv: list[str] | None = None) -> None:
    setting = recipe_cli.option("--setting", default="table1", choices=tuple(SETTINGS),
                                help="table1: --lr 0.03 --batch-size 128 --moco-m 0.999 (the paper's Table 1); "
                                     "readme: --lr 0.8 --batch-size 512 --moco-m 0.99 (the README's commands)")
    negatives = recipe_cli.option("--negatives", "--robust", dest="negatives", default="patch",
                                  choices=("none", "patch", "texture"), help="the robust negatives (default patch)")
    alpha = recipe_cli.option("--alpha", type=float, default=2.0, help="their weight (default 2)")
    queue = recipe_cli.option("--queue", type=int, default=16384, help="the queue length (default 16384)")
    source = recipe_cli.option("--from", dest="init_from", default=f"models:/{REGISTER_AS}@k16384-patch-a2",
                               help="the pretrained encoder to probe (default models:/moco-imagenet100@k16384-patch-a2)")
    recipe_cli.main(argv, doc=__doc__, commands=[
        recipe_cli.train("pretrain", "MoCo v2 pretraining with robust negatives (Ray Train)",
                         lambda a: pretrain_config(a.negatives, a.alpha, a.queue, setting=a.setting),
                         options=[setting, negatives, alpha, queue],
                         example="python {prog} pretrain --negatives patch --set data.path=DIR"),
        recipe_cli.train("probe", "the linear classification protocol (main_lincls.py) on a pretrained encoder "
                                  "(Ray Train)", lambda a: probe_config(a.init_from), options=[source],
                         example="python {prog} probe --from models:/moco-imagenet100@k16384-patch-a2 "
                                 "--set data.path=DIR"),
    ])


if __name__ == "__main__":
    main()
