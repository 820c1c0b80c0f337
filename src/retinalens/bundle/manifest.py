"""The bundle manifest as a typed, versioned object: the only code that knows manifest keys.

`manifest.json` is validated against `manifest.schema.json` (shipped with the package, as MONAI
bundles ship theirs) before anything reads it, then parsed into the dataclasses below. Every other
module reads a bundle through these attributes (`bundle.manifest.calibration.temperature`, ...),
never through dictionary keys, so a field is renamed or checked in one place. The parsed object
keeps the validated document it came from, so `to_dict()` writes back exactly what was read
(free-form sections such as metrics survive untouched).

`parse` reads manifest.json's bytes before the schema sees them: at most MAX_BYTES, numbers finite
(JSON has no NaN; Python's reader would take `NaN`, `Infinity` or `1e999`, and a NaN passes every
schema bound), nesting at most MAX_DEPTH deep (a 200k-deep document would exhaust the stack).

Format history: 1 = the first bundle format; 2 = cross-validated selection (`training.cv`, and
`validation` / `calibration` may come from out-of-fold predictions, `validation.source` says). A
format-1 manifest reads as before (no `cv`; validation from the one validation split).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from ..data.transforms import Preprocessing
from ..errors import RetinaLensError
from ..models.heads import HeadConfig

FORMAT = 2
SCHEMA_FILE = "manifest.schema.json"
MAX_BYTES = 4 * 1024 * 1024  # a trained model's manifest is a few kB (the split hashes are in splits.json)
MAX_DEPTH = 32  # RetinaLens writes 6 levels
REFERRAL_LEVELS = ("urgent", "routine", "observation")


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The JSON Schema every manifest must satisfy (read once from the package)."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text())


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    timm_name: str
    weights_sha256: str
    weights_source: str
    preprocessing: Preprocessing

    @property
    def label(self) -> str:
        """`efficientnet_lite0`, with the part of the two-view input it reads (`... view band`)."""
        view = self.preprocessing.view
        return self.name if view == "whole" else f"{self.name} view {view}"


@dataclass(frozen=True)
class Member:
    """One network of the bundle: a backbone and a head, with the temperature on its own softmax.

    A bundle's members are averaged in probability space (bundle/network.py's Ensemble); a bundle
    without a `members` list has one member, its top-level backbone and head, with no temperature of
    its own (the bundle's calibration is then that member's)."""

    backbone: BackboneInfo
    precision: str
    feature_shape: tuple[int, int, int]
    head: HeadConfig
    temperature: float | None
    backbone_file: str
    head_file: str
    details: dict[str, Any]  # how it was trained (seed) and how it scored alone on validation


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling (trust/calibration.py): the temperature, and what fitting measured."""

    temperature: float
    fitted_on: str
    details: dict[str, Any]  # method, n_images, NLL and ECE before / after


@dataclass(frozen=True)
class ReferralThreshold:
    """The referral operating point: refer when P(positive classes) >= threshold."""

    threshold: float
    target_sensitivity: float
    val_sensitivity: float | None
    val_specificity: float | None
    positive_classes: tuple[str, ...]


@dataclass(frozen=True)
class GateSpec:
    """The quality gate (trust/gate.py): ordered checks, and the file with the feature distribution."""

    checks: tuple[dict[str, Any], ...]
    features_file: str | None
    details: dict[str, Any]  # how it was fitted and how it did on validation


@dataclass(frozen=True)
class CrossValidation:
    """How the head and its hyperparameters were chosen by k-fold CV inside the training data (train/cv.py)."""

    k: int
    folds: tuple[dict[str, Any], ...]  # per fold: n_images, n_patients, per_class, patients_sha256
    digest: str  # sha256 over the folds' patient digests: equal digests, equal folds
    candidates: tuple[dict[str, Any], ...]  # per candidate: name, accuracy_mean, accuracy_sd, fold_accuracy, oof_nll, ...
    chosen: str  # the chosen candidate's name
    by: str  # the rule
    refit: dict[str, Any]  # what the final model was refitted with (n_images, epochs or C)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrossValidation:
        return cls(int(d["k"]), tuple(d["folds"]), str(d["digest"]), tuple(d["candidates"]), str(d["chosen"]),
                   str(d.get("by", "")), dict(d.get("refit") or {}))

    def candidate(self, name: str | None = None) -> dict[str, Any]:
        """One candidate's CV record (default: the chosen one)."""
        want = name or self.chosen
        return next(c for c in self.candidates if c["name"] == want)


@dataclass(frozen=True)
class Training:
    """What the model was trained on and how it was chosen (all optional: hand-made bundles lack them)."""

    data: str | None = None
    layout: str | None = None
    mode: str | None = None
    splits: dict[str, Any] = field(default_factory=dict)  # per split: n_images, n_patients, per_class; "removed"
    best_epoch: int | None = None
    epochs_run: int | None = None
    extract_failures: int | None = None
    screened: tuple[dict[str, str], ...] = ()  # {path, reason}: left out by the gate's floors before splitting
    head_selection: dict[str, Any] | None = None
    baseline: dict[str, float] | None = None  # the logistic-regression baseline on the same split
    config: dict[str, Any] | None = None  # the run's config, as config.json holds it
    cv: CrossValidation | None = None  # cross-validated selection (format 2; None: one validation split)
    ensemble: dict[str, Any] | None = None  # train/ensemble.py: EnsembleConfig's fields and n_members


