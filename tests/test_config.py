"""Each option default is written once, in retinalens/config.py, and the CLI, the API and the trust
code all take it from there."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest

from helpers import cli_env
from retinalens.config import EnsembleConfig, default
from retinalens.errors import RetinaLensError
from retinalens.train.pipeline import RunConfig, build_run_config, run_config_from_dict

# In a fresh interpreter, before anything reads them: three defaults changed in their one home
# (dataclass subclasses with other defaults take the classes' place in retinalens.config). Every
# place that shows or uses them must follow; one that wrote the old value again would not.
CHANGED_DEFAULTS = """
import contextlib, dataclasses, inspect, io, json
import retinalens.config as c

def changed(cls, **defaults):
    sub = dataclasses.make_dataclass(cls.__name__, [(k, type(v), v) for k, v in defaults.items()], bases=(cls,))
    setattr(c, cls.__name__, sub)

changed(c.RunConfigBase, target_sensitivity=0.876)
changed(c.EvaluateConfig, n_boot=321)
changed(c.ExtractConfig, batch_size=7)

from retinalens.cli.main import main
from retinalens.trust.calibration import DEFAULT_TARGET_SENSITIVITY, referral_threshold
from retinalens.trust.fit import fit_trust

helps = {}
for cmd in ("train", "evaluate", "report", "extract"):
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        main([cmd, "--help"])
    helps[cmd] = buf.getvalue()
from retinalens.train.pipeline import build_run_config
print(json.dumps({"helps": helps, "calibration": DEFAULT_TARGET_SENSITIVITY,
                  "referral_threshold": inspect.signature(referral_threshold).parameters["target_sensitivity"].default,
                  "fit_trust": inspect.signature(fit_trust).parameters["target_sensitivity"].default,
                  "api": build_run_config("DATA").target_sensitivity}))
"""


def test_target_sensitivity_default_is_written_once():
    r = subprocess.run([sys.executable, "-c", CHANGED_DEFAULTS], capture_output=True, text=True, env=cli_env(),
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "[default: 0.876]" in out["helps"]["train"] and "0.95" not in out["helps"]["train"]
    assert out["calibration"] == out["referral_threshold"] == out["fit_trust"] == out["api"] == 0.876
    assert "[default: 321]" in out["helps"]["evaluate"] and "[default: 321]" in out["helps"]["report"]
    assert "[default: 7]" in out["helps"]["extract"]


def test_the_cli_trains_with_the_apis_defaults(tmp_path):
    """`retinalens train DATA --out B` and `retinalens.train(DATA, B)` build the same RunConfig: every
    default the CLI shows is the one the API leaves in place."""
    from retinalens.cli.main import main

    # --resize auto (the default) goes through train_ensemble, which resolves it against the data
    with mock.patch("retinalens.train.ensemble.train_ensemble", return_value=SimpleNamespace(path=tmp_path / "b")) as tb:
        assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "b"), "-q"]) == 0
    assert tb.call_args.args[0] == build_run_config(tmp_path / "data") and tb.call_args.args[1] == EnsembleConfig()
    assert build_run_config("d") == RunConfig(data="d")  # and nothing given is the dataclasses' defaults


@pytest.mark.parametrize("given, oversample, weights", [
    ({"balance": "weights"}, False, True), ({"class_weights": True}, False, True),
    ({"class_weights": True, "balance": "none"}, False, True), ({"balance": "oversample", "mode": "frozen"}, True, False),
    ({}, False, False)])
def test_class_weights_is_one_setting_however_it_is_spelled(given, oversample, weights):
    cfg = build_run_config("d", **given)
    assert (cfg.images.oversample, cfg.train.class_weights) == (oversample, weights)


def test_class_weights_with_another_balance_is_a_clear_error():
    with pytest.raises(RetinaLensError, match="--class-weights is --balance weights"):
        build_run_config("d", mode="frozen", balance="oversample", class_weights=True)


def test_epochs_default_by_mode_and_the_config_round_trips():
    assert build_run_config("d", mode="frozen").train.epochs == 20
    assert build_run_config("d").train.epochs == default(RunConfig, "train").epochs
    cfg = build_run_config("d", mode="finetune", head="linear", hidden=32, seed=3, workers=2, cache="/c")
    assert cfg.split.seed == cfg.train.seed == 3 and cfg.extract.workers == cfg.images.workers == 2
    assert run_config_from_dict(json.loads(json.dumps(__import__("dataclasses").asdict(cfg)))) == cfg


def test_extract_config_backbone_is_the_registrys_default():
    """ExtractConfig cannot import the registry (torch) and --help must stay cheap: the two must agree."""
    from retinalens.config import ExtractConfig
    from retinalens.models.registry import DEFAULT_BACKBONE

    assert default(ExtractConfig, "backbone") == DEFAULT_BACKBONE
