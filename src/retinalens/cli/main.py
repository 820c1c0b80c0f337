"""The `retinalens` command line. Bad input: one clear line and exit code 2, never a traceback.

The defaults of the extract, train and evaluate options are read from the dataclasses of
retinalens/config.py (cli/options.py), so that `--help` shows the value the Python API uses too; the
commands' work is imported when they run, so that this module and `retinalens --help` import no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .._console import console, markup_safe
from ..config import (AUTO_HEAD, CV_AUTO_FOLDS, CV_AUTO_MAX_IMAGES, DEMO_OUT, MAX_INPUT_SIZE, MIN_INPUT_SIZE,
                      MODE_EPOCHS, EnsembleConfig, EvaluateConfig, ExtractConfig,
                      ExtractOptions, ImageTrainConfig, RunConfigBase, SplitConfig, TrainConfigBase, VolumeConfig,
                      default)
from ..errors import RetinaLensError
from ..predict.table import predictions_csv
from .options import (AddressOpt, BackboneOpt, CacheOpt, EngineOpt, ImagesOpt, PatientOpt, PrecisionOpt, QuietOpt,
                      RandomOpt, RayWorkersOpt, WeightsOpt, WorkersOpt, add_command, config_option)
from .output import print_gate_summary, print_metrics, print_predictions, print_volume_metrics
from .prepare import prepare_app
from .retrain import retrain
from .serve import serve
from .explain import explain
from .verify import verify
from .report import report
from .export import export

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="RetinaLens: deep-learning triage of retinal images (OCT B-scans, fundus photos).")

def extract(
    data: Path = typer.Argument(..., help="Dataset root, class-folder tree or labels CSV."),
    backbone: str = BackboneOpt, weights: Optional[Path] = WeightsOpt, random_weights: bool = RandomOpt,
    cache: Optional[Path] = CacheOpt, precision: str = PrecisionOpt, workers: int = WorkersOpt,
    batch_size: int = config_option(ExtractConfig, "batch_size", help="Images per backbone call."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: extract only this process's share (for many machines)."),
    spatial: bool = typer.Option(default(ExtractOptions, "spatial"), "--spatial/--no-spatial",
                                 help="Also store spatial maps (the conv head needs them)."),
    patient_regex: Optional[str] = PatientOpt, images: Optional[Path] = ImagesOpt, engine: str = EngineOpt,
    address: Optional[str] = AddressOpt, ray_workers: int = RayWorkersOpt, quiet: bool = QuietOpt,
    resize: str = config_option(ExtractConfig, "resize", help="As train's --resize: auto caches what a default "
                                "train of DATA reads (OCT scans: the squash and the band view, a cache each)."),
) -> None:
    """Cache backbone features of every image under DATA (resumable, incremental)."""
    from ..api import extract as run_extract
    from ..features.extract import parse_shard, print_extract_report

    store, report = run_extract(data, backbone=backbone, weights=weights, pretrained=not random_weights, cache=cache,
                                precision=precision, batch_size=batch_size, workers=workers, shard=parse_shard(shard),
                                spatial=spatial, patient_regex=patient_regex, images_dir=images, engine=engine,
                                address=address, ray_workers=ray_workers, resize=resize, progress=not quiet)
    print_extract_report(report)
    console().print(f"cache: {markup_safe(store.dir)} ({len(store)} images)", highlight=False, soft_wrap=True)


def train(
    data: Path = typer.Argument(..., help="Dataset root (train/ and test/ used when present), class folders or CSV."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    mode: str = config_option(RunConfigBase, "mode", help="bottleneck (head on cached features) | frozen (frozen "
                              "backbone + GAP + Dense 64, trained on augmented images) | finetune (also the last "
                              "--unfreeze backbone groups) | scratch (every weight, e.g. --backbone eyenet)."),
    backbone: str = BackboneOpt, weights: Optional[Path] = WeightsOpt, random_weights: bool = RandomOpt,
    head: str = typer.Option(AUTO_HEAD, "--head", help="auto (bottleneck: conv and logreg, the better on validation; "
                             "image modes: the method's own head) | conv | linear | logreg | dense."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Linear head: hidden units (0 = logistic regression)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default by mode: " + ", ".join(
        f"{m} {n}" for m, n in MODE_EPOCHS.items()) + " (early stopping may end sooner)."),
    seed: int = config_option(TrainConfigBase, "seed", help="Seeds the split and the training."),
    batch_size: int = config_option(TrainConfigBase, "batch_size", help="Training batch size."),
    lr: float = config_option(TrainConfigBase, "lr", help="Learning rate (of the head)."),
    balance: Optional[str] = typer.Option(None, "--balance", help="none | oversample (image modes: minority classes "
                                          "rotated 90/120/180/270 and mirrored) | weights (inverse-frequency loss "
                                          "weights)."),
    class_weights: bool = typer.Option(False, "--class-weights", help="Same as --balance weights."),
    monitor: str = config_option(TrainConfigBase, "monitor", help="val_loss | val_acc: picks the best epoch."),
    val_fraction: float = config_option(SplitConfig, "val_fraction", help="Share of train patients held out for "
                                        "validation."),
    task: Optional[str] = typer.Option(None, "--task", help="referable | grade: DR grades 0-4 (CSV `level`); "
                                       "default: the labels as they are (OCT classes)."),
    unfreeze: int = config_option(ImageTrainConfig, "unfreeze", help="finetune: backbone parameter groups (stages) "
                                  "to train."),
    backbone_lr_scale: float = config_option(ImageTrainConfig, "backbone_lr_scale",
                                             help="finetune: their LR relative to --lr."),
    warmup_epochs: int = config_option(ImageTrainConfig, "warmup_epochs", help="finetune: head-only epochs first "
                                       "(classic), or the linear LR warm-up (adamw-ema)."),
    recipe: str = config_option(ImageTrainConfig, "recipe", help="finetune: classic (Adam, last --unfreeze groups, "
                                "plateau LR) | adamw-ema (every group, layer-wise LR decay, AdamW, warm-up + cosine, "
                                "label smoothing, weight EMA, oct-scan augmentation) | adamw-ema-cpu (the same on "
                                "the last --unfreeze groups, oct augmentation)."),
    batchnorm: str = config_option(ImageTrainConfig, "batchnorm", help="finetune: frozen (ImageNet statistics) | "
                                   "reestimate (measured on the training images before the first epoch)."),
    augment: str = config_option(ImageTrainConfig, "augment", help="Image modes: auto (fundus for --task, else oct) "
                                 "| oct | fundus | none."),
    resume: bool = config_option(RunConfigBase, "resume", help="Image modes: continue an interrupted run from its "
                                 "checkpoint."),
    device: str = config_option(ImageTrainConfig, "device", help="Image modes: auto (CUDA when present) | cpu | "
                                "cuda[:N]."),
    target_sensitivity: float = config_option(RunConfigBase, "target_sensitivity", help="The referral threshold is the "
                                              "highest that reaches this sensitivity on validation."),
    cv: Optional[int] = typer.Option(None, "--cv", help=f"Folds of patient-grouped, stratified cross-validation "
                                     f"inside the training data that choose the head, C, the epochs, calibration and "
                                     f"the referral threshold, then a refit on all of it; 0: one validation split. "
                                     f"Default: {CV_AUTO_FOLDS} in bottleneck mode up to {CV_AUTO_MAX_IMAGES} "
                                     f"training images, else 0."),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="Key file: sign the bundle (signature.json; "
                                            "default: the key $RETINALENS_BUNDLE_KEY names, if set)."),
    ensemble: Optional[str] = typer.Option(None, "--ensemble", help="Members, comma-separated: backbones (e.g. "
                                           "efficientnet_lite0,mobilenet_v2), each NAME or NAME:finetune (trained "
                                           "on images): one bundle averaging them all."),
    member_epochs: int = config_option(EnsembleConfig, "member_epochs",
                                                 help="Epochs of each NAME:finetune member of --ensemble."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Training seeds, comma-separated: each backbone "
                                        "trained once per seed, in one bundle (the split keeps --seed)."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time views averaged with the image itself, "
                                      "comma-separated: flip | crop."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help=f"Pixels a side fed to the backbone "
                                             f"({MIN_INPUT_SIZE}-{MAX_INPUT_SIZE}), kept in the bundle. Default: the "
                                             "backbone's own (Lite0 224)."),
    resize: str = config_option(ExtractConfig, "resize",
                                help="How a scan becomes the input: auto (squash+band for OCT B-scans of "
                                     "CNV/DME/DRUSEN/NORMAL in bottleneck mode, else squash) | squash (the whole "
                                     "image to a square) | squash+band (OCT: the squash and the retinal band in "
                                     "3 tiles beside it; bottleneck mode)."),
    cache: Optional[Path] = CacheOpt, precision: str = PrecisionOpt, workers: int = WorkersOpt,
    patient_regex: Optional[str] = PatientOpt, images: Optional[Path] = ImagesOpt, quiet: bool = QuietOpt,
    nproc: int = typer.Option(1, "--nproc", help="frozen | finetune: train on N processes (torchrun, PyTorch DDP; "
                              "--batch-size stays the global batch and must divide by the processes)."),
    nnodes: int = typer.Option(1, "--nnodes", help="With --nproc: machines taking part (each runs this command)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="With --nnodes: HOST:PORT of "
                                                "torchrun's rendezvous (the same on every machine)."),
    rdzv_timeout: Optional[int] = typer.Option(None, "--rdzv-timeout", help="With --rdzv-endpoint: seconds to wait "
                                               "for every machine to join (default: torchrun's, 600)."),
) -> None:
    """Train a model and write a bundle: a head on cached features, or a network on images."""
    if nproc != 1 or nnodes != 1 or rdzv_endpoint or rdzv_timeout is not None:
        from .launch import launch_train

        return launch_train(sys.argv[1:], mode=mode, batch_size=batch_size, nproc=nproc, nnodes=nnodes,
                            rdzv_endpoint=rdzv_endpoint, rdzv_timeout=rdzv_timeout)
    from ..api import train as run_train

    bundle = run_train(data, out, mode=mode, backbone=backbone, weights=weights, pretrained=not random_weights,
                       head=head, hidden=hidden, task=task, epochs=epochs, seed=seed, cache=cache, precision=precision,
                       workers=workers, val_fraction=val_fraction, patient_regex=patient_regex, images_dir=images,
                       progress=not quiet, batch_size=batch_size, lr=lr, monitor=monitor, balance=balance,
                       class_weights=class_weights, unfreeze=unfreeze, backbone_lr_scale=backbone_lr_scale,
                       warmup_epochs=warmup_epochs, augment=augment, device=device, resume=resume,
                       recipe=recipe, batchnorm=batchnorm,
                       target_sensitivity=target_sensitivity, sign_key=sign_key, cv=cv, ensemble=ensemble,
                       seeds=seeds, tta=tta, member_epochs=member_epochs, input_size=input_size,
                       resize=resize)
    if bundle is not None:  # None: a rank of torchrun's other than 0, which writes the bundle
        console().print(f"[green]bundle written:[/] {markup_safe(bundle.path)}", highlight=False, soft_wrap=True)


def evaluate(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    data: Path = typer.Argument(..., help="Dataset root (its --split is used) or a class-folder tree (used whole)."),
    split: str = config_option(EvaluateConfig, "split", help="The split of a dataset root to evaluate on."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a self-contained HTML report."),
    n_boot: int = config_option(EvaluateConfig, "n_boot", help="Bootstrap resamples for the confidence intervals."),
    include_training: bool = config_option(EvaluateConfig, "include_training", help="Also score the images the "
                                           "model was trained or validated on (left out by default)."),
    cache: Optional[Path] = CacheOpt, workers: int = WorkersOpt,
    volumes: bool = typer.Option(False, "--volumes", help="Also per OCT volume (the worst B-scan decides): see "
                                 "README, OCT volumes."),
    group_by: str = config_option(VolumeConfig, "group_by", help="--volumes: patient (the id in the names) | "
                                  "folder (one acquisition per folder) | series (DICOM: the acquisition's series)."),
    patient_regex: Optional[str] = PatientOpt, images: Optional[Path] = ImagesOpt, quiet: bool = QuietOpt,
) -> None:
    """Accuracy, per-class metrics, ROC-AUC and urgent referral, with patient-clustered bootstrap CIs."""
    from ..api import evaluate as run_evaluate

    m = run_evaluate(bundle, data, split=split, cache=cache, json_path=json_out, report_path=report, n_boot=n_boot,
                     include_training=include_training,
                     workers=workers, progress=not quiet, patient_regex=patient_regex, images_dir=images,
                     volumes=VolumeConfig(group_by=group_by) if volumes else None)
    print_metrics(m)
    if volumes:
        print_volume_metrics(m["volumes"])
    for f in m["failures"]:
        console().print(f"[red]failed[/] {markup_safe(f['error'])}", highlight=False, soft_wrap=True)
    for label, path in (("json", json_out), ("report", report)):
        if path:
            console().print(f"{label}: {markup_safe(path)}", highlight=False, soft_wrap=True)


def predict(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or http(s) URLs."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write the results as CSV."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as Parquet (pip install "
                                       "'retinalens[parquet]')."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per model call."), workers: int = WorkersOpt,
    runtime: str = typer.Option("auto", "--runtime", help="torch | onnx (onnxruntime, fp32) | auto (onnx for fp32 "
                                "bundles on the CPU, where it measured faster; torch for bf16 bundles)."),
    engine: str = EngineOpt, address: Optional[str] = AddressOpt, ray_workers: int = RayWorkersOpt,
    threads: int = typer.Option(0, "--threads", help="Intra-op threads per model call (0: one per core)."),
    sr_out: Optional[Path] = typer.Option(None, "--sr-out", help="Also write a DICOM Structured Report per DICOM "
                                          "input into this folder (for the PACS; it names the patient)."),
    keep_identifiers: bool = typer.Option(False, "--keep-identifiers", help="Name DICOM inputs' patient, study and "
                                          "series by their tags' values, not by pseudonyms."),
    volumes: bool = typer.Option(False, "--volumes", help="One answer per OCT volume (the worst B-scan decides; "
                                 "automatic for multi-frame files): see README, OCT volumes."),
    group_by: str = config_option(VolumeConfig, "group_by", help="--volumes: patient (Kermany names) | folder "
                                  "(one acquisition per folder) | series (DICOM: the acquisition's series)."),
    heatmaps: Optional[Path] = typer.Option(None, "--heatmaps", help="--volumes: folder for the heat maps of each "
                                            "volume's most suspicious B-scans."),
    patient_regex: Optional[str] = PatientOpt, quiet: bool = QuietOpt,
) -> None:
    """Class, probabilities and referral level for each image (or OCT volume); failures are listed at the end."""
    from ..api import predict as run_predict
    from ..predict.model import load
    from .volumes import has_multi_frame, predict_volumes_command

    if threads < 0:
        raise RetinaLensError(f"--threads must be 0 (one per core) or more, got {threads}")
    # On Ray the workers run the network; this process only names the classes (torch: nothing to build).
    model = load(bundle, runtime="torch" if engine == "ray" else runtime, threads=threads or None)
    if volumes or has_multi_frame(inputs):
        if engine != "local":
            raise RetinaLensError("--volumes runs on the local engine only: leave out --engine")
        predict_volumes_command(model, inputs, group_by=group_by, patient_regex=patient_regex, json_out=json_out,
                                csv_out=csv_out, heatmaps=heatmaps, batch_size=batch_size, workers=workers,
                                progress=not quiet)
        return
    if engine == "ray" and out is not None and not (json_out or csv_out or sr_out):  # millions of rows: streamed
        from .predict_stream import predict_streamed

        return predict_streamed(model, inputs, out, gated=model.gate is not None, batch_size=batch_size,
                                runtime=runtime, engine=engine, address=address, ray_workers=ray_workers,
                                progress=not quiet)
    results = run_predict(model, inputs, json_path=json_out, csv_path=csv_out, out=out, batch_size=batch_size,
                          workers=workers, runtime=runtime, engine=engine, address=address, ray_workers=ray_workers,
                          progress=not quiet, keep_identifiers=keep_identifiers)
    if sys.stdout.isatty():
        print_predictions(results, model.classes)
    else:  # piped or redirected: whole CSV rows, never a table cut to 80 columns
        sys.stdout.write(predictions_csv(results, model.classes))
    failed = [r for r in results if "error" in r]
    for r in failed:
        console().print(f"[red]failed[/] {markup_safe(r['error'])}", highlight=False, soft_wrap=True)
    print_gate_summary(results, gated=model.gate is not None)
    if sr_out is not None:
        from ..predict.sr import write_reports

        written = write_reports(results, model.classes, sr_out)
        console().print(f"sr: {len(written)} report(s) in {markup_safe(sr_out)}", highlight=False, soft_wrap=True)
    if failed and len(failed) == len(results):
        raise RetinaLensError(f"none of the {len(results)} input(s) could be read")


def demo(out: Path = typer.Option(DEMO_OUT, "--out", help="Folder for the cache, bundle and report."),
         quiet: bool = QuietOpt) -> None:
    """Offline end-to-end run on the bundled Kermany OCT sample: extract, train, evaluate, predict."""
    from .demo import run_demo

    run_demo(out, progress=not quiet)


def backbones() -> None:
    """List the registered backbones."""
    from ..api import backbones as registered

    for spec in registered():
        typer.echo(f"{spec.name:22s} {spec.description}")


# In the order of `retinalens --help`: the pipeline, then the tools around it.
for _fn in (extract, train, evaluate, report, predict, explain, export, verify, serve, retrain):
    add_command(app, _fn)
app.add_typer(prepare_app, name="prepare")
for _fn in (demo, backbones):
    add_command(app, _fn)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning bad input into one line and exit code 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv)
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--debug"]
    try:
        app(args=args, prog_name="retinalens", standalone_mode=True)
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
        if code == 130:  # typer turns Ctrl-C into a silent exit 130
            console().print("interrupted: what was finished is kept (the feature cache resumes on the next run)")
        return code
    except (RetinaLensError, OSError) as exc:
        from .._io import is_environment_error, write_error

        if isinstance(exc, OSError) and not is_environment_error(exc):
            return _internal_error(exc, debug)
        if isinstance(exc, OSError):  # a writer outside _io met a full disk or a read-only folder: the user's to fix
            exc = write_error(None, exc)
        # A message may hold brackets (pip extras) and file names (with any character): printed as they are.
        console().print(f"[red]error:[/] {markup_safe(exc)}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console().print("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line unless --debug
        return _internal_error(exc, debug)
    return 0


def _internal_error(exc: Exception, debug: bool) -> int:
    if debug:
        raise exc
    console().print(f"[red]internal error:[/] {type(exc).__name__}: {markup_safe(exc)} (run with --debug for the traceback)",
                    highlight=False, soft_wrap=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
