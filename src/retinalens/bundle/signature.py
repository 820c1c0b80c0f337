"""Bundle signatures: an HMAC-SHA256 of the bundle's digest with a secret key, in `signature.json`.

The digest (store.py) is the sha256 of the canonical manifest, and the manifest lists the sha256 of
every other file, so the digest stands for the whole bundle and signing it signs every byte.

What this proves, and what not: a valid HMAC shows that the bundle was sealed by someone holding the
key, and that no byte changed since. Without a key, the hashes in the manifest catch accidents (a
truncated copy, a flipped bit) and edits that forget to update them; anyone who edits a file and
writes its new hash into the manifest passes them. The key is symmetric: whoever can verify can sign,
so it belongs to the people who train and deploy, never on machines of people who should not.

The key is a file (`--key FILE`, `--sign-key FILE`, or `RETINALENS_BUNDLE_KEY=FILE`): its content,
without surrounding whitespace, of at least 16 bytes (`openssl rand -hex 32 > bundle.key`). Checking
by hand: `printf %s DIGEST | openssl dgst -sha256 -hmac "$(cat bundle.key)"` prints the signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from .._io import canonical_json
from ..errors import RetinaLensError

SIGNATURE = "signature.json"
KEY_ENV = "RETINALENS_BUNDLE_KEY"
ALGORITHM = "HMAC-SHA256"
MIN_KEY_BYTES = 16
_MAX_KEY_BYTES, _MAX_SIGNATURE_BYTES = 4096, 4096


def manifest_digest(document: dict[str, Any]) -> str:
    """The bundle's digest: the sha256 of its manifest in canonical form (which lists every file's hash)."""
    return hashlib.sha256(canonical_json(document)).hexdigest()


def read_key(path: str | Path) -> bytes:
    """The key held in a key file; one RetinaLensError for a missing, empty or short one."""
    f = Path(path).expanduser()
    try:
        with f.open("rb") as handle:
            key = handle.read(_MAX_KEY_BYTES + 1).strip()
    except OSError as exc:
        raise RetinaLensError(f"cannot read the bundle key {f}: {exc.strerror or exc}") from None
    if len(key) > _MAX_KEY_BYTES:
        raise RetinaLensError(f"{f}: not a bundle key (over {_MAX_KEY_BYTES} bytes)")
    if len(key) < MIN_KEY_BYTES:
        raise RetinaLensError(f"{f}: a bundle key needs at least {MIN_KEY_BYTES} bytes (openssl rand -hex 32 > KEY)")
    return key


def configured_key(path: str | Path | None = None) -> bytes | None:
    """The key given (a key file), else the one $RETINALENS_BUNDLE_KEY names, else None."""
    chosen = path or os.environ.get(KEY_ENV)
    return read_key(chosen) if chosen else None


def key_id(key: bytes) -> str:
    """A name for the key that reveals nothing of it: which key signed, when two are in use."""
    return hmac.new(key, b"retinalens bundle key id", hashlib.sha256).hexdigest()[:16]


def sign(digest: str, key: bytes) -> dict[str, Any]:
    """signature.json's content for a bundle digest."""
    return {"format": 1, "algorithm": ALGORITHM, "digest": digest, "key_id": key_id(key),
            "signature": hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()}


def read_signature(folder: Path) -> dict[str, Any] | None:
    """A bundle's signature.json, checked for form; None when it has none."""
    f = folder / SIGNATURE
    if not f.is_file():
        return None
    try:
        with f.open("rb") as handle:
            raw = handle.read(_MAX_SIGNATURE_BYTES + 1)
        if len(raw) > _MAX_SIGNATURE_BYTES:
            raise ValueError("too large")
        sig = json.loads(raw)
    except (OSError, ValueError, RecursionError) as exc:
        raise RetinaLensError(f"{f}: unreadable bundle signature ({type(exc).__name__})") from None
    if not (isinstance(sig, dict) and sig.get("algorithm") == ALGORITHM
            and all(isinstance(sig.get(k), str) for k in ("digest", "signature", "key_id"))):
        raise RetinaLensError(f"{f}: unreadable bundle signature (not an {ALGORITHM} signature of RetinaLens)")
    return sig


def check_signature(folder: Path, digest: str, key: bytes | None) -> dict[str, Any] | None:
    """Refuse a bundle whose signature does not hold: with a key, it must be signed with that key;
    without one, a signature present must at least name this digest (an edit that forgot to re-sign).
    Returns the signature (None: unsigned)."""
    sig = read_signature(folder)
    if sig is None:
        if key is not None:
            raise RetinaLensError(f"{folder}: the bundle is not signed ({SIGNATURE} is missing), and a bundle key "
                                  f"is configured: only signed bundles are loaded")
        return None
    if not hmac.compare_digest(sig["digest"], digest):
        raise RetinaLensError(f"{folder}: the manifest changed after the bundle was signed (its digest {digest[:12]} "
                              f"is not the signed {sig['digest'][:12]})")
    if key is None:
        return sig
    if not hmac.compare_digest(sig["key_id"], key_id(key)):
        raise RetinaLensError(f"{folder}: the bundle was signed with another key (key id {sig['key_id']}, "
                              f"this key's is {key_id(key)})")
    if not hmac.compare_digest(sig["signature"], sign(digest, key)["signature"]):
        raise RetinaLensError(f"{folder}: the bundle's signature does not verify with this key")
    return sig
