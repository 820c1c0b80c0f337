"""Python functions that mirror the CLI commands one to one (`retinalens train` = `retinalens.train`).

One function per command, each a thin call into the module that does the work. An option left out
(or None) takes its default from the dataclasses of retinalens/config.py, the same default the CLI
shows in `--help` (each one is written there and nowhere else), or else from the implementing
function's own signature. The functions return what the command prints; the CLI adds the printing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._io import atomic_write_bytes, atomic_write_json
from .bundle.store import Bundle, load_bundle
from .config import (DEMO_OUT, EXPLAIN_OUT, EnsembleConfig, EvaluateConfig, ExtractConfig, ExtractOptions, VolumeConfig,
                     given,
                     str_or_none)
from .data.fundus.prepare import PrepareReport
from .data.hashing import sha256_files
from .demo import DEMO_DATA
from .engines import engine_config
from .errors import RetinaLensError
from .features.cache import FeatureCache
from .features.extract import ExtractReport, extract_features, open_cache
from .models.registry import BackboneSpec, create_backbone, list_backbones, resolve_precision
from .predict.model import Model, load
from .predict.parquet import write_predictions_parquet
from .predict.table import predictions_csv
from .train.pipeline import build_run_config, train_bundle

NAME_MAX = 255  # bytes in a file name, on every common file system
_SAFE = re.compile(r"[^\w.-]+")  # what may stay in a file name built from an input name or a class


def extract(data: str | Path, *, backbone: str | None = None, weights: str | Path | None = None,
            pretrained: bool | None = None, cache: str | Path | None = None, precision: str | None = None,
            batch_size: int | None = None, workers: int | None = None, shard: tuple[int, int] | None = None,
            spatial: bool | None = None, patient_regex: str | None = None, images_dir: str | Path | None = None,
            engine: str | None = None, address: str | None = None, ray_workers: int | None = None,
            resize: str | None = None, progress: bool = False) -> tuple[FeatureCache, ExtractReport]:
    """`retinalens extract`: cache the features of every image of a dataset (defaults: ExtractConfig's,
    ExtractOptions' and EngineConfig's). engine "ray": on a Ray cluster (`address`), into the same cache.
    `resize` as train's (auto: what a default train of DATA reads, so OCT scans' two views, one cache
    each); returns the first view's cache, and the other views' extraction among the report's notes."""
    from .data.transforms import VIEWS
    from .train.ensemble import two_view_fits
    from .train.pipeline import RunConfig, resolve_resize
    from .train.selection import find_data

    run_on = engine_config(engine, address, ray_workers)
    x = ExtractConfig(**given(backbone=backbone, weights=str_or_none(weights), pretrained=pretrained,
                              cache=str_or_none(cache), precision=precision, batch_size=batch_size, workers=workers,
                              resize=resize))
    o = ExtractOptions(**given(shard=shard, spatial=spatial))
    run = RunConfig(data=str(data), extract=x, **given(patient_regex=patient_regex, images_dir=str_or_none(images_dir)))
    ds = find_data(run)  # as train finds them
    x = resolve_resize(run, two_view_fits(run, EnsembleConfig()), ds.classes).extract
    prec = resolve_precision(x.precision)
    paths = [s.path for s in ds.samples]
    hashes = sha256_files(paths)
    caches, reports = [], []
    for view in VIEWS[x.resize]:  # ("whole",) for the squash; a cache per view, as train's members read them
        bb = create_backbone(x.backbone, weights=x.weights, pretrained=x.pretrained, resize=x.resize, view=view)
        caches.append(open_cache(x.cache, bb, prec, spatial=o.spatial))
        if run_on.engine == "ray":
            from .engines.ray_extract import extract_features_ray

            reports.append(extract_features_ray(paths, hashes, bb, caches[-1], engine=run_on, precision=prec,
                                                batch_size=x.batch_size, chunk_size=x.chunk_size, shard=o.shard,
                                                weights=x.weights, pretrained=x.pretrained, progress=progress))
        else:
            reports.append(extract_features(paths, hashes, bb, caches[-1], precision=prec, batch_size=x.batch_size,
                                            chunk_size=x.chunk_size, workers=x.workers, shard=o.shard,
                                            progress=progress))
    report = reports[0]
    report.notes += [f"view {view} of the {x.resize} input: extracted {r.n_extracted} image(s) at {r.images_per_s:.1f} "
                     f"img/s, {r.n_cached} already cached, into {c.dir}"
                     for view, c, r in zip(VIEWS[x.resize][1:], caches[1:], reports[1:])]
    report.failures += [(d["path"], d["reason"]) for d in ds.skipped]  # a FIFO, a folder named *.jpeg, ...
    return caches[0], report


