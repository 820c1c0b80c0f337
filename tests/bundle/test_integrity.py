"""Bundle integrity: every file hashed, nothing unlisted, hostile manifests refused in one clear error,
the digest as the bundle's identity, and HMAC signatures checked whenever a key is configured."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from retinalens._io import canonical_json
from retinalens.bundle.card import CARD_FILE, model_card
from retinalens.bundle.signature import KEY_ENV, SIGNATURE, key_id, sign
from retinalens.bundle.store import MANIFEST, load_bundle
from retinalens.errors import RetinaLensError

SIDE_FILES = ("config.json", "splits.json", "gate.safetensors", "curves.csv", "curves.png")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bundle_dir(small_bundle, tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(small_bundle.path, out)
    return out


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    f = tmp_path / "bundle.key"
    f.write_text("7d1f0c2b9a8e4f6d5c3b2a1908f7e6d5\n")
    return f


def _document(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit manifest.json as a careful hand would: the same canonical form, nothing else touched."""
    d = _document(folder)
    change(d)
    (folder / MANIFEST).write_bytes(canonical_json(d))


def _rehash(folder: Path, name: str) -> None:
    """What an editor who knows the format does after changing a file: write its new hash in the manifest."""
    _edit(folder, lambda d: d["files"].__setitem__(name, _sha(folder / name)))


def _sign(folder: Path, key: Path) -> None:
    digest = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    (folder / SIGNATURE).write_bytes(canonical_json(sign(digest, key.read_bytes().strip())))


def test_a_trained_bundle_hashes_every_file_and_its_digest_is_the_manifests(small_bundle) -> None:
    files = small_bundle.manifest.files
    # MODEL_CARD.md is the one file outside the seal: text for people, derived from the (hashed) manifest and
    # rewritten by every `evaluate`, never read as input (the web app shows it only when it names this digest).
    on_disk = {p.name for p in small_bundle.path.iterdir()} - {MANIFEST, CARD_FILE}
    assert set(SIDE_FILES) <= on_disk and on_disk == set(files)  # side files included, curves written before the seal
    for name, digest in files.items():
        assert _sha(small_bundle.path / name) == digest, name
    assert small_bundle.digest == _sha(small_bundle.path / MANIFEST)  # what `sha256sum manifest.json` prints
    assert small_bundle.manifest_sha256 == small_bundle.digest
    assert model_card(small_bundle.manifest.to_dict())["version"]["digest"] == small_bundle.digest
    assert small_bundle.signature is None and not (small_bundle.path / SIGNATURE).exists()


@pytest.mark.parametrize("name", SIDE_FILES)
def test_an_edited_side_file_is_refused(bundle_dir: Path, name: str) -> None:
    f = bundle_dir / name
    f.write_bytes(f.read_bytes() + b"\n")
    with pytest.raises(RetinaLensError, match=f"{name} is missing or does not match its hash"):
        load_bundle(bundle_dir)


def test_retrain_reads_no_config_swapped_after_load(bundle_dir: Path, tmp_path: Path) -> None:
    """config.json is checked against its hash as it is read, not only at load: its cache path is followed."""
    b = load_bundle(bundle_dir)
    config = json.loads((bundle_dir / "config.json").read_text())
    config["extract"]["cache"] = str(tmp_path / "elsewhere")
    (bundle_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RetinaLensError, match="config.json does not match its hash"):
        b.run_config()


@pytest.mark.parametrize("name", SIDE_FILES)
def test_a_deleted_files_entry_is_refused(bundle_dir: Path, name: str) -> None:
    _edit(bundle_dir, lambda d: d["files"].pop(name))
    with pytest.raises(RetinaLensError, match=name) as err:
        load_bundle(bundle_dir)
    assert "not hashed in its manifest" in str(err.value) or "not among its hashed files" in str(err.value)


@pytest.mark.parametrize("change", [lambda d: d.pop("files"), lambda d: d["files"].pop("head.safetensors"),
                                    lambda d: d["files"].__setitem__("config.json", "0" * 63)])
