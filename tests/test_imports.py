"""`import retinalens` and `retinalens --help` stay cheap; the API names survive their subpackages' imports.

Each check runs in a fresh interpreter: what one test imported must not hide what another would import.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import cli_command, cli_env

HEAVY = ("torch", "timm", "sklearn", "matplotlib")


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, env=cli_env(),
                          timeout=300, check=False)


def imported_heavy(importtime_stderr: str) -> list[str]:
    """The HEAVY top-level modules that `python -X importtime` says were imported."""
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in importtime_stderr.splitlines()
             if line.startswith("import time:")}
    return sorted(names & set(HEAVY))


def test_import_retinalens_loads_no_torch():
    r = python(f"import json, sys, retinalens; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_help_exits_0_without_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", *cli_command("--help")[1:]], capture_output=True,
                       text=True, env=cli_env(), timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train" in r.stdout and "evaluate" in r.stdout
    assert imported_heavy(r.stderr) == []


def test_every_command_help_loads_no_torch():
    code = f"""
import contextlib, io, json, sys
import typer.main
from retinalens.cli.main import app, main

group = typer.main.get_command(app)
argvs = [[name] for name in group.commands] + [["prepare", name] for name in group.commands["prepare"].commands]
codes = {{}}
for argv in argvs:
    with contextlib.redirect_stdout(io.StringIO()):
        codes[" ".join(argv)] = main([*argv, "--help"])
print(json.dumps({{"codes": codes, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    r = python(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"extract", "train", "evaluate", "predict", "demo", "prepare fundus"} <= set(out["codes"])
    assert set(out["codes"].values()) == {0}, out["codes"]
    assert out["heavy"] == []


def test_api_functions_survive_their_subpackages_imports():
    code = """
import retinalens
from unittest import mock
first = retinalens.train  # looked up before the subpackage is imported ...
import retinalens.train.pipeline, retinalens.train.trainer, retinalens.evaluate.run  # ... and after
from retinalens import api
from retinalens.train import pipeline  # the subpackage is still there for imports
assert first is retinalens.train is api.train, retinalens.train
assert retinalens.extract is api.extract and retinalens.evaluate is api.evaluate, retinalens.evaluate
assert pipeline is __import__("sys").modules["retinalens.train.pipeline"]
with mock.patch("retinalens.api.train_bundle", return_value="bundle") as tb:
    assert retinalens.train("DATA", "OUT", epochs=3, resize="squash") == "bundle"  # callable, through the real builder
assert tb.call_args.args[0].train.epochs == 3 and tb.call_args.args[0].data == "DATA"
with mock.patch("retinalens.train.pipeline.train_bundle", return_value="patched"):  # a dotted target into it
    assert pipeline.train_bundle() == "patched"
with mock.patch("retinalens.evaluate.run.evaluate_bundle", return_value={"ok": 1}) as ev, \\
        mock.patch("retinalens.api.load_bundle", return_value="B"):
    assert retinalens.evaluate("bundle", "DATA", n_boot=5) == {"ok": 1}
assert ev.call_args.kwargs["n_boot"] == 5 and ev.call_args.kwargs["split"] == "test"
with mock.patch.object(retinalens, "train", "stub"):
    assert retinalens.train == "stub"
assert retinalens.train is api.train  # restored
print("ok")
"""
    r = python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_demo_data_package_imports_nothing_of_retinalens():
    r = python("import sys, retinalens; before = set(sys.modules); import retinalens.demo; "
               "print(sorted(m for m in set(sys.modules) - before if m.startswith('retinalens')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['retinalens.demo']"


def test_importing_the_prepare_command_loads_no_fundus_code():
    r = python("import sys, retinalens.cli.prepare; "
               "print(sorted(m for m in ('retinalens.data.fundus', 'scipy') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