def train(data: str | Path, out: str | Path, *, progress: bool = False, ensemble: str | Sequence[str] | None = None,
          seeds: str | Sequence[int] | None = None, tta: str | Sequence[str] | None = None,
          member_epochs: int | None = None, **options: Any) -> Bundle | None:
    """`retinalens train`, option for option: `options` are train.pipeline.build_run_config's (mode,
    backbone, head, epochs, balance, ..., and further TrainConfig fields such as lr or batch_size);
    `ensemble` (backbones, each `NAME` or `NAME:finetune`), `seeds` and `tta` (views) make one bundle of
    several networks (train/ensemble.py; lists or the CLI's comma-separated strings); `member_epochs`: the
    epochs of each `NAME:finetune` member. Under torchrun, ranks other than 0
    return None: rank 0 writes the bundle."""
    from .train.ensemble import ensemble_config, train_ensemble

    ens = ensemble_config(ensemble, seeds, tta, member_epochs)
    cfg = build_run_config(data, **options)
    if ens == EnsembleConfig() and cfg.extract.resize == "squash":  # one network, seen once (the two-view
        # input, --resize squash+band or auto on OCT, is a network per view: an ensemble, train/ensemble.py)
        return train_bundle(cfg, out, progress=progress)
    return train_ensemble(cfg, ens, out, progress=progress)


def evaluate(bundle: str | Path | Bundle, data: str | Path, *, progress: bool = False,
             **options: Any) -> dict[str, Any]:
    """`retinalens evaluate`: metrics with CIs (options: evaluate.run.evaluate_bundle's: split, cache,
    json_path, report_path, n_boot, workers, patient_regex, images_dir; `split` and `n_boot` default to
    EvaluateConfig's). The one way to evaluate a bundle."""
    from .evaluate.run import evaluate_bundle

    return evaluate_bundle(bundle if isinstance(bundle, Bundle) else load_bundle(bundle), data, progress=progress,
                           **(asdict(EvaluateConfig()) | options))


def report(bundle: str | Path | Bundle, data: str | Path, out: str | Path, *, progress: bool = False,
           **options: Any) -> dict[str, Any]:
    """`retinalens report`: evaluate and write the full HTML report to `out`; returns the metrics."""
    return evaluate(bundle, data, report_path=out, progress=progress, **options)


def predict(bundle: str | Path | Bundle | Model, inputs: str | Path | Sequence[str | Path], *,
            json_path: str | Path | None = None, csv_path: str | Path | None = None, out: str | Path | None = None,
            batch_size: int | None = None, workers: int | None = None, runtime: str | None = None,
            threads: int | None = None, engine: str | None = None, address: str | None = None,
            ray_workers: int | None = None, progress: bool = False,
            keep_identifiers: bool = False) -> list[dict[str, Any]]:
    """`retinalens predict`: one result per image (`load(bundle).predict_many`), written as JSON, CSV
    and/or Parquet (`out`, predict/parquet.py) when asked. Bad inputs get {"input", "error"}; the rest
    still complete. `threads`: intra-op threads per model call (None: one per core). engine "ray": on a
    Ray cluster (`address`), one model per actor, the same results. A DICOM file's result names its
    patient, eye, study and series: pseudonyms, or the tags' values with `keep_identifiers`."""
    from .data.dicom_dataset import add_identity

    run_on = engine_config(engine, address, ray_workers)
    # The Ray driver runs no network: its model only names the classes and how inputs are decoded.
    model = _model(bundle, "torch" if run_on.engine == "ray" else runtime, threads)
    sources = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if run_on.engine == "ray":
        from .engines.ray_predict import predict_ray

        results = predict_ray(model.bundle.path, sources, engine=run_on, progress=progress,
                              **given(batch_size=batch_size, runtime=runtime))
    else:
        results = model.predict_many(sources, progress=progress, **given(batch_size=batch_size, workers=workers))
    add_identity(results, keep_identifiers)
    if out:
        write_predictions_parquet(results, model.classes, out)
    if json_path:
        atomic_write_json(Path(json_path), results)
    if csv_path:
        # surrogateescape: a name that is not UTF-8 is written as the bytes it is, not an encoding error
        atomic_write_bytes(Path(csv_path), predictions_csv(results, model.classes).encode("utf-8", "surrogateescape"))
    return results