def test_files_cannot_be_switched_off(bundle_dir: Path, change) -> None:
    _edit(bundle_dir, change)
    with pytest.raises(RetinaLensError, match="unreadable bundle manifest"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", ["extra.safetensors", "model.onnx", "curves.png"])
def test_an_unlisted_file_that_a_command_reads_is_refused(bundle_dir: Path, name: str) -> None:
    (bundle_dir / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # read by nothing: allowed
    (bundle_dir / "notes.txt").write_text("trained on the March export")
    load_bundle(bundle_dir)
    if name in _document(bundle_dir)["files"]:
        _edit(bundle_dir, lambda d: d["files"].pop(name))
    (bundle_dir / name).write_bytes(b"x")
    with pytest.raises(RetinaLensError, match=f"{name} is in the bundle but not hashed"):
        load_bundle(bundle_dir)


def test_reversed_classes_are_refused(bundle_dir: Path) -> None:
    """The head file (hashed) names its outputs: a manifest listing them in another order is refused."""
    _edit(bundle_dir, lambda d: d.__setitem__("classes", d["classes"][::-1]))
    with pytest.raises(RetinaLensError, match="not the head's outputs"):
        load_bundle(bundle_dir)


def test_an_edited_referral_changes_the_digest_and_fails_a_signed_bundle(bundle_dir: Path, key_file: Path,
                                                                          monkeypatch) -> None:
    _sign(bundle_dir, key_file)
    before = load_bundle(bundle_dir, key=key_file)
    assert before.signature and before.signature["key_id"] == key_id(key_file.read_bytes().strip())
    _edit(bundle_dir, lambda d: d["referral"].__setitem__("CNV", "observation"))
    # without a key, a signature present still names the digest: an edit that did not re-sign is caught
    with pytest.raises(RetinaLensError, match="manifest changed after the bundle was signed"):
        load_bundle(bundle_dir)
    (bundle_dir / SIGNATURE).unlink()
    unsigned = load_bundle(bundle_dir)  # no key, no signature: hashes alone cannot see a manifest edit ...
    assert unsigned.referral["CNV"] == "observation" and unsigned.digest != before.digest  # ... its identity can
    monkeypatch.setenv(KEY_ENV, str(key_file))
    with pytest.raises(RetinaLensError, match="not signed"):
        load_bundle(bundle_dir)


def test_an_edited_file_with_its_new_hash_fails_the_signature(bundle_dir: Path, key_file: Path) -> None:
    _sign(bundle_dir, key_file)
    (bundle_dir / "config.json").write_text('{"extract": {"cache": "/somewhere/else"}}')
    _rehash(bundle_dir, "config.json")  # the hashes now agree: only the key can tell
    with pytest.raises(RetinaLensError, match="changed after the bundle was signed"):
        load_bundle(bundle_dir, key=key_file)
    sig = json.loads((bundle_dir / SIGNATURE).read_text())
    sig["digest"] = _sha(bundle_dir / MANIFEST)  # and the signature file's digest too
    (bundle_dir / SIGNATURE).write_bytes(canonical_json(sig))
    with pytest.raises(RetinaLensError, match="does not verify with this key"):
        load_bundle(bundle_dir, key=key_file)


def test_a_wrong_key_or_a_forged_signature_is_refused(bundle_dir: Path, key_file: Path, tmp_path: Path) -> None:
    _sign(bundle_dir, key_file)
    other = tmp_path / "other.key"
    other.write_text("another key of thirty-two bytes!")
    with pytest.raises(RetinaLensError, match="signed with another key"):
        load_bundle(bundle_dir, key=other)
    sig = json.loads((bundle_dir / SIGNATURE).read_text())
    forged = sig | {"signature": sign(sig["digest"], other.read_bytes())["signature"]}
    (bundle_dir / SIGNATURE).write_bytes(canonical_json(forged))
    with pytest.raises(RetinaLensError, match="does not verify with this key"):
        load_bundle(bundle_dir, key=key_file)
    (bundle_dir / SIGNATURE).write_text("[" * 100_000)
    with pytest.raises(RetinaLensError, match="unreadable bundle signature"):
        load_bundle(bundle_dir, key=key_file)


@pytest.mark.parametrize("content", ["", "short\n"])
def test_a_bad_key_file_is_one_clear_error(bundle_dir: Path, tmp_path: Path, content: str) -> None:
    f = tmp_path / "k"
    f.write_text(content)
    with pytest.raises(RetinaLensError, match="at least 16 bytes"):
        load_bundle(bundle_dir, key=f)
    with pytest.raises(RetinaLensError, match="cannot read the bundle key"):
        load_bundle(bundle_dir, key=tmp_path / "absent.key")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for p in parents:
            d = d[p]
        d[last] = value
    return change


HOSTILE = {
    "huge size": (_set("backbone/preprocessing/size", 1_000_000), "size"),
    "temperature 0": (_set("calibration/temperature", 0), "temperature"),
    "negative temperature": (_set("calibration/temperature", -1.0), "temperature"),
    "huge feature maps": (_set("features/feature_shape", [100000, 100000, 100000]), "do not fit"),
    "a huge head": (_set("head/channels", 100000), "do not fit"),
    "threshold over 1": (_set("thresholds/referral/threshold", 1.5), "threshold"),
    "unknown positive class": (_set("thresholds/referral/positive_classes", ["GLAUCOMA"]), "do not agree"),
    "referral of a class missing": (lambda d: d["referral"].pop("NORMAL"), "do not agree"),
    "a long class name": (_set("classes", ["C" * 5000, "DME", "DRUSEN", "NORMAL"]), "classes"),
    "a long created": (_set("created", "x" * 10_000), "created"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_manifest_values_are_refused(bundle_dir: Path, name: str) -> None:
    change, where = HOSTILE[name]
    _edit(bundle_dir, change)
    with pytest.raises(RetinaLensError, match=where):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(bundle_dir: Path, token: str) -> None:
    text = (bundle_dir / MANIFEST).read_text()
    t = _document(bundle_dir)["calibration"]["temperature"]
    assert f'"temperature": {t}' in text
    (bundle_dir / MANIFEST).write_text(text.replace(f'"temperature": {t}', f'"temperature": {token}'))
    with pytest.raises(RetinaLensError, match="not a JSON number|out of range"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("depth", [40, 200_000])
def test_deep_json_is_refused(bundle_dir: Path, depth: int) -> None:
    text = (bundle_dir / MANIFEST).read_text()
    (bundle_dir / MANIFEST).write_text(text.replace('"metrics": {}', '"metrics": ' + "[" * depth + "]" * depth))
    with pytest.raises(RetinaLensError, match="nested"):
        load_bundle(bundle_dir)
