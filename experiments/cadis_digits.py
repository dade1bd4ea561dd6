"""FT-CADIS (seed 002) on the bundled digits, on a laptop CPU: an off-the-shelf classifier, a denoiser,
denoised smoothing (DDS), then confidence-aware denoised fine-tuning behind the frozen denoiser.

    python experiments/cadis_digits.py base      [--set key=value ...]
    python experiments/cadis_digits.py denoiser  [--set key=value ...]      # a ddpm denoiser trained here
    python experiments/cadis_digits.py certify   --from models:/cadis-digits@base \
                                                 --denoiser models:/cadis-digits-denoiser@ddpm    # DDS
    python experiments/cadis_digits.py finetune  [--from <base run id | models:/... | path>] [--sigma 0.5]
                                                 [--denoiser wiener_cov | wiener | a ddpm model.pt] [--set k=v ...]
    python experiments/cadis_digits.py certify   [--from models:/cadis-digits@cadis-sigma-0_50]    # the fine-tuned f(D)
    python experiments/cadis_digits.py all       [--sigma 0.5] [--set key=value | STAGE:key=value ...]   # the table
    (every stage) --dry-run    # print the resolved config (all: the stages, with what would be reused)

The whole seed pipeline (train the denoiser -> certify the off-the-shelf classifier through it ->
CADIS fine-tune -> certify) runs with the ``denoiser`` job's model
(``models:/cadis-digits-denoiser@ddpm`` for certify; its file
``rayrcm_results/cadis-digits-denoiser/model.pt`` for finetune); the
closed-form ``wiener_cov`` denoiser (the default of ``finetune``) needs no training and is what the
test suite's end-to-end orderings use (smoothed accuracy at sigma 0.5: 0.142 alone, 0.933 behind the
denoiser, 0.958 after CADIS). ``certify`` is ``rayrcm certify`` with n0 = 100, n = 1,000, every 4th
test image, 2 actors; ``--denoiser`` there takes a ddpm model file or reference.

``base`` trains the "off-the-shelf" classifier: plain cross-entropy on clean digits (method
``gaussian`` at sigma 0), a digits ViT, 30 epochs. ``finetune`` fine-tunes that whole classifier
(head included, ``model.init_from``) with the ``cadis`` objective and exports ``f(D(y, sigma))``
(kind ``denoised_classifier``), which ``rayrcm certify`` certifies like any classifier.

The method values are the CIFAR-10 seed command's (``train_cifar10.sh``): M = 4 noisy copies,
lbd = 4, eps = 64/256 = 0.25 in [-1, 1] units, K = 4 attack steps, warm start; AdamW with
lr = blr 1e-4 x 128 / 256, weight decay a cosine from 0.04 to 0.4, layer decay 0.65, gradient
clipping 0.3, 30 epochs with 3 of warm-up, 128 unique images per step. The seed trains at
sigma = 1.0 only (its per-sigma values are in the paper, not in the code): the default here, sigma =
0.5, keeps the sigma = 1.0 values unchanged. Not the seed's: the classifier (a small ViT, not
ViT-B/16 at 224 px), the denoiser (the closed-form Wiener filter with the training split's full
covariance, not an ADM diffusion model: the per-pixel ``wiener`` blurs 16 px digits at sigma 0.5
past recognition; a ``ddpm`` run's model.pt works too), fp32 and no gradient accumulation (128
unique images fit one step); docs/fidelity.md lists every difference.
"""

from __future__ import annotations

from rayrcm import recipe_cli
from rayrcm.config import ExperimentConfig, from_dict
from rayrcm.sections import sigma_alias

REGISTER_AS = "cadis-digits"
EXPERIMENT = "rayrcm-cadis-digits"
DATA = {"name": "digits", "image_size": 16, "val_fraction": 0.1, "batch_size": 128, "augmentation": "none"}
ENCODER = "vit_digits"
SEED = {"m": 4, "lbd": 4.0, "eps": 64 / 256, "steps": 4, "warm_start": True}  # train_cifar10.sh
SEED_OPTIM = {"name": "adamw", "lr": 1e-4 * 128 / 256, "weight_decay": 0.04, "weight_decay_end": 0.4,
              "layer_decay": 0.65, "grad_clip": 0.3, "clip_mode": "per_param",
              "warmup_epochs": 3, "min_lr": 1e-6}


def base_config() -> ExperimentConfig:
    """The off-the-shelf classifier: cross-entropy on clean digits."""
    return from_dict({
        "data": {**DATA, "augmentation": "weak"},
        "model": {"encoder": ENCODER},
        "method": {"name": "gaussian", "sigma": 0.0},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 2},
        "train": {"name": f"{REGISTER_AS}-base", "epochs": 30, "workers": 2, "use_gpu": False, "checkpoint_epochs": 10,
                  "log_every": 50, "eval_sigmas": [0.25, 0.5]},
        "tracking": {"experiment": EXPERIMENT, "register_as": REGISTER_AS, "alias": "base"},
    })


def denoiser_config() -> ExperimentConfig:
    """The denoiser of denoised smoothing: the ``ddpm`` objective (epsilon MSE, cosine T = 1000, as the
    improved-diffusion CIFAR-10 model the seed uses) with a small UNet, Adam(W) lr 1e-4 without weight
    decay (improved-diffusion's), on the clean training digits."""
    return from_dict({
        "data": {**DATA},
        "method": {"name": "ddpm", "schedule": "cosine", "steps": 1000, "base_channels": 32, "channel_mults": [1, 2]},
        "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0},
        "train": {"name": f"{REGISTER_AS}-denoiser", "steps": 3000, "workers": 2, "use_gpu": False,
                  "checkpoint_every": 1000, "log_every": 100},
        "tracking": {"experiment": EXPERIMENT, "register_as": f"{REGISTER_AS}-denoiser", "alias": "ddpm"},
    })