def predict_parquet(bundle: str | Path | Bundle | Model, inputs: str | Path | Sequence[str | Path], out: str | Path, *,
                    batch_size: int | None = None, runtime: str | None = None, engine: str | None = None,
                    address: str | None = None, ray_workers: int | None = None, progress: bool = False,
                    on_result: Callable[[dict[str, Any]], None] | None = None) -> int:
    """`retinalens predict --engine ray --out FILE` (no --json, --csv): `predict`'s Parquet file, its
    results streamed into it in the inputs' order as the batches finish, never all held
    (predict/parquet.py: at most one row group of rows). `on_result` sees each result as it is written.
    Returns the number of rows. engine "local" computes every result first, as `predict` does."""
    run_on = engine_config(engine, address, ray_workers)
    model = _model(bundle, "torch" if run_on.engine == "ray" else runtime, None)
    sources = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if run_on.engine == "ray":
        from .engines.ray_predict import ordered_predictions_ray

        results: Any = ordered_predictions_ray(model.bundle.path, sources, engine=run_on, progress=progress,
                                               **given(batch_size=batch_size, runtime=runtime))
    else:
        results = model.predict_many(sources, progress=progress, **given(batch_size=batch_size))
    def shown(results: Any) -> Any:
        for r in results:
            if on_result is not None:
                on_result(r)
            yield r

    return write_predictions_parquet(shown(results), model.classes, out)


def predict_volumes(bundle: str | Path | Bundle | Model, inputs: str | Path | Sequence[str | Path], *,
                    group_by: str | None = None, patient_regex: str | None = None, json_path: str | Path | None = None,
                    csv_path: str | Path | None = None, heatmaps_dir: str | Path | None = None,
                    batch_size: int | None = None, workers: int | None = None, runtime: str | None = None,
                    progress: bool = False, **rule: Any) -> list[dict[str, Any]]:
    """`retinalens predict --volumes`: one result per OCT volume (predict/volume.py: the rule, the gate's
    verdict, the most suspicious B-scans), each with its slices' results; multi-frame files are volumes of
    their own, other images grouped by `group_by` (VolumeConfig's default). `rule`: further VolumeConfig
    fields. `heatmaps_dir`: Grad-CAM overlays of the suspicious B-scans, named in each result's `heatmaps`.
    Inputs that cannot be read get {"input", "error"}, after the volumes."""
    from .data.patients import PatientParser
    from .predict.table import volumes_csv
    from .predict.volume import predict_volumes as run, volume_inputs

    model = _model(bundle, runtime)
    cfg = VolumeConfig(**given(group_by=group_by, **rule))
    sources = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    volumes, failures = volume_inputs(sources, cfg.group_by, PatientParser.from_regex(patient_regex))
    results = run(model, volumes, cfg, progress=progress, **given(batch_size=batch_size, workers=workers))
    if heatmaps_dir is not None:
        _write_volume_heatmaps(model, volumes, results, Path(heatmaps_dir).expanduser())
    results += failures
    if json_path:
        atomic_write_json(Path(json_path), results)
    if csv_path:
        atomic_write_bytes(Path(csv_path), volumes_csv(results, model.classes).encode())
    return results


def _write_volume_heatmaps(model: Model, volumes: Sequence[Any], results: list[dict[str, Any]], out: Path) -> None:
    from .explain import Explainer
    from .explain.volume import suspicious_heatmaps

    used: set[str] = set()
    with Explainer(model) as ex:
        for volume, result in zip(volumes, results):
            result["heatmaps"] = {}
            for i, made in suspicious_heatmaps(ex, volume, result).items():
                if isinstance(made, dict):
                    continue  # a slice unreadable now was listed as such when it was predicted
                png = out / _png_name(made.input, made.class_name, used)
                atomic_write_bytes(png, made.overlay_png())
                result["heatmaps"][str(i)] = str(png)


def _model(bundle: str | Path | Bundle | Model, runtime: str | None = None, threads: int | None = None) -> Model:
    if isinstance(bundle, Model):
        return bundle
    if isinstance(bundle, Bundle):
        return Model(bundle, **given(runtime=runtime, threads=threads))
    return load(bundle, **given(runtime=runtime, threads=threads))


