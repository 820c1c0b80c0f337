"""`retinalens verify` and `train --sign-key` as users run them: the digest, signatures, and every
refusal as one line with exit code 2, never an internal error."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from helpers import assert_clean_error, run_cli
from retinalens.bundle.signature import KEY_ENV, SIGNATURE


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    good, other = folder / "team.key", folder / "other.key"
    good.write_text("3f9a0c6e1b2d4f8a7c5e9b1d3f6a8c0e\n")
    other.write_text("an entirely different key, 40 bytes long\n")
    return good, other


@pytest.fixture(scope="module")
def signed_bundle(small_dataset, feature_cache, keys, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signed") / "model"
    r = run_cli("train", small_dataset, "--out", out, "--head", "logreg", "--sign-key", keys[0], "-q",
                RETINALENS_CACHE=str(feature_cache))
    assert r.returncode == 0, r.stderr
    assert (out / SIGNATURE).is_file()
    return out


def test_train_signs_and_verify_checks_it(signed_bundle: Path, keys) -> None:
    digest = hashlib.sha256((signed_bundle / "manifest.json").read_bytes()).hexdigest()
    r = run_cli("verify", signed_bundle, "--key", keys[0])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{digest}  {signed_bundle}"
    assert "signature verified" in r.stdout
    assert "config.json" in json.loads((signed_bundle / "manifest.json").read_text())["files"]
    r = run_cli("verify", signed_bundle)  # no key: the digest, and a word that nothing proved who signed
    assert r.returncode == 0 and digest in r.stdout and "signature not checked" in r.stdout
    r = run_cli("verify", signed_bundle, **{KEY_ENV: str(keys[0])})
    assert r.returncode == 0 and "signature verified" in r.stdout


def test_a_wrong_key_is_exit_2(signed_bundle: Path, keys) -> None:
    assert_clean_error(run_cli("verify", signed_bundle, "--key", keys[1]), "signed with another key")
    assert_clean_error(run_cli("predict", signed_bundle, signed_bundle / "curves.png", **{KEY_ENV: str(keys[1])}),
                       "signed with another key")


def test_an_unsigned_bundle_is_refused_when_a_key_is_configured(small_bundle, keys) -> None:
    r = run_cli("verify", small_bundle.path)
    assert r.returncode == 0 and "unsigned" in r.stdout
    assert_clean_error(run_cli("verify", small_bundle.path, **{KEY_ENV: str(keys[0])}), "not signed")
    assert_clean_error(run_cli("verify", small_bundle.path, "--key", keys[0].with_name("absent.key")),
                       "cannot read the bundle key")


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace('"temperature": ', '"temperature": NaN, "x": '), "not a JSON number"),
    (lambda t: t.replace('"metrics": {}', '"metrics": ' + "[" * 200_000 + "]" * 200_000), "nested too deep"),
    (lambda t: t.replace('"size": 224', '"size": 1000000'), "size"),
    (lambda t: t.replace('"temperature": ', '"temperature": 0, "x": '), "temperature"),
])
def test_a_hostile_manifest_is_exit_2(small_bundle, tmp_path: Path, edit, needle: str) -> None:
    b = tmp_path / "b"
    shutil.copytree(small_bundle.path, b)
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(edited := edit(text))
    assert edited != text
    assert_clean_error(run_cli("verify", b), needle)


def test_a_train_key_that_is_too_short_fails_before_any_work(small_dataset, tmp_path: Path) -> None:
    short = tmp_path / "k"
    short.write_text("abc")
    r = run_cli("train", small_dataset, "--out", tmp_path / "m", "--sign-key", short, "-q")
    assert_clean_error(r, "at least 16 bytes")
    assert "extracted" not in r.stderr and not (tmp_path / "m").exists()
