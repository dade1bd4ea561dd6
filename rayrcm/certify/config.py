"""The certification job's typed config: what is certified (:class:`SmoothingConfig`), how fast
(:class:`ComputeConfig`) and the job around them (:class:`CertifyConfig`). Plain frozen dataclasses:
their checks and the protocol recorded with the results are :mod:`rayrcm.certify.protocol`; a
sampling mode's own keys are read by its entry in :mod:`rayrcm.certify.sampling`."""

from __future__ import annotations

from dataclasses import dataclass, field

from rayrcm.sections import TrackingConfig, default_storage

MODES = ("certify", "predict")
CORRUPTED = {"cifar10c": 10, "cifar100c": 100}  # released corruption sets certify reads (dataset -> classes)
DECLINES = ("absolute", "relative")  # how an iss max_decline is measured
SPLITS = ("test", "val")


@dataclass(frozen=True)
class SmoothingConfig:
    """What is certified and how: these values decide the results."""

    sigma: float = 0.25  # noise std in [0, 1] pixel units
    n0: int = 100  # selection draws (certify)
    n: int = 100_000  # estimation draws (certify) or draws (predict)
    alpha: float = 0.001  # failure probability
    seed: int = 0  # noise seed; with chunk and block it fixes every draw
    skip: int = 1
    max: int = -1  # Cohen's --max: stop at this dataset index; -1 = to the end
    indices: tuple[int, ...] = ()  # explicit dataset indices (instead of skip/max)
    chunk: int = 10_000  # draws per row of work (an image is spread over ceil(n / chunk) rows)
    block: int = 100  # noise is drawn in blocks of this many samples; batches are multiples of it
    # fixed: n estimation draws for every image (Cohen et al.); iss: input-specific sample sizes of at
    # most n, chosen from the n0 selection draws (Chen et al., AAAI 2022; rayrcm.certify.iss)
    sampling: str = "fixed"
    max_decline: float = 0.05  # iss: the certified-radius decline allowed against the full n
    decline: str = "absolute"  # iss: max_decline in radius units (absolute) or as a fraction (relative)
    # sequential: the radii decided per image (certified accuracy at each; n is the cap on draws per image);
    # () = 0, 0.25, ... up to what the cap can certify (rayrcm.certify.sequential)
    radii: tuple[float, ...] = ()
    # sequential: settle a radius r as not certified once the interval shows the radius below r + tolerance
    # (0 = only below r); an image whose p_y sits at a threshold then stops long before the cap
    tolerance: float = 0.0


@dataclass(frozen=True)
class ComputeConfig:
    """How fast. None of these changes the noise; ``precision`` changes the base classifier's
    arithmetic (so it is recorded in the protocol), and batch size or memory format can flip an
    argmax only through floating-point differences of the model itself."""

    workers: int = 1  # counting actors (one per GPU with use_gpu)
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    batch: int = 0  # samples per forward pass; 0 = choose the largest useful batch on the device
    precision: str = "fp32"  # fp32 (the published numbers), bf16 or fp16 autocast
    channels_last: bool = False
    flush_every: int = 8  # images per Parquet part written
    sequential_images: int = 32  # sequential: at most this many images a counting actor draws for side by side
    progress_every_s: float = 10.0


@dataclass(frozen=True)
class CertifyConfig:
    model: str = ""  # models:/name@alias, models:/name/3, runs:/<id>/model, a run id, or a model.pt path
    mode: str = "certify"
    dataset: str = ""  # default: the dataset the model was trained on
    data_path: str = ""  # default: the model's training data path
    split: str = "test"
    # the released CIFAR-10-C / CIFAR-100-C files (dataset cifar10c / cifar100c, data_path their folder):
    # the images of one corruption at one severity, in the order of the files
    corruption: str = ""
    severity: int = 0
    name: str = ""  # job name (results folder and MLflow run); rerunning it resumes
    out_dir: str = field(default_factory=lambda: default_storage("certify"))
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment=""))  # "" = the model's experiment
    # denoised smoothing (DDS): a rayrcm denoiser model file (export kind "denoiser", a ddpm run's model.pt),
    # referenced like ``model``; the job certifies model(denoiser(x + sigma z, sigma)). "" = no denoiser
    denoiser: str = ""
    # certifying on a dataset other than the model's training set (other than its corrupted copies) is refused
    # unless its labels mean the same classes: say so with same_classes=true
    same_classes: bool = False
    # modules or .py files imported by the driver and every counting actor (an export kind, a dataset);
    # not part of the protocol: they make results possible, they do not change them
    plugins: tuple[str, ...] = ()
