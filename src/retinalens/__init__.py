"""RetinaLens: deep-learning triage of retinal images.

    import retinalens
    model = retinalens.load("bundle")            # a trained model bundle
    model.predict("scan.jpeg")                   # {"label", "probabilities", "referral", ...}
    model.predict_many(["folder/", "https://..."])
    model.evaluate("OCT2017", split="test", report_path="report.html")

    bundle = retinalens.train("OCT2017", out="bundle")            # discover, split, extract, train
    retinalens.extract("OCT2017", backbone="inception_v3")        # just the feature cache

Most public names are imported on first use. `train`, `extract` and `evaluate` are bound now: they
share their names with the subpackages that implement them, and importing a subpackage would
otherwise shadow the function.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import ImageDecodeError, RetinaLensError

from .api import evaluate, extract, train  # noqa: E402  (after the subpackages they shadow)

__version__ = "0.1.0"

_LAZY = {
    "load": "retinalens.predict.model",
    "Model": "retinalens.predict.model",
    "create_backbone": "retinalens.models.registry",
    "list_backbones": "retinalens.models.registry",
    "create_head": "retinalens.models.heads",
    "HeadConfig": "retinalens.models.heads",
    "load_bundle": "retinalens.models.bundle",
    "decode_image": "retinalens.data.decode",
    "Preprocessing": "retinalens.data.transforms",
    "discover": "retinalens.data.discover",
    "make_splits": "retinalens.data.splits",
    "SplitConfig": "retinalens.data.splits",
    "TrainConfig": "retinalens.train.trainer",
    "RunConfig": "retinalens.train.pipeline",
    "ImageTrainConfig": "retinalens.train.images",
    "ExtractConfig": "retinalens.train.pipeline",
    "FeatureCache": "retinalens.features.cache",
    "classification_metrics": "retinalens.evaluate.metrics",
    "Explainer": "retinalens.explain.explainer",
    "export_bundle": "retinalens.export.formats",
    "OnnxModel": "retinalens.export.runtime",
}

__all__ = ["ImageDecodeError", "RetinaLensError", "__version__", "evaluate", "extract", "train", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retinalens' has no attribute {name!r}")
