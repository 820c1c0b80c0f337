"""Fundus referable DR, cross-validated: which backbone, input size, head, ensemble and TTA to use.

The split is bench_fundus's (benchmarks/bench_training.py: fundus_split_csv): IDRiD + the Kaggle
sample, a patient-grouped stratified 20% test split (108 photos), untouched until the end. The
training photos are those `retinalens train` keeps (near-duplicates of test photos removed) in the 5
patient-grouped, stratified folds it makes (train/cv.py make_folds, seed 0, near-duplicate pairs of
different patients in one fold); every row is scored on those folds: ROC-AUC of the referable class
per fold (mean +- sd), accuracy, the gain over the logistic-regression baseline per fold, and the
out-of-fold AUC with its patient-bootstrap CI.

Features: every photo is decoded once (data/decode.py, as the model does), resized by each
backbone's own Preprocessing.pixels at each input size (the model's one path from a decoded image to
its input), and encoded by the traced backbone at the precision `auto` picks; the identity view goes
into the feature cache (features/cache.py: the one `retinalens train` reads, so the chosen recipe's
refit reuses it), the left-right flip (bundle/network.py tta_view "flip") into a side file.

Rows (each a candidate on the same folds):
- baseline: logistic regression C=0.1 on standardised pooled Lite0-224 features;
- the pipeline's rows: what `retinalens train --task referable [--input-size S]` does (`--head auto`
  on Lite0 at S: the conv head and logistic regression at C 0.01, 0.1, 1, chosen on mean fold
  accuracy), S = 224 (the default), 320, 384;
- logistic regression (C 0.01, 0.1, 1) on every (backbone, input size) below, with and without TTA
  (probabilities averaged over the identity and the flip view);
- ensembles: probability average of members, and their concatenated pooled features in one
  logistic regression.

The choice (written to disk before test is read): the pipeline row with the best CV AUC, when it beats
the baseline on >= 4 of 5 folds with a mean gain above sd(gains)/sqrt(5); else the default. Then, once,
its test AUC with a patient-bootstrap CI; the other rows' test figures are computed after the choice
(`test_after_choice`). Last, the pipeline itself: `retinalens.train` from a cold cache, timed, and
`retinalens.evaluate` on the test split.

`python benchmarks/bench_fundus_cv.py [DATA [cv|pipeline-train|pipeline-evaluate]]` (one part alone;
`benchmarks/run.py --only fundus_cv` runs all three); RETINALENS_BENCH_WORK keeps the features between
runs (default /tmp/retinalens-fundus-cv); RETINALENS_THREADS sets the torch threads (on a loaded
2-core machine 1 is several times faster for the head fits).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from fundus_folds import K, SEED, auto_head, inputs as _inputs, photos, training_folds  # noqa: E402

BASELINE_C = 0.1
CS = (0.01, 0.1, 1.0)
# (backbone, input size): the registry's offline backbones at their own size and larger. Fundus
# lesions (microaneurysms, exudates) are a few pixels of a 1536-px photo: 224 px loses most of them.
FEATURE_SETS = (("efficientnet_lite0", 224), ("efficientnet_lite0", 384), ("efficientnet_lite2", 260),
                ("mobilenet_v2", 224), ("efficientnet_lite1", 240), ("efficientnet_lite0", 320))
BASE_SET = ("efficientnet_lite0", 224)


def _decode_all(paths: list[Path]) -> list[Any]:
    from retinalens.data.decode import decode_image

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda p: decode_image(p, keep_grey=True), paths))


def extract_sets(paths: list[Path], hashes: list[str], work: Path, sets: tuple[tuple[str, int], ...]) -> dict[str, Any]:
    """Identity features of every (backbone, size) into the feature cache, flip-view pooled features
    into work/flip-*.npy; returns seconds per set. Photos are decoded once for all sets."""
    from dataclasses import replace

    from retinalens.bundle.network import tta_view
    from retinalens.features.extract import open_cache
    from retinalens.models.registry import create_backbone, resolve_precision

    precision = resolve_precision("auto")
    images: list[Any] | None = None
    timing: dict[str, Any] = {}
    for name, size in sets:
        bb = create_backbone(name)
        bb.preprocessing = replace(bb.preprocessing, size=size)
        cache = open_cache(work / "cache", bb, precision)
        flip_file = work / f"flip-{name}-{size}.npy"
        if not cache.missing(hashes) and flip_file.is_file():
            continue
        if images is None:
            t = time.perf_counter()
            images = _decode_all(paths)
            timing["decode_s"] = round(time.perf_counter() - t, 1)
            print(f"decoded {len(paths)} photos in {timing['decode_s']} s", flush=True)
        t = time.perf_counter()
        pooled, spatial, flipped = [], [], []
        for i in range(0, len(images), 16):
            x = torch.stack([bb.preprocessing.pixels(img) for img in images[i:i + 16]])
            s, p = bb.encode(x, precision)
            spatial.append(s.numpy())
            pooled.append(p.numpy())
            flipped.append(bb.encode(tta_view("flip", x), precision)[1].numpy())
        cache.write_chunk(list(hashes), np.concatenate(pooled), np.concatenate(spatial))
        np.save(flip_file, np.concatenate(flipped))
        timing[f"{name}-{size}"] = round(time.perf_counter() - t, 1)
        print(f"features {name} {size} px (identity + flip): {timing[f'{name}-{size}']} s", flush=True)
    return timing


def _load_set(work: Path, name: str, size: int, hashes: list[str]) -> dict[str, Any]:
    from dataclasses import replace

    from retinalens.features.extract import open_cache
    from retinalens.models.registry import create_backbone, resolve_precision

    bb = create_backbone(name)
    bb.preprocessing = replace(bb.preprocessing, size=size)
    cache = open_cache(work / "cache", bb, resolve_precision("auto"))
    return {"cache": cache, "pooled": cache.pooled(hashes), "flip": np.load(work / f"flip-{name}-{size}.npy"),
            "shape": cache.key.feature_shape}


def _fold_scores(p: np.ndarray, y: np.ndarray, folds: Any) -> dict[str, list[float]]:
    from sklearn.metrics import roc_auc_score

    held = [folds.split(f)[1] for f in range(folds.k)]
    return {"auc": [float(roc_auc_score(y[h], p[h])) for h in held],
            "accuracy": [float(((p[h] >= 0.5) == y[h]).mean()) for h in held]}


def logreg_oof(x: np.ndarray, x_flip: np.ndarray | None, y: np.ndarray, folds: Any, c: float) -> np.ndarray:
    """P(referable) out of fold: logistic regression fitted on each fold's rest (identity features),
    averaged over the identity and the flip view when x_flip is given (TTA)."""
    from retinalens.models.heads import head_probabilities
    from retinalens.train.trainer import fit_logistic

    p = np.zeros(len(y))
    for f in range(folds.k):
        fit, held = folds.split(f)
        head, _ = fit_logistic(x[fit], y[fit], c, num_classes=2, feature_shape=(x.shape[1], 1, 1), seed=SEED)
        views = [x[held]] + ([x_flip[held]] if x_flip is not None else [])
        p[held] = np.mean([head_probabilities(head, v)[:, 1] for v in views], axis=0)
    return p


def logreg_test(x: np.ndarray, x_flip: np.ndarray | None, y: np.ndarray, t: np.ndarray, t_flip: np.ndarray | None,
                c: float) -> np.ndarray:
    from retinalens.models.heads import head_probabilities
    from retinalens.train.trainer import fit_logistic

    head, _ = fit_logistic(x, y, c, num_classes=2, feature_shape=(x.shape[1], 1, 1), seed=SEED)
    views = [t] + ([t_flip] if t_flip is not None else [])
    return np.mean([head_probabilities(head, v)[:, 1] for v in views], axis=0)


def summarise(p: np.ndarray, y: np.ndarray, folds: Any, patients: list[str], base: dict[str, list[float]] | None,
              seconds: float) -> dict[str, Any]:
    from retinalens.evaluate.metrics import classification_metrics

    s = _fold_scores(p, y, folds)
    m = classification_metrics(y, np.stack([1 - p, p], 1), ["non-referable", "referable"], patients,
                               positive_classes=["referable"], n_boot=1000, seed=0)
    row = {"cv_auc_mean": round(float(np.mean(s["auc"])), 4), "cv_auc_sd": round(float(np.std(s["auc"], ddof=1)), 4),
           "cv_fold_auc": [round(a, 4) for a in s["auc"]],
           "cv_accuracy_mean": round(float(np.mean(s["accuracy"])), 4),
           "cv_accuracy_sd": round(float(np.std(s["accuracy"], ddof=1)), 4),
           "oof_auc": round(m["urgent_referral"]["auc"], 4),
           "oof_auc_ci": [round(v, 4) for v in m["urgent_referral"]["auc_ci"]], "seconds_cv": round(seconds, 1)}
    if base is not None:
        gain = np.array(s["auc"]) - np.array(base["auc"])
        row["gain_vs_baseline"] = {"per_fold": [round(float(g), 4) for g in gain], "mean": round(float(gain.mean()), 4),
                                   "sd": round(float(gain.std(ddof=1)), 4),
                                   "folds_won_lost": [int((gain > 0).sum()), int((gain < 0).sum())]}
    return row


def beats_baseline(row: dict[str, Any]) -> bool:
    """More than fold noise: won on >= 4 of 5 folds and a mean gain above sd(gains) / sqrt(k)."""
    g = row.get("gain_vs_baseline")
    return bool(g) and g["folds_won_lost"][0] >= 4 and bool(g["mean"] > g["sd"] / np.sqrt(K))


def test_auc(y_test: np.ndarray, p: np.ndarray, patients: list[str]) -> dict[str, Any]:
    from retinalens.evaluate.metrics import classification_metrics

    m = classification_metrics(y_test, np.stack([1 - p, p], 1), ["non-referable", "referable"], patients,
                               positive_classes=["referable"], n_boot=1000, seed=0)
    u = m["urgent_referral"]
    return {"test_auc": round(u["auc"], 4), "test_auc_ci": [round(v, 4) for v in u["auc_ci"]],
            "test_accuracy": round(m["accuracy"], 4), "test_accuracy_ci": [round(v, 4) for v in m["accuracy_ci"]]}


def _work() -> Path:
    work = Path(os.environ.get("RETINALENS_BENCH_WORK", "/tmp/retinalens-fundus-cv"))
    work.mkdir(parents=True, exist_ok=True)
    return work


def run(shared: Path) -> dict[str, Any]:
    """The whole section: the CV table and its choice, then the pipeline trained and evaluated."""
    return cv_table(shared) | {"pipeline": pipeline_train(shared) | pipeline_evaluate()}


def cv_table(shared: Path) -> dict[str, Any]:
    from retinalens.train.trainer import TrainConfig

    torch.set_num_threads(int(os.environ.get("RETINALENS_THREADS", "2")))
    work = _work()
    combined, n_photos, ds, hashes = photos(shared, work)
    load0 = os.getloadavg()[0]
    timing = extract_sets([s.path for s in ds.samples], hashes, work, FEATURE_SETS)
    sets = {f"{n}-{s}": _load_set(work, n, s, hashes) for n, s in FEATURE_SETS}
    # Near-duplicate pairs found on the features of Lite0 at 384 px (the default when this table chose).
    data, tr, te, y, y_test, patients, test_patients, folds = training_folds(ds, hashes,
                                                                             sets["efficientnet_lite0-384"]["cache"])

    rows: dict[str, Any] = {}
    oofs: dict[str, np.ndarray] = {}
    recipes: dict[str, dict[str, Any]] = {}  # row -> how to refit it for the test split
    base_scores: dict[str, list[float]] | None = None

    def add(name: str, p: np.ndarray, seconds: float, recipe: dict[str, Any]) -> None:
        nonlocal base_scores
        rows[name] = summarise(p, y, folds, patients, base_scores, seconds)
        if base_scores is None:
            base_scores = _fold_scores(p, y, folds)
        oofs[name], recipes[name] = p, recipe
        print(name, json.dumps(rows[name]), flush=True)

    base = sets["-".join(map(str, BASE_SET))]
    t = time.perf_counter()
    add("baseline: logreg C=0.1, lite0 224", logreg_oof(base["pooled"][tr], None, y, folds, BASELINE_C),
        time.perf_counter() - t, {"sets": ["efficientnet_lite0-224"], "c": BASELINE_C, "tta": False})

    # What `retinalens train --task referable [--input-size S]` does: --head auto through train/cv.py
    # (the conv head and logreg at each C, chosen on mean fold accuracy), on Lite0 at each size.
    keys = [hashes[i] for i in tr]
    pipeline_rows: list[str] = []
    for key in (k for k in sets if k.startswith("efficientnet_lite0-")):
        cache, size = sets[key]["cache"], key.rsplit("-", 1)[1]
        t = time.perf_counter()
        results, auto = auto_head(cache, keys, y, folds, sets[key]["shape"])
        seconds_auto = time.perf_counter() - t
        for r in results:
            if r.candidate.head.kind == "conv":
                add(f"conv head ({r.epochs} epochs), lite0 {size}", r.oof[:, 1], seconds_auto,
                    {"conv": r, "set": key})
        what = ("default before: --head auto" if key == "-".join(map(str, BASE_SET))
                else f"--input-size {size}: --head auto")
        pipeline_rows.append(f"{what} on lite0 {size} (chose {auto.candidate.name})")
        add(pipeline_rows[-1], auto.oof[:, 1], seconds_auto, {"auto": auto, "set": key})

    for key, f in sets.items():
        for c in CS:
            for tta in (False, True):
                t = time.perf_counter()
                p = logreg_oof(f["pooled"][tr], f["flip"][tr] if tta else None, y, folds, c)
                add(f"logreg C={c:g}, {key}" + (" + TTA flip" if tta else ""), p, time.perf_counter() - t,
                    {"sets": [key], "c": c, "tta": tta})

    # Ensembles of the best row of each backbone (by CV AUC): probabilities averaged, and features concatenated.
    best_of: dict[str, str] = {}
    for name, r in rows.items():
        rec = recipes[name]
        if "sets" in rec and len(rec["sets"]) == 1 and not name.startswith("baseline"):
            bb = rec["sets"][0].rsplit("-", 1)[0]
            if bb not in best_of or r["cv_auc_mean"] > rows[best_of[bb]]["cv_auc_mean"]:
                best_of[bb] = name
    members = list(best_of.values())
    add("ensemble: mean probability of " + "; ".join(members), np.mean([oofs[m] for m in members], axis=0), 0.0,
        {"members": members})
    for c in CS:
        cat_sets = [recipes[m]["sets"][0] for m in members]
        x = np.concatenate([sets[s]["pooled"][tr] for s in cat_sets], axis=1)
        xf = np.concatenate([sets[s]["flip"][tr] for s in cat_sets], axis=1)
        for tta in (False, True):
            t = time.perf_counter()
            add(f"concatenated features of {', '.join(cat_sets)}, logreg C={c:g}" + (" + TTA flip" if tta else ""),
                logreg_oof(x, xf if tta else None, y, folds, c), time.perf_counter() - t,
                {"sets": cat_sets, "c": c, "tta": tta})

    # The default can only be what the pipeline does: the choice is among its rows (the others are options).
    best = max(rows, key=lambda k: rows[k]["cv_auc_mean"])
    best_pipeline = max(pipeline_rows, key=lambda k: rows[k]["cv_auc_mean"])
    chosen = best_pipeline if beats_baseline(rows[best_pipeline]) else pipeline_rows[0]
    result: dict[str, Any] = {
        "data": f"IDRiD + Kaggle DR sample ({n_photos} photos), referable = grade >= 2; train {len(tr)} photos "
                f"(after near-duplicates of test photos are removed, as train does) "
                f"({len(set(patients))} patients) in {K} patient-grouped stratified folds (seed {SEED}); test "
                f"{len(te)} photos ({len(set(test_patients))} patients), untouched until the choice",
        "folds": folds.record([ds.samples[i].label for i in tr], patients), "feature_seconds": timing,
        "removed_near_duplicates_of_test": len(data.splits.removed), "linked_patients": len(data.linked),
        "precision": base["cache"].key.precision, "load_average_1min_at_start": round(load0, 2),
        "rows": rows, "best_on_cv": best, "best_pipeline_row_on_cv": best_pipeline,
        "beats_baseline_beyond_fold_noise": {k: beats_baseline(rows[k]) for k in (best, best_pipeline)},
        "chosen": chosen, "rule": "the pipeline row (train --task referable [--input-size S]) with the best CV AUC, "
                                  "if it beats the baseline on >= 4 of 5 folds with a mean gain above sd/sqrt(5); "
                                  "else the default before"}
    (work / "cv-rows.json").write_text(json.dumps(result, indent=1))  # the choice is on disk before test is read

    def test_probs(name: str) -> np.ndarray:
        rec = recipes[name]
        if "members" in rec:
            return np.mean([test_probs(m) for m in rec["members"]], axis=0)
        if "sets" in rec:
            x = np.concatenate([sets[s]["pooled"] for s in rec["sets"]], axis=1)
            xf = np.concatenate([sets[s]["flip"] for s in rec["sets"]], axis=1)
            return logreg_test(x[tr], xf[tr], y, x[te], xf[te] if rec["tta"] else None, rec["c"])
        from retinalens.models.heads import head_probabilities
        from retinalens.train.cv import refit

        r, f = rec.get("auto") or rec["conv"], sets[rec["set"]]
        k = [hashes[i] for i in te]
        fitted = refit(r, _inputs(f["cache"], keys), y, num_classes=2, feature_shape=f["shape"], train=TrainConfig())
        tx = f["cache"].pooled(k) if r.candidate.head.input_kind == "pooled" else f["cache"].spatial(k)
        return head_probabilities(fitted.head, tx)[:, 1]

    result["chosen_test"] = test_auc(y_test, test_probs(result["chosen"]), test_patients)
    print("chosen", result["chosen"], json.dumps(result["chosen_test"]), flush=True)
    result["test_after_choice"] = {name: test_auc(y_test, test_probs(name), test_patients) for name in rows}
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return result


def pipeline_train(shared: Path) -> dict[str, Any]:
    """`retinalens train --task referable` as it now is (its default input size), from a cold feature
    cache, timed; `pipeline_evaluate` then scores it on the test split (the figures a user gets)."""
    import shutil

    import retinalens
    from bench_training import fundus_split_csv

    work = _work()
    combined, _ = fundus_split_csv(shared, work)
    cold = work / "pipeline-cache"
    shutil.rmtree(cold, ignore_errors=True)
    shutil.rmtree(work / "pipeline-bundle", ignore_errors=True)
    t = time.perf_counter()
    bundle = retinalens.train(combined, work / "pipeline-bundle", task="referable", cache=cold)
    cv = bundle.manifest.to_dict()["training"]["cv"]
    out = {"train_seconds_cold_cache": round(time.perf_counter() - t, 1),
           "load_average_1min": round(os.getloadavg()[0], 2), "input_size": bundle.preprocessing.size,
           "cv_chose": cv["chosen"],
           "cv_accuracy_mean_sd": {c["name"]: [round(c["accuracy_mean"], 4), round(c["accuracy_sd"], 4)]
                                   for c in cv["candidates"]}}
    (work / "pipeline-train.json").write_text(json.dumps(out, indent=1))
    return out


def pipeline_evaluate() -> dict[str, Any]:
    """The pipeline's bundle on the test split, through `retinalens.evaluate`."""
    import retinalens
    from bench_training import referable_summary

    work = _work()
    bundle = retinalens.load(work / "pipeline-bundle").bundle
    seconds = json.loads((work / "pipeline-train.json").read_text())["train_seconds_cold_cache"]
    return referable_summary(bundle, work / "fundus.csv", work / "pipeline-cache", seconds)


if __name__ == "__main__":
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("RETINALENS_SHARED_DATA",
                                                                          ROOT.parent / "shared" / "data"))
    part = sys.argv[2] if len(sys.argv) > 2 else "all"  # cv | pipeline-train | pipeline-evaluate: one part alone
    parts = {"all": run, "cv": cv_table, "pipeline-train": pipeline_train,
             "pipeline-evaluate": lambda _: pipeline_evaluate()}
    text = json.dumps(parts[part](data), indent=1)
    print(text)
    (_work() / f"result-{part}.json").write_text(text)
