"""The `retinalens` command line. Bad input: one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .._console import console
from ..errors import RetinaLensError
from .prepare import prepare_app
from .retrain import retrain
from .serve import serve
from .explain import explain
from .report import report
from .export import export

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="RetinaLens: deep-learning triage of retinal images (OCT B-scans, fundus photos).")

# Options shared by several commands, declared once.
BackboneOpt = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Registry name or any timm model name.")
WeightsOpt = typer.Option(None, "--weights", help="Local weights file (.safetensors/.pth) for the backbone.")
RandomOpt = typer.Option(False, "--random-weights", help="Random backbone weights (for timing only).")
CacheOpt = typer.Option(None, "--cache", help="Feature cache root (default $RETINALENS_CACHE or ~/.cache/retinalens/features).")
PrecisionOpt = typer.Option("auto", "--precision", help="auto | fp32 | bf16 (auto: bf16 where the hardware has it).")
WorkersOpt = typer.Option(0, "--workers", help="Decoding processes (0: threads between backbone calls, best on few cores).")
PatientOpt = typer.Option(None, "--patient-regex", help="Regex with a (?P<patient>...) group, matched on file names.")
ImagesOpt = typer.Option(None, "--images", help="Folder of the images a labels CSV names.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")


app.add_typer(prepare_app, name="prepare")
app.command()(retrain)
app.command()(serve)
app.command()(explain)
app.command()(report)
app.command()(export)


@app.command()
def extract(
    data: Path = typer.Argument(..., help="Dataset root, class-folder tree or labels CSV."),
    backbone: str = BackboneOpt, weights: Optional[Path] = WeightsOpt, random_weights: bool = RandomOpt,
    cache: Optional[Path] = CacheOpt, precision: str = PrecisionOpt, workers: int = WorkersOpt,
    batch_size: int = typer.Option(16, "--batch-size"),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: extract only this process's share (for many machines)."),
    spatial: bool = typer.Option(True, "--spatial/--no-spatial", help="Also store spatial maps (the conv head needs them)."),
    patient_regex: Optional[str] = PatientOpt, images: Optional[Path] = ImagesOpt, quiet: bool = QuietOpt,
) -> None:
    """Cache backbone features of every image under DATA (resumable, incremental)."""
    from ..api import extract as run_extract
    from ..features.extract import parse_shard, print_extract_report

    store, report = run_extract(data, backbone=backbone, weights=weights, pretrained=not random_weights, cache=cache,
                                precision=precision, batch_size=batch_size, workers=workers, shard=parse_shard(shard),
                                spatial=spatial, patient_regex=patient_regex, images_dir=images, progress=not quiet)
    print_extract_report(report)
    console().print(f"cache: {store.dir} ({len(store)} images)")


@app.command()
def train(
    data: Path = typer.Argument(..., help="Dataset root (train/ and test/ used when present), class folders or CSV."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    mode: str = typer.Option("bottleneck", "--mode", help="bottleneck (head on cached features) | frozen (frozen "
                             "backbone + GAP + Dense 64, trained on augmented images) | finetune (also the last "
                             "--unfreeze backbone groups) | scratch (every weight, e.g. --backbone eyenet)."),
    backbone: str = BackboneOpt, weights: Optional[Path] = WeightsOpt, random_weights: bool = RandomOpt,
    head: str = typer.Option("auto", "--head", help="auto (bottleneck: conv and logreg, the better on validation; "
                             "image modes: the method's own head) | conv | linear | logreg | dense."),
    hidden: int = typer.Option(0, "--hidden", help="Linear head: hidden units (0 = logistic regression)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default by mode: bottleneck 60, frozen 20, "
                                         "finetune 15, scratch 30 (early stopping may end sooner)."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(64, "--batch-size"), lr: float = typer.Option(1e-3, "--lr"),
    balance: str = typer.Option("none", "--balance", help="none | oversample (image modes: minority classes "
                                "rotated 90/120/180/270 and mirrored) | weights (inverse-frequency loss weights)."),
    class_weights: bool = typer.Option(False, "--class-weights", help="Same as --balance weights."),
    monitor: str = typer.Option("val_loss", "--monitor", help="val_loss | val_acc: picks the best epoch."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", help="Share of train patients held out for validation."),
    task: Optional[str] = typer.Option(None, "--task", help="referable | grade: DR grades 0-4 (CSV `level`); "
                                       "default: the labels as they are (OCT classes)."),
    unfreeze: int = typer.Option(2, "--unfreeze", help="finetune: backbone parameter groups (stages) to train."),
    backbone_lr_scale: float = typer.Option(0.1, "--backbone-lr-scale", help="finetune: their LR relative to --lr."),
    warmup_epochs: int = typer.Option(1, "--warmup-epochs", help="finetune: head-only epochs first."),
    augment: str = typer.Option("auto", "--augment", help="Image modes: auto (fundus for --task, else oct) | oct | "
                                "fundus | none."),
    resume: bool = typer.Option(False, "--resume", help="Image modes: continue an interrupted run from its checkpoint."),
    device: str = typer.Option("auto", "--device", help="Image modes: auto (CUDA when present) | cpu | cuda[:N]."),
    target_sensitivity: float = typer.Option(0.95, "--target-sensitivity", help="The referral threshold is the "
                                             "highest that reaches this sensitivity on validation."),
    cache: Optional[Path] = CacheOpt, precision: str = PrecisionOpt, workers: int = WorkersOpt,
    patient_regex: Optional[str] = PatientOpt, images: Optional[Path] = ImagesOpt, quiet: bool = QuietOpt,
) -> None:
    """Train a model and write a bundle: a head on cached features, or a network on images."""
    from ..api import train as run_train

    bundle = run_train(data, out, mode=mode, backbone=backbone, weights=weights, pretrained=not random_weights,
                       head=head, hidden=hidden, task=task, epochs=epochs, seed=seed, cache=cache, precision=precision,
                       workers=workers, val_fraction=val_fraction, patient_regex=patient_regex, images_dir=images,
                       progress=not quiet, batch_size=batch_size, lr=lr, monitor=monitor,
                       balance="weights" if class_weights and balance == "none" else balance, unfreeze=unfreeze,
                       backbone_lr_scale=backbone_lr_scale, warmup_epochs=warmup_epochs, augment=augment,
                       device=device, resume=resume, target_sensitivity=target_sensitivity)
    console().print(f"[green]bundle written:[/] {bundle.path}")


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    data: Path = typer.Argument(..., help="Dataset root (its --split is used) or a class-folder tree (used whole)."),
    split: str = typer.Option("test", "--split"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a self-contained HTML report."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the confidence intervals."),
    cache: Optional[Path] = CacheOpt, workers: int = WorkersOpt,
    patient_regex: Optional[str] = PatientOpt, images: Optional[Path] = ImagesOpt, quiet: bool = QuietOpt,
) -> None:
    """Accuracy, per-class metrics, ROC-AUC and urgent referral, with patient-clustered bootstrap CIs."""
    from ..evaluate.run import evaluate_bundle
    from ..models.bundle import load_bundle

    m = evaluate_bundle(load_bundle(bundle), data, split=split, cache=cache, json_path=json_out, report_path=report,
                        n_boot=n_boot, workers=workers, progress=not quiet, patient_regex=patient_regex, images_dir=images)
    print_metrics(m)
    for f in m["failures"]:
        console().print(f"[red]failed[/] {f['error']}")
    for label, path in (("json", json_out), ("report", report)):
        if path:
            console().print(f"{label}: {path}")


@app.command()
def predict(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or http(s) URLs."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write the results as CSV."),
    batch_size: int = typer.Option(16, "--batch-size"), workers: int = WorkersOpt,
    runtime: str = typer.Option("auto", "--runtime", help="torch | onnx (onnxruntime, fp32) | auto (onnx for fp32 "
                                "bundles on the CPU, where it measured faster; torch for bf16 bundles)."),
    quiet: bool = QuietOpt,
) -> None:
    """Class, probabilities and referral level for each image; failures are listed at the end."""
    from .._io import atomic_write_bytes, atomic_write_json
    from ..predict.model import load

    model = load(bundle, runtime=runtime)
    results = model.predict_many(inputs, batch_size=batch_size, workers=workers, progress=not quiet)
    if sys.stdout.isatty():
        print_predictions(results, model.classes)
    else:  # piped or redirected: whole CSV rows, never a table cut to 80 columns
        sys.stdout.write(predictions_csv(results, model.classes))
    if json_out:
        atomic_write_json(json_out, results)
    if csv_out:
        atomic_write_bytes(csv_out, predictions_csv(results, model.classes).encode())
    failed = [r for r in results if "error" in r]
    for r in failed:
        console().print(f"[red]failed[/] {r['error']}")
    print_gate_summary(results, gated=model.gate is not None)
    if failed and len(failed) == len(results):
        raise RetinaLensError(f"none of the {len(results)} input(s) could be read")


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for the cache, bundle and report."),
         quiet: bool = QuietOpt) -> None:
    """Offline end-to-end run on the bundled Kermany OCT sample: extract, train, evaluate, predict."""
    from ..demo import run_demo

    run_demo(out, progress=not quiet)


@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from ..models.registry import list_backbones

    for spec in list_backbones():
        typer.echo(f"{spec.name:22s} {spec.description}")


def print_metrics(m: dict[str, Any]) -> None:
    from rich.table import Table

    def ci(v: Any, c: Any) -> str:
        return "n/a" if v is None else (f"{v:.3f}" + (f" ({c[0]:.2f}-{c[1]:.2f})" if c else ""))

    t = Table(title=f"{m['n_images']} images, {m['n_patients']} patients (95% CI, patient bootstrap)")
    for col in ("class", "precision", "recall / sensitivity", "specificity", "f1", "support"):
        t.add_column(col)
    for c, r in m["per_class"].items():
        t.add_row(c, ci(r["precision"], r.get("precision_ci")), ci(r["recall"], r.get("recall_ci")),
                  ci(r["specificity"], r.get("specificity_ci")), ci(r["f1"], r.get("f1_ci")), str(r["support"]))
    console().print(t)
    console().print(f"accuracy {ci(m['accuracy'], m.get('accuracy_ci'))}; macro ROC-AUC {ci(m['roc_auc_macro'], m.get('roc_auc_macro_ci'))}"
                    + (f"; quadratic kappa {ci(m['quadratic_kappa'], m.get('quadratic_kappa_ci'))}" if "quadratic_kappa" in m else ""))
    u = m.get("urgent_referral")
    if u:
        console().print(f"referral ({'+'.join(u['positive_classes'])}): sensitivity {ci(u['sensitivity'], u.get('sensitivity_ci'))}, "
                        f"specificity {ci(u['specificity'], u.get('specificity_ci'))}, AUC {ci(u['auc'], u.get('auc_ci'))}")
    op, cal, gate = m.get("operating_point"), m.get("calibration"), m.get("gate")
    if op:
        console().print(f"at the operating point (threshold {op['threshold']:.3f}, chosen for sensitivity "
                        f"{op['target_sensitivity']:.2f} on validation): sensitivity {ci(op['sensitivity'], op.get('sensitivity_ci'))}, "
                        f"specificity {ci(op['specificity'], op.get('specificity_ci'))}")
    if cal:
        console().print(f"calibration: temperature {cal['temperature']:.2f}, ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}")
    if gate:
        console().print(f"quality gate: {gate['n_rejected']} of {gate['n_checked']} ungradable ({gate['rejection_rate']:.1%})"
                        + (f": {', '.join(f'{k} {v}' for k, v in gate['reasons'].items())}" if gate["reasons"] else ""))


def print_predictions(results: list[dict[str, Any]], classes: list[str]) -> None:
    from rich.table import Table

    t = Table()
    for col in ("input", "label", "referral", "refer", "gate", *classes):
        t.add_column(col)
    for r in results:
        if "error" not in r:
            gate = r.get("gate", {"ok": True})
            t.add_row(r["input"], r["label"] or "-", r["referral"] or "", _yes_no(r.get("refer")),
                      "ok" if gate["ok"] else f"ungradable: {gate['reason']}",
                      *(f"{r['probabilities'][c]:.3f}" for c in classes))
    console(stdout=True).print(t)


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")


def print_gate_summary(results: list[dict[str, Any]], gated: bool) -> None:
    """'N of M ungradable (reasons)' on stderr; a note when the bundle has no gate."""
    from ..gate import summarize

    checked = [r["gate"] for r in results if "gate" in r]
    if not gated:
        console().print("note: this bundle has no quality gate (it predates it): every readable image is graded")
    elif checked:
        s = summarize(checked)
        console().print(f"{s['n_rejected']} of {s['n_checked']} ungradable"
                        + (" (" + ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) + ")" if s["reasons"] else ""))


def predictions_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["input", "label", "referral", *[f"p_{c}" for c in classes], "p_referral", "refer", "gate", "gate_reason",
                "error"])
    for r in results:
        p, gate = r.get("probabilities", {}), r.get("gate")
        w.writerow([r["input"], r.get("label") or "", r.get("referral") or "", *[p.get(c, "") for c in classes],
                    "" if r.get("p_referral") is None else r["p_referral"], _yes_no(r.get("refer")),
                    "" if gate is None else ("ok" if gate["ok"] else "ungradable"), (gate or {}).get("reason") or "",
                    r.get("error", "")])
    return buf.getvalue()


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
    except RetinaLensError as exc:
        from rich.markup import escape  # a message may hold brackets (pip extras, file names): print them as they are

        console().print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console().print("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line unless --debug
        if debug:
            raise
        console().print(f"[red]internal error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                        highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
