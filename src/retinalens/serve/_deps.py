"""Optional dependencies of the web app: imported on first use, with one clear error when missing."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ..errors import RetinaLensError


def require(module: str) -> ModuleType:
    """Import `module` (fastapi, uvicorn, sqlalchemy, ...) or say which extra installs it."""
    try:
        return import_module(module)
    except ImportError:
        raise RetinaLensError(f"the web app needs {module.split('.')[0]}, which is not installed: "
                              "pip install 'retinalens[serve]'") from None
