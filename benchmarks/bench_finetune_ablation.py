"""Why `adamw-ema-cpu` lost to `classic`, and longer fine-tunes against the conv head, on bench_finetune's folds.

Two parts, on the same 5 patient folds of oct-kermany/train as bench_finetune and bench_cv (the folds'
digest is recorded), each merged into benchmarks/results.json under finetune.ablation / finetune.longer
after every fold:

- `ablation` (folds 1-2, FT_EPOCHS epochs, batch FT_BATCH, the last epoch scored): `adamw-ema-cpu` as
  it was bundled before its fix (ORIGINAL), then rows that each change one thing from it: no EMA, no
  label smoothing, `--lr` doubled (the warm-up + cosine averages about half the peak rate over the
  run, Adam's plateau schedule keeps the full rate), and the `oct` augmentation instead of `oct-scan`
  (the recipe as fixed: the same training as `--recipe adamw-ema-cpu` now). What the EMA's decay does over the run's optimiser steps is computed from
  timm's ModelEmaV3 itself (`ema_schedule`), for the bundled cap and for 0.99.
- `longer` (all 5 folds, FT_LONG_EPOCHS epochs): the recipes in FT_LONG_ROWS (comma-separated names),
  each fold's held-out probabilities also averaged with the conv head's out-of-fold ones (the ensemble
  row). Then, once, the row with the best CV mean is trained on all 619 scans (timed) and scored on
  oct-kermany/test: accuracy with its patient-bootstrap CI, DRUSEN recall, urgent (CNV+DME) AUC, and
  urgent sensitivity/specificity at the threshold fitted for 0.95 sensitivity on that row's out-of-fold
  probabilities.
- `test`: when the folds of `longer` ran in several processes (FT_LONG_FOLDS), waits for all 5, merges
  them (`merge_longer`, the decision rule applied) and scores the best row by CV once, as above but
  without the threshold (no process holds every fold's out-of-fold probabilities).

`python benchmarks/bench_finetune_ablation.py [ablation|longer|test] [SHARED_DATA]`.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable
from unittest.mock import patch

import numpy as np
import torch

from bench_finetune import BATCH, EPOCHS, ROOT, Prepared, _finetune, _probabilities, prepare
from retinalens.evaluate.metrics import classification_metrics
from retinalens.features.extract import extract_features, head_inputs
from retinalens.models.heads import head_probabilities
from retinalens.data.hashing import sha256_files
from retinalens.train.cv import refit
from retinalens.train.images import _batches
from retinalens.train.recipes import RECIPES, get_recipe
from retinalens.train.trainer import TrainConfig
from retinalens.trust.calibration import positive_score, referral_threshold

ABLATION_FOLDS = 2
# FT_ONLY="row|row": only these ablation rows, saved under finetune["ablation: row|row"] (a second process
# on other rows leaves the first one's section alone).
ONLY = [n for n in os.environ.get("FT_ONLY", "").split("|") if n]
# FT_LONG_FOLDS="3,4": only these folds of `longer` (1-based), saved under finetune["longer: folds 3,4"],
# and no test (it is scored once, when one process has run all 5 folds).
LONG_FOLDS = [int(f) - 1 for f in os.environ.get("FT_LONG_FOLDS", "").split(",") if f]
LONG_EPOCHS = int(os.environ.get("FT_LONG_EPOCHS", 8))
LONG_ROWS = os.environ.get("FT_LONG_ROWS", "classic,adamw-ema-cpu").split(",")
URGENT = ["CNV", "DME"]
# What the fix changed in `adamw-ema-cpu` (train/recipes.py says why): the recipe as measured before it.
ORIGINAL = {"oct_augment": "oct-scan"}
# name -> (changes to the original recipe, --augment (None: the recipe's), --lr (None: TrainConfig's)).
ABLATION: dict[str, tuple[dict[str, Any], str | None, float | None]] = {
    "adamw-ema-cpu (before the fix)": ({}, None, None),
    "without EMA": ({"ema_decay": None}, None, None),
    "--lr 2e-3": ({}, None, 2e-3),
    "without label smoothing": ({"label_smoothing": 0.0}, None, None),
    "oct augmentation (not oct-scan)": ({}, "oct", None),
}


def ema_schedule(steps: int, cap: float) -> dict[str, float]:
    """timm's ModelEmaV3 decay over `steps` updates as train/images.py steps it (its warm-up, 1 - (1 + t)^-3/4,
    capped at `cap`), and where the final average's weight lies."""
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=cap, use_warmup=True, warmup_power=0.75)
    decay = np.array([ema.get_decay(s) for s in range(1, steps + 1)])
    # The final average is sum_s w_s theta_s with w_s = (1 - d_s) prod_{t > s} d_t.
    weight = (1 - decay) * np.append(np.cumprod(decay[::-1])[::-1][1:], 1.0)
    return {"steps": steps, "cap": cap, "decay_at_last_step": round(float(decay[-1]), 4),
            "cap_reached": bool((decay >= cap).any()),
            "mean_step_of_average": round(float(weight @ np.arange(1, steps + 1)), 1),
            "weight_on_last_fifth_of_steps": round(float(weight[-(steps // 5):].sum()), 3)}


def _fold_row(row: dict[str, Any], fold: int, acc: float, seconds: float, curve: list[float],
              reference: list[float]) -> None:
    """Fold `fold` (0-based) of `row`, and the row's summary so far; `reference`: the conv head's fold accuracies."""
    row.setdefault("folds", []).append(fold + 1)
    row["fold_accuracy"].append(round(acc, 4))
    row["fold_seconds"].append(round(seconds, 1))
    row["fold_curves"].append(curve)
    row.setdefault("fold_load_1min", []).append(round(os.getloadavg()[0], 2))  # 2 shared cores: times are upper bounds
    a = np.asarray(row["fold_accuracy"])
    gain = a - np.asarray([reference[f - 1] for f in row["folds"]])
    row |= {"cv_accuracy_mean": round(float(a.mean()), 4),
            "cv_accuracy_sd": round(float(a.std(ddof=1)), 4) if len(a) > 1 else None,
            "gain_over_conv_head_per_fold": [round(float(g), 4) for g in gain],
            "seconds_per_fold_mean": round(float(np.mean(row["fold_seconds"])), 1)}
    if len(a) > 1:  # the decision rule's noise: the per-fold gains' standard error
        row |= {"gain_mean": round(float(gain.mean()), 4), "gain_se": round(float(gain.std(ddof=1) / np.sqrt(len(a))), 4),
                "folds_won": int((gain > 0).sum())}


def ablation(p: Prepared, save: Callable[[dict[str, Any]], None], scratch: Path) -> dict[str, Any]:
    base = replace(get_recipe("adamw-ema-cpu"), **ORIGINAL)
    fit0 = p.folds.split(0)[0]
    steps = EPOCHS * len(_batches(list(fit0), BATCH, 1))
    res: dict[str, Any] = {
        "folds": f"1-{ABLATION_FOLDS}", "epochs": EPOCHS, "batch_size": BATCH,
        "recipe_before_the_fix": asdict(base), "recipe_now": asdict(get_recipe("adamw-ema-cpu")),
        "ema_schedule": [ema_schedule(steps, cap) for cap in (0.998, 0.99)],
        "conv_head_fold_accuracy": p.conv.fold_accuracy[:ABLATION_FOLDS], "rows": {}}
    rows = {n: v for n, v in ABLATION.items() if n in ONLY} if ONLY else ABLATION
    for name, (changes, augment, lr) in rows.items():
        recipe = replace(base, name=f"adamw-ema-cpu~{len(res['rows'])}", **changes)
        row = res["rows"].setdefault(name, {"changes": changes, "augment": augment or recipe.oct_augment,
                                            "lr": lr or TrainConfig().lr, "fold_accuracy": [], "fold_seconds": [],
                                            "fold_curves": []})
        for f in range(ABLATION_FOLDS):
            fit, held = p.folds.split(f)
            with patch.dict(RECIPES, {recipe.name: recipe}):  # the variant, for this training only
                r, seconds = _finetune(p.bb, recipe.name, "frozen", [p.paths[i] for i in fit], p.y[fit],
                                       [p.paths[i] for i in held], p.y[held], scratch, augment=augment, lr=lr)
            _fold_row(row, f, r.result.history[-1]["val_acc"], seconds,
                      [round(h["val_acc"], 4) for h in r.result.history], p.conv.fold_accuracy)
            print(name, f"fold {f + 1}", json.dumps(row), flush=True)
            save(res)
    return res


def longer(p: Prepared, save: Callable[[dict[str, Any]], None], scratch: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"folds": f"1-{p.folds.k}", "epochs": LONG_EPOCHS, "batch_size": BATCH, "rows": {}}
    oof = {name: np.zeros((len(p.y), len(p.classes))) for name in LONG_ROWS}
    recipe_of: dict[str, tuple[str, bool]] = {}  # row -> (recipe, averaged with the conv head)
    for f in LONG_FOLDS or range(p.folds.k):
        fit, held = p.folds.split(f)
        held_paths = [p.paths[i] for i in held]
        for name in LONG_ROWS:
            r, seconds = _finetune(p.bb, name, "frozen", [p.paths[i] for i in fit], p.y[fit], held_paths, p.y[held],
                                   scratch, epochs=LONG_EPOCHS)
            alone, both_name = f"finetune {name}, {LONG_EPOCHS} epochs", f"ensemble: finetune {name} ({LONG_EPOCHS} epochs) + conv head"
            recipe_of |= {alone: (name, False), both_name: (name, True)}
            row = res["rows"].setdefault(alone,
                                         {"recipe": asdict(get_recipe(name)), "fold_accuracy": [], "fold_seconds": [],
                                          "fold_curves": []})
            _fold_row(row, f, r.result.history[-1]["val_acc"], seconds,
                      [round(h["val_acc"], 4) for h in r.result.history], p.conv.fold_accuracy)
            oof[name][held] = _probabilities(r, p.bb, held_paths)
            ens = res["rows"].setdefault(both_name,
                                         {"how": "mean of the two models' held-out probabilities", "fold_accuracy": [],
                                          "fold_seconds": [], "fold_curves": []})
            both = (oof[name][held] + p.conv.oof[held]) / 2
            _fold_row(ens, f, float((both.argmax(1) == p.y[held]).mean()), seconds, [], p.conv.fold_accuracy)
            print(name, f"fold {f + 1}", json.dumps(row), json.dumps(ens["fold_accuracy"]), flush=True)
            save(res)
    if LONG_FOLDS:
        return res
    chosen = max(res["rows"], key=lambda n: res["rows"][n]["cv_accuracy_mean"])
    name, ensemble = recipe_of[chosen]
    res["test"] = test_once(p, name, ensemble, scratch, oof[name]) | {
        "row": chosen, "chosen_by": "the best CV mean over this part's rows (5 folds)"}
    save(res)
    return res


def test_once(p: Prepared, name: str, ensemble: bool, scratch: Path, train_oof: np.ndarray | None) -> dict[str, Any]:
    """Recipe `name` (LONG_EPOCHS epochs) trained on all of train, timed, scored on test; `ensemble`: averaged
    with the conv head refitted on all of train. `train_oof`: the recipe's out-of-fold probabilities, for
    the referral threshold (None: it is not fitted, the urgent AUC alone is reported)."""
    test_paths = [s.path for s in p.test_ds.samples]
    r, seconds = _finetune(p.bb, name, "frozen", p.paths, p.y, test_paths, p.y_test, scratch, epochs=LONG_EPOCHS)
    probs = _probabilities(r, p.bb, test_paths)
    if ensemble:  # the conv head refitted on all of train (its chosen epoch count), on the test scans' features
        head = refit(p.conv, p.inputs, p.y, num_classes=len(p.classes), feature_shape=p.cache.key.feature_shape,
                     train=TrainConfig()).head
        hashes = sha256_files(test_paths)
        extract_features(test_paths, hashes, p.bb, p.cache, precision=p.section["settings"]["precision"], progress=False)
        probs = (probs + head_probabilities(head, head_inputs(p.cache, hashes, "spatial"))) / 2
        train_oof = None if train_oof is None else (train_oof + p.conv.oof) / 2
    urgent = np.isin(p.y, [p.classes.index(c) for c in URGENT])
    t = (referral_threshold(positive_score(train_oof, p.classes, URGENT), urgent, 0.95) if train_oof is not None
         else None)
    m = classification_metrics(p.y_test, probs, p.classes, [s.patient for s in p.test_ds.samples],
                               positive_classes=URGENT, n_boot=1000, seed=0, **({"threshold": t["threshold"]} if t else {}))
    u = m["urgent_referral"]
    out = {"test_accuracy": round(m["accuracy"], 4), "test_accuracy_ci": [round(v, 4) for v in m["accuracy_ci"]],
           "drusen_recall": round(m["per_class"]["DRUSEN"]["recall"], 4), "urgent_auc": round(u["auc"], 4),
           "urgent_auc_ci": u["auc_ci"], "seconds_train_all_619": round(seconds, 1), "epochs": LONG_EPOCHS,
           "threads": torch.get_num_threads()}
    if t is not None:
        out |= {"urgent_threshold_fitted_out_of_fold": {k: round(v, 4) for k, v in t.items()},
                "urgent_sensitivity": round(u["sensitivity"], 4), "urgent_sensitivity_ci": u["sensitivity_ci"],
                "urgent_specificity": round(u["specificity"], 4), "urgent_specificity_ci": u["specificity_ci"]}
    return out


def merge_longer(section: dict[str, Any], k: int) -> dict[str, Any] | None:
    """The `longer` rows of every process (finetune.longer, finetune["longer: folds N"]) as one set of k
    folds, with the decision rule (fixed before the runs) applied; None until every fold is in."""
    parts = [v for n, v in section.items() if n == "longer" or n.startswith("longer: folds")]
    rows: dict[str, dict[int, float]] = {}
    for part in parts:
        for name, row in part["rows"].items():
            rows.setdefault(name, {}).update(zip(row.get("folds", range(1, len(row["fold_accuracy"]) + 1)),
                                                 row["fold_accuracy"]))
    if not rows or any(len(r) < k for r in rows.values()):
        return None
    conv = section["rows"]["conv head (same folds, cached features)"]
    out: dict[str, Any] = {}
    for name, by_fold in rows.items():
        a = np.array([by_fold[f] for f in range(1, k + 1)])
        gain = a - np.asarray(conv["fold_accuracy"])
        se = float(gain.std(ddof=1) / np.sqrt(k))
        wins = bool(a.mean() > conv["cv_accuracy_mean"] and (gain > 0).sum() >= 4 and gain.mean() > se)
        out[name] = {"fold_accuracy": [round(float(v), 4) for v in a], "cv_accuracy_mean": round(float(a.mean()), 4),
                     "cv_accuracy_sd": round(float(a.std(ddof=1)), 4), "gain_over_conv_head_per_fold": [round(float(g), 4) for g in gain],
                     "gain_mean": round(float(gain.mean()), 4), "gain_se": round(se, 4), "folds_won": int((gain > 0).sum()),
                     "wins_by_the_rule": wins}
    return {"rule": "CV mean above the conv head's, at least 4 of 5 folds won, mean per-fold gain above sd/sqrt(5)",
            "rows": out}


def _saver(part: str, command: str) -> Callable[[dict[str, Any]], None]:
    def save(section: dict[str, Any]) -> None:
        out = ROOT / "benchmarks" / "results.json"
        with open(out, "r+") as f:  # locked: two of these processes may save at once
            fcntl.flock(f, fcntl.LOCK_EX)
            res = json.load(f)
            res.setdefault("finetune", {})[part] = {**section, "threads": torch.get_num_threads(), "command": command}
            f.seek(0)
            f.truncate()
            f.write(json.dumps(res, indent=2) + "\n")
    return save


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else "ablation"
    key = (f"{part}: {'|'.join(ONLY)}" if ONLY and part == "ablation" else
           f"{part}: folds {os.environ['FT_LONG_FOLDS']}" if LONG_FOLDS and part == "longer" else
           "longer: test" if part == "test" else part)  # finetune["test"] is bench_finetune's
    data = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(os.environ.get("RETINALENS_SHARED_DATA",
                                                                          ROOT.parent / "shared" / "data"))
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-finetune-{part}-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    prepared = prepare(data)
    save = _saver(key, " ".join(["python", *sys.argv]))
    if part == "test":  # the row with the best CV mean once the `longer` processes have run every fold
        while (merged := merge_longer(json.loads((ROOT / "benchmarks" / "results.json").read_text())["finetune"],
                                      prepared.folds.k)) is None:
            time.sleep(20)
        _saver("longer, 5 folds merged", "merge_longer")(merged)
        best = max(merged["rows"], key=lambda n: merged["rows"][n]["cv_accuracy_mean"])
        row = "classic+conv" if best.startswith("ensemble") else "classic"
        result = test_once(prepared, row.removesuffix("+conv"), row.endswith("+conv"), scratch, None) | {"row": row}
        save(result)
    else:
        result = {"ablation": ablation, "longer": longer}[part](prepared, save, scratch)
    print(json.dumps(result, indent=2))
