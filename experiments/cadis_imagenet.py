"""FT-CADIS on ImageNet (seed 002): LoRA fine-tuning of an off-the-shelf ViT-B/16 (the authors' CLIP
ViT-B/16 at 384 px) behind the authors' guided-diffusion denoiser, then certification, with the
authors' values (``train_imagenet.sh`` as the README launches it; every value: ``_cadis_seed.py``).

    python experiments/cadis_imagenet.py finetune --from vit_b16_clip_384.pt \\
        --denoiser adm:my_denoisers:imagenet_uncond --denoiser-weights 256x256_diffusion_uncond.pt \\
        --set data.path=DIR
    python experiments/cadis_imagenet.py certify --set data_path=DIR
    (either) --dry-run   # print the resolved config

``DIR`` holds ``train/`` and ``val/`` class folders. ``--from`` is the user's local classifier
(rayrcm downloads nothing): the timm ``vit_base_patch16_clip_384`` the authors use (its
``state_dict`` saved with ``torch.save`` loads as is, its 1,000-class head kept), with LoRA r = 4,
alpha = 4 on q and v of every block plus the head (``model.lora_rank``, ``model.lora_alpha``); images at 224 go to the
classifier at 384 (bicubic, ``model.input_resize``). The denoiser factory returns the
guided-diffusion 256x256 unconditional UNet built with the authors' ``Guided_Diffusion_Args``;
the schedule preset is ``imagenet-linear-1000``. Values: sigma 1.00, blr 4e-4 x 128 / 256, per-GPU
batch 16 over 4 GPUs, accum 4, M = 2, lbd 2.0, eps 64/256, K = 1, warm start, 10 epochs (1
warm-up), AdamW, layer decay 0.9, weight decay 0.01 -> 0.1 (the README's flags), min lr 1e-6,
fp16, clip 1.0. ``certify`` certifies ``models:/cadis-imagenet@sigma-1_00`` with N = 10,000 on
one image per class, drawn as the authors draw them (``random.seed(0)``, a shuffle per class).
The seed trains at sigma = 1.0 only; ``--sigma 0.25 | 0.5`` keeps the sigma-1.0 values.
"""

from __future__ import annotations

from _cadis_seed import CERTIFY, IMAGENET, certify_args, commands, finetune_tree

from rayrcm import recipe_cli

REGISTER_AS = "cadis-imagenet"
EXPERIMENT = "rayrcm-cadis-imagenet"
# datasets.py: RandomResizedCrop(224) + flip; tests Resize(256) + CenterCrop(224) (crop_pct 0.875)
DATA = {"name": "imagefolder", "image_size": 224, "augmentation": "weak", "hflip": True, "crop_pct": 224 / 256,
        "num_workers": 8}
# denoiser.py: guided-diffusion 256x256 unconditional, linear T = 1000; the factory is the user's own module
DENOISER = {"denoiser": "adm:my_denoisers:imagenet_uncond", "denoiser_weights": "256x256_diffusion_uncond.pt",
            "denoiser_schedule": "imagenet-linear-1000"}
EXAMPLES = {
    "finetune": "python {prog} finetune --from vit_b16_clip_384.pt --denoiser adm:my_denoisers:imagenet_uncond "
                "--denoiser-weights 256x256_diffusion_uncond.pt --set data.path=DIR",
    "certify": "python {prog} certify --sigma 1.0 --set data_path=DIR",
}


def finetune_tree_for(sigma: float = 1.0, init_from: str = "", **denoiser: str) -> dict:
    return finetune_tree(IMAGENET, sigma=sigma, init_from=init_from, data=DATA, denoiser={**DENOISER, **denoiser},
                         register_as=REGISTER_AS, experiment=EXPERIMENT)


def certify_config(sigma: float = 1.0) -> list[str]:
    return certify_args(REGISTER_AS, sigma, "imagefolder", CERTIFY["imagenet"])


def main(argv: list[str] | None = None) -> None:
    recipe_cli.main(argv, doc=__doc__, commands=commands(examples=EXAMPLES, finetune=finetune_tree_for,
                                                         certify=certify_config))


if __name__ == "__main__":
    main()
