"""The onnxruntime path of Model and `predict --runtime`: same answers, a cache that heals, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cli_env
from retinalens.errors import RetinaLensError
from retinalens.export import export_bundle
from retinalens.export.runtime import cached_onnx, resolve_runtime
from retinalens.predict.model import Model

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RETINALENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def cli(*args: object, cache: Path, block: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a real process; `block` makes one optional package unimportable there, as if not installed."""
    env = cli_env(RETINALENS_CACHE=str(cache))
    hide = f"sys.modules[{block!r}] = None; " if block else ""
    code = f"import sys; {hide}from retinalens.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def test_model_runtimes_agree_and_expose_pooled_features(small_bundle, pixels, cache, eager_fp32):
    onnx = Model(small_bundle, runtime="onnx")
    torch_ = Model(small_bundle, runtime="torch")
    assert (onnx.runtime, torch_.runtime) == ("onnx", "torch")
    p_onnx, pooled_onnx = onnx.probabilities_and_pooled(pixels)
    p_torch, pooled_torch = torch_.probabilities_and_pooled(pixels)
    assert p_onnx.shape == p_torch.shape == (8, 4) and pooled_onnx.shape == pooled_torch.shape == (8, 1280)
    assert (p_onnx.argmax(1) == p_torch.argmax(1)).all()
    # Model calibrates the torch path; the graph calibrates itself: the same temperature once, not twice.
    assert np.abs(p_onnx - eager_fp32(small_bundle, pixels)[0]).max() < 1e-4


def test_corrupt_cached_file_is_rebuilt(small_bundle, pixels, cache):
    first = Model(small_bundle, runtime="onnx").probabilities(pixels)
    [model_file] = cache.glob("*/model.onnx")
    assert model_file.parent.name == json.loads(model_file.with_name("model.onnx.json").read_text())["bundle"]["manifest_sha256"]
    stamp = model_file.stat().st_mtime_ns
    assert cached_onnx(small_bundle) == model_file and model_file.stat().st_mtime_ns == stamp  # intact: reused

    good = model_file.read_bytes()
    model_file.write_bytes(b"this is not an onnx model" * 100)
    assert np.abs(Model(small_bundle, runtime="onnx").probabilities(pixels) - first).max() < 1e-6
    assert model_file.stat().st_size == len(good)
    model_file.write_bytes(good[: len(good) // 2])  # torn write
    assert np.abs(Model(small_bundle, runtime="onnx").probabilities(pixels) - first).max() < 1e-6
    assert model_file.read_bytes() == good


def test_an_exported_file_can_be_given(small_bundle, pixels, tmp_path, cache):
    from retinalens.bundle.store import load_bundle

    out = export_bundle(small_bundle, "onnx", tmp_path / "given.onnx")
    m = Model(small_bundle, onnx_file=out)
    assert m.runtime == "onnx" and not cache.exists()  # the given file is used, nothing is built
    assert np.abs(m.probabilities(pixels) - Model(small_bundle, runtime="onnx").probabilities(pixels)).max() < 1e-6
    other = tmp_path / "other"
    other.mkdir()
    for f in small_bundle.path.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((other / "manifest.json").read_text()) | {"created": "another day"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RetinaLensError, match="exported from another bundle"):
        Model(load_bundle(other), onnx_file=out)


def test_auto_runtime_choice(monkeypatch):
    with pytest.raises(RetinaLensError, match="unknown runtime 'tensorrt'"):
        resolve_runtime("tensorrt")
    assert resolve_runtime("torch", "fp32") == "torch" and resolve_runtime("onnx", "bf16") == "onnx"
    assert resolve_runtime("auto", "bf16") == "torch"  # keeps the numbers the head was validated on
    cpu = not torch.cuda.is_available()
    assert resolve_runtime("auto", "fp32") == ("onnx" if cpu else "torch")  # same numbers, measured faster on the CPU
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert resolve_runtime("auto", "fp32") == "torch"
    with pytest.raises(RetinaLensError, match=r"pip install 'retinalens\[export\]'"):
        resolve_runtime("onnx")


def test_cli_predict_onnx_gives_the_torch_labels(small_bundle, small_dataset, tmp_path):
    r = cli("predict", small_bundle.path, small_dataset / "test", "--runtime", "onnx", "--json", tmp_path / "p.json",
            "-q", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    by_onnx = json.loads((tmp_path / "p.json").read_text())
    by_torch = Model(small_bundle, runtime="torch").predict_many([small_dataset / "test"])
    assert len(by_onnx) == 16 and [x["input"] for x in by_onnx] == [x["input"] for x in by_torch]
    assert [x["label"] for x in by_onnx] == [x["label"] for x in by_torch]
    assert list((tmp_path / "cache" / "onnx").glob("*/model.onnx"))  # built into $RETINALENS_CACHE


def test_cli_export_and_its_errors(small_bundle, tmp_path):
    """Through the CLI: one line and exit 2 (other bad requests: test_formats, in-process)."""
    r = cli("export", small_bundle.path, "--out", tmp_path / "m.onnx", cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stderr and (tmp_path / "m.onnx.json").is_file()
    for args, block, needle in (
        (("predict", small_bundle.path, small_bundle.path, "--runtime", "onnx"), "onnxruntime", "retinalens[export]"),
        (("export", small_bundle.path, "--out", tmp_path / "x.onnx"), "onnx", "retinalens[export]"),
    ):
        r = cli(*args, cache=tmp_path / "c", block=block)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    assert not (tmp_path / "x.onnx").exists()
