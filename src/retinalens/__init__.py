"""RetinaLens: deep-learning triage of retinal images.

    import retinalens
    model = retinalens.load("bundle")            # a trained model bundle
    model.predict("scan.jpeg")                   # {"label", "probabilities", "referral", ...}
    model.predict_many(["folder/", "https://..."])
    retinalens.evaluate("bundle", "OCT2017", split="test", report_path="report.html")

    bundle = retinalens.train("OCT2017", out="bundle")            # discover, split, extract, train
    retinalens.extract("OCT2017", backbone="inception_v3")        # just the feature cache
    retinalens.predict("bundle", ["scan.jpeg"], csv_path="p.csv")  # = retinalens predict

One function per command (retinalens.api): extract, train, evaluate, report, predict, explain, export,
serve, retrain, prepare_fundus, demo, backbones. Every public name is imported on first use:
`import retinalens` (and `retinalens --help`) loads no torch. The API functions stay functions also
after a subpackage of the same name (retinalens/train, /evaluate, /predict, /explain, /export, /serve,
/demo) is imported: see _Package.
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import ImageDecodeError, RetinaLensError

if TYPE_CHECKING:
    from .api import (backbones, demo, evaluate, explain, export, extract, predict, predict_volumes,  # noqa: F401
                      prepare_fundus, report, retrain, serve, train)

# The API functions: one per command, several named like the subpackages that implement them.
_API = ("extract", "train", "evaluate", "report", "predict", "predict_volumes", "explain", "export", "serve",
        "retrain", "prepare_fundus", "demo", "backbones")

_LAZY = {
    **dict.fromkeys(_API, "retinalens.api"),
    "run_demo": "retinalens.cli.demo",
    "load": "retinalens.predict.model",
    "Model": "retinalens.predict.model",
    "create_backbone": "retinalens.models.registry",
    "list_backbones": "retinalens.models.registry",
    "create_head": "retinalens.models.heads",
    "HeadConfig": "retinalens.models.heads",
    "load_bundle": "retinalens.bundle.store",
    "decode_image": "retinalens.data.decode",
    "Preprocessing": "retinalens.data.transforms",
    "discover": "retinalens.data.discover",
    "make_splits": "retinalens.data.splits",
    "SplitConfig": "retinalens.config",
    "TrainConfig": "retinalens.train.trainer",
    "RunConfig": "retinalens.train.pipeline",
    "ImageTrainConfig": "retinalens.config",
    "ExtractConfig": "retinalens.config",
    "ExtractOptions": "retinalens.config",
    "EvaluateConfig": "retinalens.config",
    "FeatureCache": "retinalens.features.cache",
    "classification_metrics": "retinalens.evaluate.metrics",
    "Explainer": "retinalens.explain.explainer",
    "export_bundle": "retinalens.export.formats",
    "OnnxModel": "retinalens.export.runtime",
}

__all__ = ["ImageDecodeError", "RetinaLensError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # imported once: from now on a plain attribute
        return value
    raise AttributeError(f"module 'retinalens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(ModuleType):
    """The `retinalens` module's class: it keeps the API functions where the import system would shadow them.

    Importing a submodule sets it as an attribute of its parent package: `import retinalens.train.pipeline`
    does `setattr(retinalens, "train", <module retinalens.train>)`, which would turn `retinalens.train(...)`
    into "module is not callable". That one assignment (a module, to an API name) is refused. Nothing is
    lost: the subpackage stays in sys.modules, where every import statement, importlib.import_module and
    mock.patch("retinalens.train.pipeline.X") look it up; only attribute chains through the name
    (`import retinalens.train.pipeline as p`, monkeypatch's "retinalens.train.pipeline.X" strings) still
    meet the function, as they did when the functions were bound eagerly: use `from retinalens.train
    import pipeline` or the module object there."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
