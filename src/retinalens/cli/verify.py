"""`retinalens verify`: check a bundle as every command loads it, and print its digest.

The digest is the bundle's identity (the sha256 of its canonical manifest, which hashes every file):
the web app shows it at start-up, in /healthz and /api/model, so a clinic can compare what it runs
with what was released. With a key (`--key FILE` or $RETINALENS_BUNDLE_KEY) the signature is checked
too; without one, the hashes catch accidents only (bundle/signature.py: the threat model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

KeyOpt = typer.Option(None, "--key", help="Key file to check the signature with (default: the file "
                      "$RETINALENS_BUNDLE_KEY names; without either, the signature is not checked).")


def verify(bundle: Path = typer.Argument(..., help="Model bundle folder."), key: Optional[Path] = KeyOpt) -> None:
    """Check every file's hash and the signature (with a key); print the bundle digest."""
    from ..bundle.signature import configured_key
    from ..bundle.store import load_bundle

    secret = configured_key(key)
    b = load_bundle(bundle, key=key)
    if secret is not None:
        state = f"signed, signature verified (key id {b.signature['key_id']})" if b.signature else "unsigned"
    elif b.signature:
        state = f"signed (key id {b.signature['key_id']}), signature not checked: no key given"
    else:
        state = "unsigned"
    typer.echo(f"{b.digest}  {b.path}")
    typer.echo(f"{len(b.manifest.files)} files match their hashes; {state}")
