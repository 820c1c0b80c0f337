"""`make bench`: speed, memory and accuracy figures on the real OCT data, written to a JSON file.

Every figure is measured here, on this machine, on ../shared/data/oct-kermany (RETINALENS_SHARED_DATA),
and every section records the machine it ran on (CPU model and flags, threads, the precision `auto`
picks). The reference points are measured in the same run: the original Keras extraction loop and head
training (benchmarks/keras_loop.py) in their own environment (--keras-python, default .venv-keras, which
`make bench` creates); where that cannot run, the figures say why and no ratio is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import retinalens
from retinalens.data.discover import discover
from retinalens.data.hashing import sha256_files
from retinalens.features.extract import extract_features, head_inputs, open_cache
from retinalens.models.heads import HeadConfig, head_probabilities
from retinalens.models.machine import AMX_FLAGS, BF16_FLAGS, cached_probe, cpu_info, measure_matmul, needs_probe
from retinalens.models.registry import create_backbone, resolve_precision
from retinalens.train.trainer import TrainConfig, fit_logistic_head, train_head

ROOT = Path(__file__).resolve().parents[1]
# "core" is this file; every other section is benchmarks/bench_<name>.py with run(shared_data) -> dict.
SECTIONS = ("core", "training", "cv", "export", "litert", "explain", "trust", "serve", "cli", "decode", "corpus", "ray",
            "ensemble", "preprocessing", "views", "finetune", "speed", "fundus_cv", "fundus_fov")


def keras(args: list[str], python: str | None) -> dict:
    """One run of benchmarks/keras_loop.py in the Keras environment; {"error": why} when it cannot run."""
    if not python or not Path(python).is_file():
        return {"error": f"no Keras environment at {python} (make bench creates .venv-keras; or pass --keras-python)"}
    r = subprocess.run([python, str(ROOT / "benchmarks" / "keras_loop.py"), *args], capture_output=True, text=True,
                       check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"the Keras loop failed (exit {r.returncode}): {r.stderr.strip()[-300:]}"}


def profile_top_ops(bb, precision: str, batch: torch.Tensor, top: int = 8) -> list[dict]:
    """Where the backbone's time goes (torch.profiler over 2 batches of the frozen graph, warmed up)."""
    from torch.profiler import ProfilerActivity, profile

    bb.encode(batch, precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            bb.encode(batch, precision)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
            for e in events[:top]]


def backbone_gflop(bb) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    s = bb.preprocessing.size
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        bb.model.forward_features(torch.zeros(1, 3, s, s))
    return fc.get_total_flops() / 1e9


def bench_extract(name: str, paths: list[Path], hashes: list[str], precision: str, rates: dict, workers: int,
                  keras_rate: float | None = None) -> dict:
    bb = create_backbone(name, pretrained=name != "inception_v3")  # random weights are fine for timing
    gflop = backbone_gflop(bb)
    size = bb.preprocessing.size
    with tempfile.TemporaryDirectory() as d:
        cache = open_cache(d, bb, precision)
        t = time.perf_counter()
        bb.encode(torch.zeros(2, size, size, 3, dtype=torch.uint8), precision)  # trace once, outside the timing
        first_call = time.perf_counter() - t
        r = extract_features(paths, hashes, bb, cache, precision=precision, workers=workers, progress=False)
    rate = rates["bf16" if precision == "bf16" else "fp32"]
    batch = torch.stack([bb.preprocessing.load(p) for p in paths[:16]])
    return {"backbone": name, "input_px": size, "precision": precision, "images": r.n_extracted,
            "images_per_s": round(r.images_per_s, 1), "gflop_per_image": round(gflop, 2),
            "arithmetic_limit_images_per_s": round(rate / gflop, 1),
            "share_of_arithmetic_limit": round(r.images_per_s * gflop / rate, 3),
            "first_call_s": round(first_call, 2),  # trace and freeze, or load the graph kept on disk
            "x_keras": round(r.images_per_s / keras_rate, 2) if keras_rate else None,
            "profile_top_ops": profile_top_ops(bb, precision, batch)}