def explain(bundle: str | Path | Bundle | Model, inputs: str | Path | Sequence[str | Path], *,
            class_name: str | None = None, out: str | Path = EXPLAIN_OUT, batch_size: int | None = None,
            on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """`retinalens explain`: a Grad-CAM overlay PNG per image in `out` (`scan.CNV.png`). Returns, per image,
    {input, png, label, probability, class}, {input, error}, or {input, ungradable: reason, gate} for an
    image the quality gate refuses (no PNG); `on_result` sees each one as it is done."""
    from .explain import Explainer

    model = _model(bundle)
    sources = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    used: set[str] = set()
    done: list[dict[str, Any]] = []
    with Explainer(model) as ex:
        if class_name is not None:
            ex.class_index(class_name)  # an unknown class fails before any image is read
        for result in ex.explain_many(sources, class_name, **given(batch_size=batch_size)):
            if isinstance(result, dict):
                record = result
            else:
                png = Path(out).expanduser() / _png_name(result.input, result.class_name, used)
                atomic_write_bytes(png, result.overlay_png())
                record = {"input": result.input, "png": str(png), "label": result.label,
                          "probability": result.probabilities[result.label], "class": result.class_name}
            done.append(record)
            if on_result is not None:
                on_result(record)
    if done and all("error" in r for r in done):
        raise RetinaLensError(f"none of the {len(done)} input(s) could be read")
    return done


def _png_name(name: str, class_name: str, used: set[str]) -> str:
    """`scan.jpeg` -> `scan.CNV.png`; a name already taken in this run gets `-2`, `-3`, ...
    At most NAME_MAX bytes: a long stem is cut and given a hash of the whole name, so that two long
    names that share their first 200 bytes still get two files."""
    stem = _SAFE.sub("_", Path(name.split("?")[0].rstrip("/")).stem) or "image"
    label = _cut(_SAFE.sub("_", class_name), 64)
    room = NAME_MAX - len(f".{label}-999999.png".encode())
    if len(stem.encode()) > room:
        stem = f"{_cut(stem, room - 9)}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    base = f"{stem}.{label}"
    candidate, n = f"{base}.png", 1
    while candidate in used:
        n += 1
        candidate = f"{base}-{n}.png"
    used.add(candidate)
    return candidate


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, never inside a character."""
    return text.encode()[:limit].decode(errors="ignore")


def export(bundle: str | Path | Bundle, fmt: str | None = None, out: str | Path | None = None,
           quantize: str | None = None) -> Path:
    """`retinalens export`: onnx (default) | torchscript | coreml | tflite (`quantize`, LiteRT only:
    none | int8-weights | fp16 | int8), with its FILE.json sidecar; returns the file."""
    from .export.formats import export_bundle

    return export_bundle(bundle, **given(fmt=fmt, quantize=quantize), out=out)


def serve(bundle: str | Path, **options: Any) -> None:
    """`retinalens serve`: the web app and REST API, until stopped (extra `serve`). `options` are
    serve.service.ServeConfig's fields (host, port, db, images, max_upload_mb, threads, max_batch, ...)."""
    from .serve.server import run_server
    from .serve.service import ServeConfig

    run_server(ServeConfig(bundle=Path(bundle), **options))


def retrain(bundle: str | Path, feedback: str | Path, out: str | Path, *, images_dir: str | Path | None = None,
            cache: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """`retinalens retrain`: a candidate trained with the confirmed feedback, promoted to `out` only if
    not worse on validation (else written to OUT.rejected). Returns the comparison."""
    from .train.retrain import retrain as run_retrain

    return run_retrain(bundle, feedback, out, images_dir=images_dir, cache=cache, progress=progress)


def prepare_fundus(src: str | Path, dst: str | Path, *, size: int | None = None, contrast: bool | None = None,
                   fmt: str | None = None, workers: int | None = None, progress: bool = False) -> PrepareReport:
    """`retinalens prepare fundus`: crop, square and resize fundus photographs (workers None: every core)."""
    from .data.fundus.prepare import prepare_fundus as run_prepare

    return run_prepare(src, dst, workers=workers, progress=progress, **given(size=size, contrast=contrast, fmt=fmt))


def backbones() -> list[BackboneSpec]:
    """`retinalens backbones`: the registered backbones."""
    return list_backbones()


@dataclass
class DemoRun:
    """What `retinalens demo` made: the test metrics, the example predictions and the bundle."""

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    bundle: Bundle
    out: Path


def demo(out: str | Path = DEMO_OUT, *, epochs: int | None = None, progress: bool = False) -> DemoRun:
    """`retinalens demo`: extract -> train -> evaluate -> predict on the bundled sample of real OCT scans,
    into `out` (cache/, bundle/, report.html, metrics.json, predictions.csv). `epochs`: None is train's default."""
    out = Path(out).expanduser()
    bundle = train(DEMO_DATA, out / "bundle", cache=out / "cache", epochs=epochs, progress=progress)
    metrics = evaluate(bundle, DEMO_DATA, split="test", cache=out / "cache", json_path=out / "metrics.json",
                       report_path=out / "report.html", progress=progress)
    examples = sorted((DEMO_DATA / "test").glob("*/*.jpeg"))[::8]
    predictions = predict(bundle, examples, csv_path=out / "predictions.csv")
    return DemoRun(metrics, predictions, bundle, out)
