"""Start-up of the command line: `retinalens --help` wall time, fresh processes, against the interpreter's own.

Each figure is the median of `runs` fresh processes after one warm-up run (file cache warm). The
interpreter's bare start-up (`python -c pass`) and `import retinalens` are measured the same way, so that
what the CLI itself costs can be read off; `imports_torch` says whether `--help` imported torch at all.

`python benchmarks/bench_cli.py` prints the JSON; `run(shared_data)` returns it (it needs no data).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    """The installed `retinalens` script beside this interpreter, as users run it; else `python -m`."""
    script = Path(sys.executable).with_name("retinalens")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "retinalens.cli.main"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))


def _median_ms(cmd: list[str], runs: int) -> float:
    times = []
    for i in range(runs + 1):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), check=True)
        if i:  # the first run warms the file cache
            times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 1)


def _imports_torch() -> bool:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c",
                        "import sys; from retinalens.cli.main import main; sys.exit(main(['--help']))"],
                       capture_output=True, text=True, env=_env(), check=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in r.stderr.splitlines())


def run(shared_data: Path | None = None, runs: int = 7) -> dict:
    cli = _cli()
    return {"runs": runs, "command": "retinalens" if len(cli) == 1 else "python -m retinalens.cli.main",
            "python_startup_ms": _median_ms([sys.executable, "-c", "pass"], runs),
            "import_retinalens_ms": _median_ms([sys.executable, "-c", "import retinalens"], runs),
            "help_ms": _median_ms([*cli, "--help"], runs),
            "train_help_ms": _median_ms([*cli, "train", "--help"], runs),
            "imports_torch": _imports_torch(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else None), indent=2))
