"""The options of `extract`, `train` and `evaluate`, each default written once: in these dataclasses.

The CLI builds its options from these fields' defaults (so `--help` shows them) and the Python API
passes None for "not given", which leaves the field's default in place (train.pipeline's
build_run_config). A bundle's config.json is `asdict(RunConfig)`.

The bottom layer of the package: it imports only the standard library, so that `retinalens --help`
stays cheap, and every layer may read a default here. The two configs that hold a HeadConfig (models,
a layer above, with torch) are completed above: TrainConfig (train/trainer.py) is TrainConfigBase plus
the head, RunConfig (train/pipeline.py) is RunConfigBase plus that TrainConfig.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

# --epochs when not given, by mode: a head on cached features is cheap to train long (early stopping
# ends it); an epoch on images costs a pass through the backbone.
MODE_EPOCHS = {"bottleneck": 60, "frozen": 20, "finetune": 15, "scratch": 30}
# --cv when not given (None): CV_AUTO_FOLDS folds in bottleneck mode when the training data (every
# image but the test split) hold at most CV_AUTO_MAX_IMAGES images, where one validation split is small
# enough to be noise and k head fits on cached features cost seconds; else one validation split. The
# image modes default to one validation split (k trainings on images would cost k times the minutes).
CV_AUTO_FOLDS = 5
CV_AUTO_MAX_IMAGES = 5000
AUTO_HEAD = "auto"  # train's --head: conv and logreg both (bottleneck), or each image mode's own head
AUTO_RESIZE = "auto"  # train's --resize: the two-view input for OCT B-scans where it fits, else the squash
DEMO_OUT = "demo-out"  # demo's --out: the cache, bundle, report and predictions of the bundled sample
EXPLAIN_OUT = "heatmaps"  # explain's --out: the folder of the overlay PNGs


@dataclass
class ExtractConfig:
    backbone: str = "efficientnet_lite0"  # the registry's DEFAULT_BACKBONE (tests/test_config.py checks)
    weights: str | None = None  # a local weights file instead of the registry's default
    pretrained: bool = True  # False: random weights (timing only)
    precision: str = "auto"  # auto = bf16 where the CPU/GPU has fast bf16, else fp32
    batch_size: int = 16  # measured best on a 2-core CPU for both default backbones (bf16)
    chunk_size: int = 256
    workers: int = 0  # 0: decode in threads between backbone calls; N: N decoding processes
    cache: str | None = None
    # Pixels a side fed to the backbone (the same resize and normalisation, recorded in the bundle's
    # preprocessing). None: the backbone's own (the registry's: Lite0 224), for OCT and fundus alike: a
    # larger input did not beat it on the fundus cross-validation (benchmarks/bench_fundus_cv.py).
    input_size: int | None = None
    # How a scan becomes the input (data/transforms.RESIZES): "squash", the whole image to size x size;
    # "squash+band" (OCT), the squash and the retinal band in 3 aspect-kept tiles beside it, size x 4 size
    # (data/retinal_band.py; README "The two-view input"): `train` makes it an ensemble of one network per
    # view (train/ensemble.py), bottleneck members only. "auto" (train only; saved resolved): squash+band
    # for OCT B-scans where the run can take it, as it won on train's own folds; squash otherwise
    # (train/pipeline.resolve_resize).
    resize: str = AUTO_RESIZE
    view: str = "whole"  # the part of the input a network reads; set per member by train/ensemble.py


# --input-size bounds: below 64 px the stride-32 backbones give a 2x2 map; above 1024 px one photo's
# activations take gigabytes on a CPU and no fundus lesion needs it.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 64, 1024


@dataclass
class ExtractOptions:
    """What `extract` chooses beyond ExtractConfig (a train run decides these itself)."""

    spatial: bool = True  # also store the spatial maps (the conv head needs them)
    shard: tuple[int, int] = (0, 1)  # (K, N): only the images whose sha256 falls in share K of N


ENGINES = ("local", "ray")  # --engine of extract and predict


@dataclass
class EngineConfig:
    """`--engine`: what runs extraction and batch prediction. `ray` is a Ray Data pipeline on a Ray
    cluster (the `distributed` extra): decoding in Ray tasks, the model in an actor pool."""

    engine: str = "local"  # one of ENGINES
    address: str | None = None  # Ray: None starts a local instance (or joins $RAY_ADDRESS); "auto" or host:port
    workers: int = 0  # Ray: model actors, one model each; 0: from 1 up to the cluster's GPUs (else CPUs)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    threads: int = 0  # torch threads per actor; 0: the whole CPUs it reserved (at least 1)


@dataclass
class SplitConfig:
    val_fraction: float = 0.15
    test_fraction: float = 0.15  # used only when the dataset brings no test split
    seed: int = 0


@dataclass
class EnsembleConfig:
    """`train --ensemble/--seeds/--tta`: several networks in one bundle, averaged in probability space.
    Every member (a backbone, bottleneck or trained on images) is trained once per seed, on the same split
    or folds; all take the first backbone's input."""

    backbones: tuple[str, ...] = ()  # empty: the run's --backbone alone; "NAME:finetune" (or ":frozen") trains on images
    seeds: tuple[int, ...] = ()  # empty: the run's --seed alone
    tta: tuple[str, ...] = ("identity",)  # test-time views, identity first: flip, crop (bundle/network.py)
    # An image-mode member trains exactly this many epochs (no early stopping under cross-validation), in
    # batches of member_batch_size: the fine-tune measured on the OCT folds (bench_finetune_ablation.py `longer`).
    member_epochs: int = 8
    member_batch_size: int = 32


