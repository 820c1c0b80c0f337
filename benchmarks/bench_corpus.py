"""Peak memory of `retinalens predict` over the decompression bombs of the robustness corpus.

Each bomb (a small file that claims a huge image: tests/robustness/corpus.py) is predicted on by a fresh
process, beside a baseline process that predicts on one real scan; the figure is that process's own peak
resident memory (VmHWM), so that what a bomb costs is its excess over the baseline. The bundle is the
tests' small one (default backbone, a few real demo scans), trained here once.

`python benchmarks/bench_corpus.py` prints the JSON; `run(shared_data)` returns it (the demo data suffice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # the corpus generator and the tests' small bundle

# Run in the child: the CLI's own entry point, then the process's peak resident memory in kB. (VmHWM, not
# ru_maxrss, which would carry the parent's resident size over fork+exec.)
_CHILD = ("import sys; from retinalens.cli.main import main; rc = main(sys.argv[1:]); "
          "print('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], rc)")


def peak_rss_of_predict(bundle: Path, image: Path, work: Path) -> dict:
    """Peak RSS (MB) and exit code of `retinalens predict BUNDLE IMAGE --json` in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, "predict", str(bundle), str(image), "--json",
                           str(work / "out.json"), "--quiet"], capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VmHWM")), None)
    if line is None:  # the process died before it could say (killed for memory, say): report how
        return {"peak_rss_mb": None, "exit_code": proc.returncode, "stderr_tail": proc.stderr[-200:]}
    _, kb, rc = line.split()
    return {"peak_rss_mb": round(int(kb) / 1024, 1), "exit_code": int(rc)}


def run(shared_data: Path | None = None) -> dict:
    from retinalens.demo import DEMO_DATA

    from helpers import small_oct_dataset, train_small_bundle
    from robustness.corpus import build, corpus_specs, source_scans

    sources = source_scans(DEMO_DATA, None)
    bombs = [s for s in corpus_specs(sources[:1]) if s.cls == "bomb"]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        bundle = train_small_bundle(small_oct_dataset(work / "data"), work / "bundle", work / "cache").path
        folder = build(bombs, work / "bombs")
        baseline = peak_rss_of_predict(bundle, sources[0], work)
        per_bomb = {}
        for s in bombs:
            r = peak_rss_of_predict(bundle, folder / s.name, work)
            extra = None if r["peak_rss_mb"] is None else round(r["peak_rss_mb"] - baseline["peak_rss_mb"], 1)
            per_bomb[s.name] = r | {"file_kb": round(len(s.data) / 1024, 1), "over_baseline_mb": extra}
    worst = max((b["over_baseline_mb"] or 0.0) for b in per_bomb.values())
    return {"command": "retinalens predict BUNDLE BOMB --json out.json --quiet (one fresh process per file)",
            "bundle": "the tests' small bundle: efficientnet_lite0, 12 demo scans per class",
            "baseline_one_real_scan": baseline, "bombs": per_bomb, "worst_over_baseline_mb": worst,
            "load_average_1min": round(os.getloadavg()[0], 2)}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