def cadis_alias(sigma: float) -> str:
    """The registry alias of the CADIS fine-tuning at ``sigma`` (``cadis-sigma-0_50``)."""
    return f"cadis-{sigma_alias(sigma)}"


def certify_args(model: str, sigma: float, denoiser: str | None = None) -> list[str]:
    """``rayrcm certify`` keys for ``model`` (through ``denoiser``, a ddpm model, for DDS) at ``sigma``."""
    return [f"model={model}", f"smoothing.sigma={sigma:g}", "smoothing.n0=100", "smoothing.n=1000", "smoothing.skip=4",
            "compute.workers=2", f"tracking.experiment={EXPERIMENT}", *([f"denoiser={denoiser}"] if denoiser else [])]


def finetune_config(init_from: str, sigma: float = 0.5, denoiser: str = "wiener_cov") -> ExperimentConfig:
    """CADIS fine-tuning of the base classifier behind ``denoiser`` at ``sigma`` (pixel units)."""
    alias = cadis_alias(sigma)
    return from_dict({
        "data": {**DATA},
        "model": {"encoder": ENCODER, "init_from": init_from},
        "method": {"name": "cadis", "sigma": sigma, "denoiser": denoiser, **SEED},
        "optim": {**SEED_OPTIM},
        "train": {"name": f"{REGISTER_AS}-{alias}", "epochs": 30, "workers": 2, "use_gpu": False,
                  "checkpoint_epochs": 10, "log_every": 20, "eval_sigmas": [sigma], "evals": ["noisy"],
                  "test_evals": ["noisy", "smoothed"], "eval_votes": 50},
        "tracking": {"experiment": EXPERIMENT, "register_as": REGISTER_AS, "alias": alias},
    })


def table_stages(sigma: float = 0.5) -> list:
    """The seed's table as stages: the off-the-shelf classifier and the ddpm denoiser; denoised smoothing
    (the classifier behind the denoiser) certified; CADIS fine-tuning of the classifier (behind the
    closed-form Wiener denoiser) certified. A row per certification at ``sigma``."""
    from functools import partial

    from rayrcm.orchestration.certify_job import config_from_args
    from rayrcm.pipeline import Stage

    def certify(denoiser: bool):
        return config_from_args(certify_args("placeholder", sigma, "placeholder" if denoiser else None))

    return [Stage("base", "train", base_config), Stage("denoiser", "train", denoiser_config),
            Stage("certify-dds", "certify", partial(certify, True), inputs={"model": "base", "denoiser": "denoiser"},
                  row="DDS (off-the-shelf + ddpm denoiser)"),
            Stage("finetune", "train", partial(finetune_config, "placeholder", sigma), inputs={"model.init_from": "base"}),
            Stage("certify-cadis", "certify", partial(certify, False), inputs={"model": "finetune"}, row="FT-CADIS")]


def main(argv: list[str] | None = None) -> None:
    sigma = recipe_cli.option("--sigma", type=float, default=0.5, help="noise in pixel units (default 0.5)")
    ft_from = recipe_cli.option("--from", dest="init_from", default=f"models:/{REGISTER_AS}@base",
                                help="the off-the-shelf classifier (default models:/cadis-digits@base)")
    ft_den = recipe_cli.option("--denoiser", default="wiener_cov",
                               help="wiener_cov (default) | wiener | a ddpm model.pt")
    cert_from = recipe_cli.option("--from", dest="init_from",
                                  help="the model to certify (default the fine-tuned models:/cadis-digits@cadis-sigma-"
                                       "<sigma>)")
    cert_den = recipe_cli.option("--denoiser", help="a ddpm model (file or models:/...): certify the classifier behind "
                                                    "it (DDS)")

    def certified(a) -> list[str]:
        return certify_args(a.init_from or f"models:/{REGISTER_AS}@{cadis_alias(a.sigma)}", a.sigma, a.denoiser)

    recipe_cli.main(argv, doc=__doc__, commands=[
        recipe_cli.train("base", "the off-the-shelf classifier: cross-entropy on clean digits (Ray Train)",
                         lambda a: base_config(), example="python {prog} base"),
        recipe_cli.train("denoiser", "a ddpm denoiser trained on the clean digits (Ray Train)",
                         lambda a: denoiser_config(), example="python {prog} denoiser"),
        recipe_cli.train("finetune", "CADIS fine-tuning of the classifier behind the frozen denoiser (Ray Train)",
                         lambda a: finetune_config(a.init_from, a.sigma, a.denoiser), options=[ft_from, sigma, ft_den],
                         example="python {prog} finetune --sigma 0.5 --denoiser wiener_cov"),
        recipe_cli.certify("randomized-smoothing certification (Ray Data): the fine-tuned f(D), or DDS with --denoiser",
                           certified, options=[cert_from, sigma, cert_den],
                           example="python {prog} certify --from models:/cadis-digits@base "
                                   "--denoiser models:/cadis-digits-denoiser@ddpm"),
        recipe_cli.table("cadis-digits", lambda a: table_stages(a.sigma), options=[sigma],
                         help="the whole table in one resumable job: DDS and FT-CADIS certified at --sigma",
                         example="python {prog} all [--sigma 0.5] [--set finetune:train.epochs=10] [--dry-run]",
                         names="base, denoiser, certify-dds, finetune, certify-cadis"),
    ])


if __name__ == "__main__":
    main()
