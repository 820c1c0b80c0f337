"""The bad-input corpus through every entry point: CLI predict, the Python API, explain, evaluate, train
and the web app. Each test collects every broken rule and fails once with the list (robustness/checks.py).

The rules: no traceback and exit code 0 or 2 (never 1); no HTTP 500 and the server still answers; every
`valid` item predicted; no `error` or `ungradable` item given a class label; no raw terminal escape from a
file name on stdout or stderr. Peak memory over the bombs is a benchmark (benchmarks/bench_corpus.py).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest

from retinalens.demo import DEMO_DATA
from robustness.checks import (ERROR, LABELLED, MISSING, REFUSED, Violations, benign_damage, by_input, outcome_of,
                              run_cli)
from robustness.corpus import EXPECTS, OCT_CLASSES, ODD_NAMES, Spec, build, corpus_specs, subset

API_TIMEOUT_S = 300  # 60 items through predict_many take well under a minute on 2 cores


def _printable(name: str) -> bool:
    return name.isascii() and name.isprintable()


def test_corpus_is_deterministic_and_covers_every_class(corpus: list[Spec], corpus_sources: list[Path]) -> None:
    again = corpus_specs(corpus_sources[:1])
    first = {s.name: s for s in corpus}
    assert again and all(first[s.name] == s for s in again if s.name in first)  # same bytes from the same scan
    assert len(corpus) >= 180  # 190 from the demo alone, 260 with the shared set
    counts = Counter(s.expect for s in corpus)
    assert all(counts[e] >= 20 for e in EXPECTS), counts
    classes = {s.cls for s in corpus}
    assert {"jpeg-truncated", "jpeg-bitflip", "jpeg-zeroed-run", "png-truncated-zlib", "png-bad-crc", "bomb",
            "format-confusion", "tiny", "strip", "uniform", "noise", "odd-name", "symlink-loop", "dangling-symlink",
            "fifo", "directory", "empty", "jpeg-dc-shift"} <= classes


def test_predict_cli_over_the_whole_corpus(small_bundle, corpus: list[Spec], corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = run_cli("predict", small_bundle.path, corpus_dir, "--json", out, "--quiet")
    v = Violations("retinalens predict BUNDLE CORPUS --json")
    v.check_process(proc)
    if out.is_file():
        results = json.loads(out.read_text())
        v.check_outcomes(corpus, by_input(results, corpus_dir, corpus))
        inputs = [r["input"] for r in results]
        for i in [i for i in inputs if not i.startswith(str(corpus_dir))] + [i for i, n in Counter(inputs).items() if n > 1]:
            v.add("process", "a result names a path outside the corpus, or twice", repr(i))
    else:
        v.add("process", "no JSON written", repr(proc.stderr[-300:]))
    v.assert_none()


def test_predict_many_api_on_each_item_by_path(small_bundle, corpus: list[Spec], corpus_dir: Path) -> None:
    """Items given by their own paths (a FIFO or a dangling link named directly, not found by a walk): 60
    covering every class (the whole corpus goes through the CLI's folder walk and the web app)."""
    from retinalens.predict.model import load

    model = load(small_bundle.path)
    items = subset(corpus, 60)
    paths = [str(corpus_dir / s.name) for s in items]
    with ThreadPoolExecutor(1) as pool:  # a reader stuck on the FIFO fails the test instead of hanging it
        job = pool.submit(model.predict_many, paths)
        try:
            results = job.result(timeout=API_TIMEOUT_S)
        except FutureTimeout:
            pytest.fail(f"Model.predict_many did not finish within {API_TIMEOUT_S} s (stuck on an input?)")
        except Exception as exc:  # any exception is a finding: bad input must become error entries
            pytest.fail(f"Model.predict_many raised {type(exc).__name__}: {exc}")
    v = Violations("Model.predict_many(paths)")
    v.check_outcomes(items, by_input(results, corpus_dir, items))
    v.assert_none()


def test_web_app_each_item(corpus_server: str, corpus: list[Spec]) -> None:
    """One POST per item: never a 500, one result per file, and the server still answers afterwards."""
    import httpx

    v = Violations("POST /api/predict, one item per request")
    outcomes: dict[str, tuple[str, str]] = {}
    with httpx.Client(base_url=corpus_server, timeout=120) as client:
        for s in (s for s in corpus if s.has_bytes):
            sent = s.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            try:
                r = client.post("/api/predict", files=[("files", (sent, s.data, "application/octet-stream"))])
            except httpx.HTTPError as exc:
                v.add(s.cls, "connection failed", f"{s.name!r}: {type(exc).__name__}: {exc}")
                continue
            if r.status_code >= 500:
                v.add(s.cls, f"HTTP {r.status_code}", f"{s.name!r}: {r.text[:200]!r}")
                outcome, detail = "missing", f"HTTP {r.status_code}"
            elif r.status_code != 200:  # a refusal (4xx) is an error entry of its own
                outcome, detail = ERROR, f"HTTP {r.status_code}"
            else:
                results = r.json()["results"]
                if len(results) != 1:
                    v.add(s.cls, "not one result per file", f"{s.name!r}: {results!r:.200}")
                result = results[0] if results else None
                outcome, detail = outcome_of(result), str((result or {}).get("error") or (result or {}).get("label"))
            outcomes[s.name] = (outcome, detail)
        v.check_outcomes([s for s in corpus if s.has_bytes], outcomes)  # at once: a copy's source is known
        health = client.get("/healthz")
        if health.status_code != 200:
            v.add("process", "server unhealthy after the corpus", f"/healthz: HTTP {health.status_code}")
    v.assert_none()


EXPLAIN_MUST = (ODD_NAMES[0], ODD_NAMES[6], ODD_NAMES[8], ODD_NAMES[10])  # long, escape, newline, non-UTF-8


def test_explain_on_a_subset_covering_every_class(small_bundle, corpus: list[Spec], tmp_path: Path) -> None:
    """`retinalens explain` on ~30 items (every class, and the names that break derived file names):
    exactly the valid items get a heat map with a predicted class."""
    items = subset(corpus, 30, must=EXPLAIN_MUST)
    folder = build(items, tmp_path / "items")
    out = tmp_path / "heatmaps"
    proc = run_cli("explain", small_bundle.path, folder, "--out", out)
    v = Violations("retinalens explain BUNDLE SUBSET")
    v.check_process(proc)
    predicted = [ln for ln in proc.stdout.splitlines() if " -> " in ln and "(predicted " in ln]
    outcomes = {}
    for s in items:  # names that print as themselves can be found in the output; the others are counted
        if _printable(s.name):
            line = next((ln for ln in predicted if ln.startswith(f"{folder / s.name} -> ")), None)
            failed = any(s.name in ln for ln in proc.stderr.splitlines() if "failed" in ln)
            refused = any(s.name in ln for ln in proc.stderr.splitlines() if "ungradable" in ln)  # the gate's
            outcome = LABELLED if line else (ERROR if failed else REFUSED if refused else "missing")
            outcomes[s.name] = (outcome, line.split("(predicted ")[1].split()[0] if line else "")
    v.check_outcomes([s for s in items if _printable(s.name)], outcomes)
    n_valid = sum(s.expect == "valid" for s in items)
    n_benign = sum(outcomes.get(s.name, ("", ""))[0] == LABELLED and benign_damage(s) for s in items)
    if len(predicted) != n_valid + n_benign:
        v.add("count", "heat maps with a predicted class != valid items",
              f"{len(predicted)} predicted, {n_valid} valid (and {n_benign} benignly damaged) in the subset")
    pngs = list(out.glob("*.png")) if out.is_dir() else []
    if len(pngs) != len(predicted):
        v.add("count", "PNG files != heat-map lines", f"{len(pngs)} files, {len(predicted)} lines")
    v.assert_none()


def _class_tree(root: Path, specs: list[Spec], real: dict[str, list[Path]]) -> dict[str, Path]:
    """ROOT/CLASS/ with the real scans of each class and the corpus items spread over the classes (a
    symlink in its target's folder). Returns item name -> the folder it went to."""
    where: dict[str, str] = {}
    for k, s in enumerate(s for s in specs if s.kind != "symlink"):
        where[s.name] = OCT_CLASSES[k % len(OCT_CLASSES)]
    for s in specs:
        if s.kind == "symlink":
            where[s.name] = where.setdefault(s.target, where.get(s.name, OCT_CLASSES[0]))
    for cls, paths in real.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, root / cls / p.name)
    for cls in OCT_CLASSES:
        build([s for s in specs if where[s.name] == cls], root / cls)
    return {name: root / cls for name, cls in where.items()}