@dataclass
class TrainConfigBase:
    """TrainConfig but its head: how a head is trained."""

    epochs: int = MODE_EPOCHS["bottleneck"]
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_patience: int = 5  # epochs without improvement before the LR is halved
    lr_factor: float = 0.5
    min_lr: float = 5e-5
    early_stopping: int = 15  # epochs without improvement before training stops (0 = never)
    monitor: str = "val_loss"  # or "val_acc": picks the best epoch and drives the LR schedule
    class_weights: bool = False  # weight the loss by inverse class frequency (= --balance weights)
    precision: str = "auto"  # bf16 autocast where the CPU/GPU has bf16 units (2x faster conv head)
    seed: int = 0


@dataclass
class ImageTrainConfig:
    """What training on images adds to TrainConfig (whose epochs, lr, schedule and seed it uses)."""

    unfreeze: int = 2  # finetune: the last N parameter groups of the backbone train
    backbone_lr_scale: float = 0.1  # finetune: their learning rate, relative to the head's
    warmup_epochs: int = 1  # finetune: head-only epochs first (classic), or the linear LR warm-up (adamw-ema)
    recipe: str = "classic"  # finetune: a recipe of train/recipes.py (RECIPES)
    batchnorm: str = "frozen"  # finetune: frozen (ImageNet statistics) | reestimate (on the training images first)
    augment: str = "auto"  # auto (fundus for DR tasks, else the recipe's OCT one: oct, oct-scan) | oct | oct-scan | fundus | none
    oversample: bool = False  # fill minority classes with rotated / mirrored copies (= --balance oversample)
    workers: int = 0  # decoding processes (0: threads)
    device: str = "auto"  # auto: CUDA when present


@dataclass
class RunConfigBase:
    """RunConfig but its TrainConfig: everything else a `train` run was given."""

    data: str
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    patient_regex: str | None = None
    images_dir: str | None = None
    task: str | None = None  # None: the labels as they are (OCT classes); "referable" or "grade": DR grades 0-4
    mode: str = "bottleneck"  # bottleneck | frozen | finetune | scratch
    images: ImageTrainConfig = field(default_factory=ImageTrainConfig)
    resume: bool = False  # image modes: continue from the checkpoint of an interrupted run
    target_sensitivity: float = 0.95  # the referral threshold is the highest reaching this on validation
    cv: int | None = None  # folds of cross-validated selection; 0 or 1: one validation split; None: auto (above)
    # A key file: sign the bundle (signature.json). None: the key $RETINALENS_BUNDLE_KEY names, if any. Saved
    # as None in the bundle's config.json (a retrain signs with the key configured then), and no part of
    # what a resumed run must share.
    sign_key: str | None = None


@dataclass
class EvaluateConfig:
    """`evaluate` and `report`: which split, how many bootstrap resamples for the CIs."""

    split: str | None = "test"  # a dataset root's split; None (or a plain class-folder tree): all of DATA
    n_boot: int = 1000
    include_training: bool = False  # also score images the bundle was trained or validated on


@dataclass(frozen=True)
class VolumeConfig:
    """OCT volumes (`predict --volumes`, `evaluate --volumes`, the web app): how B-scans are grouped and
    how a volume's answer is drawn from its slices (predict/volume.py states the rule)."""

    group_by: str = "patient"  # patient (Kermany names: CLASS-PATIENT-N) | folder (one acquisition per folder)
    #                            | series (DICOM B-scans: SeriesInstanceUID, one acquisition; other files by folder)
    min_positive_slices: int = 1  # the volume refers when at least this many gradable slices pass the threshold
    min_gradable_fraction: float = 0.5  # fewer gradable slices than this share: the volume is ungradable
    n_suspicious: int = 3  # the most suspicious B-scans reported (with heat maps)


def default(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name` (a default_factory is called)."""
    f = next((f for f in fields(cls) if f.name == name), None)
    if f is None:
        raise AttributeError(f"{cls.__name__} has no field {name!r}")
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default")


def given(**kw: Any) -> dict[str, Any]:
    """The keyword arguments that were given: None means "the default", so it is left out."""
    return {k: v for k, v in kw.items() if v is not None}


def str_or_none(path: str | Path | None) -> str | None:
    """A path for a config field (config.json holds strings); None or "" stays None."""
    return str(path) if path else None