@dataclass(frozen=True)
class Lineage:
    version: int = 1
    parent: dict[str, Any] | None = None  # {path, manifest_sha256, version} of the bundle retrained
    feedback: dict[str, Any] | None = None  # {images_added, left_out}


@dataclass(frozen=True)
class Manifest:
    format: int
    created: str
    task: str
    classes: tuple[str, ...]
    referral: dict[str, str | None]
    positive_classes: tuple[str, ...]
    backbone: BackboneInfo
    precision: str
    feature_shape: tuple[int, int, int]
    head: HeadConfig
    training: Training
    validation: dict[str, Any]  # validation metrics with CIs (n_images, accuracy, ...)
    metrics: dict[str, Any]
    lineage: Lineage
    library_versions: dict[str, str]
    files: dict[str, str]  # file name -> sha256, checked on load
    calibration: Calibration | None = None
    referral_threshold: ReferralThreshold | None = None
    gate: GateSpec | None = None
    members: tuple[Member, ...] = ()  # empty: one network, the top-level backbone and head
    tta: tuple[str, ...] = ("identity",)  # test-time views, each through every member (bundle/network.py)
    _document: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- reading ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        """Validate a parsed manifest.json and build the typed manifest; one RetinaLensError otherwise."""
        validate(d, where)
        bb, feats, cal, gate = d["backbone"], d["features"], d.get("calibration"), d.get("gate")
        ref = (d.get("thresholds") or {}).get("referral")
        tr = d.get("training") or {}
        lin = d.get("lineage") or {}
        try:
            return cls(
                format=d["format"], created=d.get("created", ""), task=d.get("task", "classes"),
                classes=tuple(d["classes"]), referral=dict(d.get("referral") or {}),
                positive_classes=tuple(d.get("positive_classes",
                                             [c for c, lv in (d.get("referral") or {}).items() if lv == "urgent"])),
                backbone=_backbone_info(bb),
                precision=feats["precision"], feature_shape=tuple(feats["feature_shape"]),  # type: ignore[arg-type]
                head=HeadConfig.from_dict(d["head"]),
                training=Training(tr.get("data"), tr.get("layout"), tr.get("mode"), dict(tr.get("splits") or {}),
                                  tr.get("best_epoch"), tr.get("epochs_run"), tr.get("extract_failures"),
                                  tuple(tr.get("screened") or ()), tr.get("head_selection"), tr.get("baseline_logistic_regression"), tr.get("config"),
                                  CrossValidation.from_dict(tr["cv"]) if tr.get("cv") else None, tr.get("ensemble")),
                validation=dict(d.get("validation") or {}), metrics=dict(d.get("metrics") or {}),
                lineage=Lineage(int(lin.get("version", 1)), lin.get("parent"), lin.get("feedback")),
                library_versions=dict(d.get("library_versions") or {}), files=dict(d["files"]),
                calibration=Calibration(float(cal["temperature"]), cal.get("fitted_on", "validation"),
                                        {k: v for k, v in cal.items() if k not in ("temperature", "fitted_on")})
                if cal else None,
                referral_threshold=ReferralThreshold(float(ref["threshold"]), float(ref["target_sensitivity"]),
                                                     ref.get("val_sensitivity"), ref.get("val_specificity"),
                                                     tuple(ref["positive_classes"])) if ref else None,
                gate=GateSpec(tuple(gate["checks"]), (gate.get("features") or {}).get("file"),
                              {k: v for k, v in gate.items() if k != "checks"}) if gate else None,
                members=tuple(_member(m) for m in d.get("members") or ()),
                tta=tuple((d.get("tta") or {}).get("views") or ("identity",)),
                _document=copy.deepcopy(d),
            )
        except (KeyError, TypeError, ValueError) as exc:  # the schema should have caught it; say so plainly
            raise RetinaLensError(f"{where}: unreadable bundle manifest ({type(exc).__name__}: {exc})") from None

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (what manifest.json holds)."""
        return copy.deepcopy(self._document)

    # -- derived ----------------------------------------------------------------------------------

    def ensemble(self) -> tuple[Member, ...]:
        """The networks whose probabilities the bundle averages: its members, or its one network."""
        if self.members:
            return self.members
        return (Member(self.backbone, self.precision, self.feature_shape, self.head, None, "backbone.safetensors",
                       "head.safetensors", {}),)

    @property
    def is_ensemble(self) -> bool:
        """More than one network, or more than one view: predictions average several passes."""
        return len(self.members) > 1 or len(self.tta) > 1

    def level(self, label: str | None) -> str | None:
        """The referral level of a class (None for an unknown or unmapped class)."""
        return self.referral.get(label) if label else None


def _backbone_info(bb: dict[str, Any]) -> BackboneInfo:
    return BackboneInfo(bb["name"], bb.get("timm_name", bb["name"]), bb["weights_sha256"], bb.get("weights_source", ""),
                        Preprocessing.from_dict(bb["preprocessing"]))


def _member(m: dict[str, Any]) -> Member:
    t = m.get("temperature")
    return Member(_backbone_info(m["backbone"]), m["features"]["precision"], tuple(m["features"]["feature_shape"]),
                  HeadConfig.from_dict(m["head"]), None if t is None else float(t), m["files"]["backbone"],
                  m["files"]["head"], {k: v for k, v in m.items() if k not in ("backbone", "features", "head",
                                                                                "temperature", "files")})


def parse(raw: bytes, where: str = "manifest") -> Any:
    """manifest.json's bytes to JSON data, refusing what no RetinaLens wrote (see the module's notes)."""
    if len(raw) > MAX_BYTES:
        raise RetinaLensError(f"{where}: unreadable bundle manifest (over {MAX_BYTES // 2**20} MiB)")
    try:
        d = json.loads(raw, parse_constant=_not_finite, parse_float=_finite_float)
    except RecursionError:
        raise RetinaLensError(f"{where}: unreadable bundle manifest (nested too deep)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RetinaLensError(f"{where}: unreadable bundle manifest ({exc})") from None
    if _depth(d) > MAX_DEPTH:
        raise RetinaLensError(f"{where}: unreadable bundle manifest (nested over {MAX_DEPTH} levels deep)")
    return d


def _not_finite(token: str) -> float:
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token} is out of range")
    return value


def _depth(d: Any) -> int:
    """How deeply arrays and objects nest (iterative: a deep document must not exhaust the stack here)."""
    deepest, stack = 0, [(d, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if deepest > MAX_DEPTH:
                break
            stack.extend((v, level + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def validate(d: Any, where: str = "manifest") -> None:
    """Check a parsed manifest.json against the shipped schema (bounds included)."""
    import jsonschema

    if not isinstance(d, dict):
        raise RetinaLensError(f"{where}: unreadable bundle manifest (not a JSON object)")
    fmt = d.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT:
        raise RetinaLensError(f"{where}: bundle format {fmt} is newer than this RetinaLens understands ({FORMAT})")
    try:
        jsonschema.validate(d, schema())
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise RetinaLensError(f"{where}: unreadable bundle manifest (at {path}: {exc.message})") from None
    classes = set(d["classes"])
    ref = (d.get("thresholds") or {}).get("referral") or {}
    positives = [*d.get("positive_classes", []), *ref.get("positive_classes", [])]
    if (len(classes) != len(d["classes"]) or not set(positives) <= classes
            or ("referral" in d and set(d["referral"]) != classes)):
        raise RetinaLensError(f"{where}: unreadable bundle manifest (classes, referral and positive classes "
                              "do not agree: each class once, a referral level for each, positives among them)")
    cv = (d.get("training") or {}).get("cv") if isinstance(d.get("training"), dict) else None
    if cv and cv["chosen"] not in {c["name"] for c in cv["candidates"]}:
        raise RetinaLensError(f"{where}: unreadable bundle manifest (training.cv chose {cv['chosen']!r}, which is not "
                              "among its candidates)")
    features_file = ((d.get("gate") or {}).get("features") or {}).get("file")
    if features_file and features_file not in d["files"]:
        raise RetinaLensError(f"{where}: unreadable bundle manifest (the gate's {features_file} is not among its "
                              "hashed files)")
    _validate_members(d, where)


def _validate_members(d: dict[str, Any], where: str) -> None:
    """An ensemble's members: every file hashed and used once, the first member the top-level network
    (what single-model readers see), and one input for all (the same pixels: size, resampling, resize;
    each member normalises with its own mean and std)."""
    members = d.get("members") or []
    views = (d.get("tta") or {}).get("views") or ["identity"]
    problem = None
    if views[0] != "identity":
        problem = "the first test-time view must be 'identity' (the gate reads its features)"
    elif views != ["identity"] and d["backbone"]["preprocessing"].get("resize", "squash") != "squash":
        problem = "test-time views (flip, crop) take a squashed input only"
    elif members:
        names = [m["files"][k] for m in members for k in ("backbone", "head")]
        first, pp = members[0], d["backbone"]["preprocessing"]
        same_input = ("size", "interpolation", "resize")
        if len(set(names)) != len(names) or not set(names) <= set(d["files"]):
            problem = "each member's files must be distinct and among its hashed files"
        elif (first["files"] != {"backbone": "backbone.safetensors", "head": "head.safetensors"}
              or first["backbone"]["weights_sha256"] != d["backbone"]["weights_sha256"]):
            problem = "the first member must be the bundle's own backbone.safetensors and head.safetensors"
        elif any({k: m["backbone"]["preprocessing"].get(k) for k in same_input} != {k: pp.get(k) for k in same_input}
                 for m in members):
            problem = "every member must take the same input (size, interpolation, resize) as the bundle"
    if problem:
        raise RetinaLensError(f"{where}: unreadable bundle manifest ({problem})")