def _real(split: str, n: int) -> dict[str, list[Path]]:
    return {c: sorted((DEMO_DATA / split / c).glob("*.jpeg"))[:n] for c in OCT_CLASSES}


def test_evaluate_on_a_tree_mixing_corpus_and_real_scans(small_bundle, corpus: list[Spec], tmp_path: Path) -> None:
    items = subset(corpus, 40, must=(ODD_NAMES[6],))
    folders = _class_tree(tmp_path / "tree", items, _real("test", 4))
    out = tmp_path / "metrics.json"
    proc = run_cli("evaluate", small_bundle.path, tmp_path / "tree", "--json", out, "--n-boot", 20,
                   "--cache", tmp_path / "cache", "--quiet")
    v = Violations("retinalens evaluate BUNDLE MIXED-TREE")
    v.check_process(proc)
    if not out.is_file():
        v.add("process", "no metrics written", repr(proc.stderr[-300:]))
        v.assert_none()
    m = json.loads(out.read_text())
    failed = {f["input"] for f in m["failures"]}
    # Evaluation gives no per-image label: an item it read is counted in the metrics (graded); the
    # gate's refusals are counted, not named, so ungradable items are checked by number.
    # An entry that is no regular file (a FIFO, a loop) and is not a failure was left out unsaid.
    read = {s.name for s in items if str(folders[s.name] / s.name) not in failed}
    outcomes = {s.name: (ERROR, "") if s.name not in read else (MISSING, "not among the failures")
                if not (folders[s.name] / s.name).is_file() else (LABELLED, "counted in the metrics") for s in items}
    v.check_outcomes([s for s in items if s.expect != "ungradable"], outcomes)
    read_ungradable = sum(s.expect == "ungradable" and outcomes[s.name][0] == LABELLED and not benign_damage(s)
                          for s in items)
    rejected = (m.get("gate") or {}).get("n_rejected", 0)
    if rejected < read_ungradable:
        v.add("gate", "ungradable items read but not refused by the gate",
              f"{read_ungradable} read, the gate refused {rejected} of {m['n_images']}")
    v.assert_none()


