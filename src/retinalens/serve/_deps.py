"""Optional dependencies of the web app: imported on first use, with one clear error when missing."""

from __future__ import annotations

from types import ModuleType

from .. import _deps


def require(module: str) -> ModuleType:
    """Import `module` (fastapi, uvicorn, sqlalchemy, ...) or say that the `serve` extra installs it."""
    return _deps.require(module, "the web app", extra="serve")