def bench_head(shape: tuple[int, int, int], n: int = 2048, precision: str = "auto", keras_us: float | None = None) -> dict:
    """Steady-state cost of one epoch: (time of 4 epochs - time of 1) / 3, so one-off set-up (the
    fp16 -> bf16 copy of the features, the first-call allocations) is not counted per epoch."""
    c, h, w = shape
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, h, w, c)).astype(np.float16)
    y = rng.integers(0, 4, n)
    seconds = {}
    for epochs in (1, 1, 4):  # the first run warms up (kernel selection, allocator) and is overwritten
        cfg = TrainConfig(epochs=epochs, early_stopping=0, batch_size=64, precision=precision)
        t = time.perf_counter()
        train_head(x, y, x[:64], y[:64], num_classes=4, feature_shape=shape, cfg=cfg, progress=False)
        seconds[epochs] = time.perf_counter() - t
    us = (seconds[4] - seconds[1]) / (3 * n) * 1e6
    return {"feature_shape_hwc": [h, w, c], "precision": resolve_precision(precision), "samples": n,
            "us_per_sample_per_epoch": round(us, 1),
            "x_keras": round(keras_us / us, 2) if keras_us else None}


def peak_rss_mb_of_extract(data: Path, limit: int, cache: str) -> float:
    """Peak memory of a fresh process extracting `limit` images (so it can be compared across sizes)."""
    code = (
        "from retinalens.data.discover import discover; "
        "from retinalens.data.hashing import sha256_files; from retinalens.features.extract import extract_features, open_cache; "
        "from retinalens.models.registry import create_backbone, resolve_precision; "
        f"p=[s.path for s in discover({str(data)!r}).samples][:{limit}]; bb=create_backbone(); pr=resolve_precision('auto'); "
        f"c=open_cache({cache!r}, bb, pr); extract_features(p, sha256_files(p), bb, c, precision=pr, workers=0, progress=False); "
        # VmHWM: the peak of this process's own address space (ru_maxrss would carry the parent's
        # resident size over fork+exec, and the parent holds the other benchmarks' data)
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    return round(int(out.stdout.strip().splitlines()[-1]) / 1024, 1)


def compare_heads(oct_root: Path, cache: str, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Same split, same features: the conv head (bf16 and fp32 training), the linear head and the
    logistic-regression baseline, on fp32 and bf16 features; mean and sd over seeds. Choices are
    made on the validation column; the test column is reported, never used to choose."""
    from retinalens.data.splits import make_splits

    ds = discover(oct_root)
    hashes = sha256_files(s.path for s in ds.samples)
    splits = make_splits(ds, hashes=hashes)
    bb = create_backbone()
    y_all = np.array([ds.classes.index(s.label) for s in ds.samples])
    h = {k: [hashes[i] for i in splits.indices(k)] for k in ("train", "val", "test")}
    y = {k: y_all[splits.indices(k)] for k in h}
    out: dict = {"split": {k: len(v) for k, v in h.items()}, "seeds": list(seeds)}

    def summary(runs: list[dict]) -> dict:
        return {f"{k}_acc_{stat}": round(float(fn([r[k] for r in runs])), 4)
                for k in ("val", "test") for stat, fn in (("mean", np.mean), ("sd", np.std))}

    for feat in ("fp32", "bf16"):
        store = open_cache(cache, bb, feat)
        extract_features([s.path for s in ds.samples], hashes, bb, store, precision=feat, progress=False)
        for name, kind, train_precision in (("conv_head_bf16_training", "conv", "bf16"),
                                            ("conv_head_fp32_training", "conv", "fp32"),
                                            ("linear_head", "linear", "auto")):
            x = {k: head_inputs(store, h[k], "spatial" if kind == "conv" else "pooled") for k in h}
            runs = []
            for seed in seeds:
                cfg = TrainConfig(head=HeadConfig(kind=kind), precision=train_precision, seed=seed)
                r = train_head(x["train"], y["train"], x["val"], y["val"], num_classes=4,
                               feature_shape=store.key.feature_shape, cfg=cfg, progress=False)
                runs.append({k: float((head_probabilities(r.head, x[k]).argmax(1) == y[k]).mean()) for k in ("val", "test")})
            out[f"{name}__{feat}_features"] = summary(runs)
        p = {k: store.pooled(h[k]) for k in h}
        fits: dict = {}  # the baseline's C=0.1 model is one of the search's: fitted once
        for name, cs in (("logistic_regression_baseline_C0.1", (0.1,)), ("logreg_head_C_on_val", (0.01, 0.1, 1.0))):
            r = fit_logistic_head(p["train"], y["train"], p["val"], y["val"], num_classes=4,
                                  feature_shape=store.key.feature_shape, cs=cs, fits=fits)
            out[f"{name}__{feat}_features"] = {f"{k}_acc": round(float((head_probabilities(r.head, p[k]).argmax(1) == y[k]).mean()), 4)
                                               for k in ("val", "test")}
    return out


def bench_fundus(shared: Path, work: Path) -> dict:
    """Referable DR on IDRiD + Kaggle together (the raw photos): a patient-grouped, stratified test
    split in the labels CSV, the default pipeline trained on the rest, evaluated on that test split."""
    from bench_training import fundus_split_csv, referable_summary

    combined, n = fundus_split_csv(shared, work)
    t = time.perf_counter()
    bundle = retinalens.train(combined, work / "dr-bundle", task="referable", cache=work / "dr-cache")
    return {"data": f"IDRiD + Kaggle DR sample ({n} photos), referable = grade >= 2, patient-grouped stratified 20% test split"} \
        | referable_summary(bundle, combined, work / "dr-cache", time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    ap.add_argument("--data", default=os.environ.get("RETINALENS_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--keras-python", default=os.environ.get("RETINALENS_KERAS_PYTHON", str(ROOT / ".venv-keras" / "bin" / "python")),
                    help="the Python of an environment with tensorflow-cpu (extra 'bench'), for the Keras loops")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}; "
                    "the others keep their figures from an existing --out file")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        sys.exit(f"unknown sections {unknown}: use {', '.join(SECTIONS)}")
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    if "core" in only:
        res.update(core(args))
    for name in only[:]:
        if name != "core":  # each of the other sections is one module, benchmarks/bench_<name>.py
            res[name] = importlib.import_module(f"bench_{name}").run(Path(args.data)) | {"machine": machine()}
            print(name, json.dumps(res[name]), flush=True)
    res["machine"] = machine()  # of the latest run; each section keeps its own (--only keeps old sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written {out}")


def machine() -> dict:
    """What every figure depends on: the CPU (model and the flags that choose kernels), threads, the
    load it ran under, and the precision `--precision auto` picks here."""
    info = cpu_info()
    wanted = ("avx2", "avx512", "amx", "bf16", "fp16", "vnni", "asimd", "sve")
    return {"cpus": os.cpu_count(), "processor": info.model,
            "flags": sorted(f for f in info.flags if f.startswith(wanted) or f in AMX_FLAGS | BF16_FLAGS),
            "amx": info.has_amx, "matmul_probe": cached_probe(info).__dict__ if needs_probe(info.flags) else None,
            "precision_auto": resolve_precision("auto"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2), "python": platform.python_version()}


def core(args: argparse.Namespace) -> dict:
    """Extraction, head training, latency, memory, heads vs baseline, fundus (the core's figures)."""
    oct_root = Path(args.data) / "oct-kermany"
    if not oct_root.is_dir():
        sys.exit(f"benchmarks need the real OCT data at {oct_root} (set RETINALENS_SHARED_DATA)")
    ds = discover(oct_root)
    paths = [s.path for s in ds.samples]
    hashes = sha256_files(paths)
    precision = resolve_precision("auto")
    res: dict = {"data": f"oct-kermany train+test ({len(paths)} images)", "machine": machine()}
    probe = measure_matmul(size=2048, budget_s=1.0)  # large square products: the arithmetic limit
    rates = {"fp32": probe.fp32_gflops, "bf16": probe.bf16_gflops}
    res["matmul_gflops"] = dict(rates)
    print("matmul GFLOP/s", res["matmul_gflops"], flush=True)

    # The Keras loop on the same scans, in the same run, just before ours.
    res["keras_extract"] = keras(["extract", *map(str, paths)], args.keras_python)
    print("keras extract", res["keras_extract"], flush=True)
    keras_rate = res["keras_extract"].get("images_per_s")
    res["extract"] = [bench_extract(n, paths, hashes, p, rates, args.workers, keras_rate if n == "inception_v3" else None)
                      for n, p in (("efficientnet_lite0", precision), ("efficientnet_lite0", "fp32"),
                                   ("inception_v3", precision), ("inception_v3", "fp32"))]
    for r in res["extract"]:
        print("extract", r, flush=True)
    res["keras_head"] = keras(["head"], args.keras_python)
    keras_us = res["keras_head"].get("us_per_sample_per_epoch")
    res["head_training"] = {"original_head_on_inception_8x8x2048": bench_head((2048, 8, 8), keras_us=keras_us),
                            "original_head_on_inception_8x8x2048_fp32": bench_head((2048, 8, 8), precision="fp32",
                                                                                   keras_us=keras_us),
                            "default_head_on_efficientnet_lite0_7x7x1280": bench_head((1280, 7, 7))}
    print("head", res["head_training"], flush=True)

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        # one network (--resize squash), whose head file this reads; the OCT default's two views: bench_ensemble
        bundle = retinalens.train(oct_root / "train", Path(d) / "bundle", cache=Path(d) / "cache", resize="squash")
        res["images_to_bundle_s"] = {"data": "oct-kermany/train (619 images, val/test carved by patient)",
                                     "seconds": round(time.perf_counter() - t, 1),
                                     "head_mb": round((bundle.path / "head.safetensors").stat().st_size / 1e6, 2),
                                     "bundle_mb": round(sum(f.stat().st_size for f in bundle.path.iterdir()) / 1e6, 1)}
        print("images->bundle", res["images_to_bundle_s"], flush=True)
        model = retinalens.load(bundle.path)
        scan = paths[0]
        for _ in range(3):  # warm-up (graph loaded or traced, first allocations): outside the timing
            model.predict(scan)
        lat = []
        for _ in range(50):
            t = time.perf_counter()
            model.predict(scan)
            lat.append((time.perf_counter() - t) * 1000)
        res["single_image_latency_ms"] = {"median": round(statistics.median(lat), 1),
                                          "p95": round(float(np.percentile(lat, 95)), 1), "n": 50,
                                          "path": "file -> decode -> preprocess -> backbone -> head -> probabilities"}
        print("latency", res["single_image_latency_ms"], flush=True)
        res["extract_peak_rss_mb"] = {f"{n}_images": peak_rss_mb_of_extract(oct_root, n, str(Path(d) / f"m{n}"))
                                      for n in (100, len(paths))}
        print("peak rss", res["extract_peak_rss_mb"], flush=True)
        res["heads_vs_logistic_regression"] = compare_heads(oct_root, str(Path(d) / "cmp"))
        print("heads", res["heads_vs_logistic_regression"], flush=True)
        if (Path(args.data) / "fundus-idrid").is_dir() and (Path(args.data) / "fundus-kaggle-dr").is_dir():
            res["fundus_referable_dr"] = bench_fundus(Path(args.data), Path(d))
            print("fundus", res["fundus_referable_dr"], flush=True)

    res["targets"] = {
        "inception_v3_extract_x_keras>=3": res["extract"][2]["x_keras"],
        "original_head_x_keras>=2": res["head_training"]["original_head_on_inception_8x8x2048"]["x_keras"],
        "single_image_latency_median_ms<20": res["single_image_latency_ms"]["median"],
        "inception_v3_share_of_arithmetic_limit>=0.5": res["extract"][2]["share_of_arithmetic_limit"],
    }
    return res


if __name__ == "__main__":
    main()