def test_train_on_a_tree_mixing_corpus_and_real_scans(corpus: list[Spec], tmp_path: Path) -> None:
    """Training over bad files finishes (the bad ones skipped and said so) and loses no valid image."""
    items = subset(corpus, 24, must=(ODD_NAMES[6],))
    _class_tree(tmp_path / "tree", items, _real("train", 6))
    bundle = tmp_path / "bundle"
    proc = run_cli("train", tmp_path / "tree", "--out", bundle, "--head", "linear", "--epochs", 3,
                   "--cache", tmp_path / "cache", "--quiet")
    v = Violations("retinalens train MIXED-TREE (bottleneck)")
    v.check_process(proc)
    if proc.returncode != 0 or not (bundle / "manifest.json").is_file():
        v.add("process", "no bundle written", repr(proc.stderr[-300:]))
        v.assert_none()
    training = json.loads((bundle / "manifest.json").read_text())["training"]
    skipped = [ln for ln in proc.stderr.splitlines() if "skipped" in ln]
    outcomes = {}
    for s in items:  # training labels nothing itself: what it must do is skip the unreadable, saying so
        said = any(s.name in ln for ln in skipped)
        if s.expect == "valid" and _printable(s.name):
            outcomes[s.name] = (ERROR, "skipped") if said else (LABELLED, "trained on")
        elif s.expect == "error":
            outcomes[s.name] = (ERROR, "") if said else (MISSING, "not among the skipped")
    v.check_outcomes([s for s in items if s.name in outcomes], outcomes)
    if training["extract_failures"] < sum(s.expect == "error" and s.kind == "file" for s in items):
        v.add("count", "fewer extract failures than unreadable files", f"{training['extract_failures']} failures")
    v.assert_none()
