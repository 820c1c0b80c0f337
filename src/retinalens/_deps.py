"""Optional dependencies: imported on first use, and when missing, one line naming the extra that
installs them (never an ImportError traceback)."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Iterator
from importlib import import_module
from types import ModuleType

from .errors import RetinaLensError

# Top-level module -> the pyproject extra that installs it.
EXTRAS = {"onnx": "export", "onnxruntime": "export", "coremltools": "coreml", "fastapi": "serve",
          "starlette": "serve", "anyio": "serve", "uvicorn": "serve", "multipart": "serve", "sqlalchemy": "serve",
          "threadpoolctl": "serve", "psycopg": "postgres",
          "litert_torch": "tflite", "ai_edge_litert": "tflite", "ai_edge_quantizer": "tflite",
          "ray": "distributed", "pyarrow": "parquet", "pydicom": "dicom", "highdicom": "dicom"}


def install_hint(module: str, extra: str | None = None) -> str:
    """`pip install 'retinalens[EXTRA]'` for a module (`extra` when the table does not know it)."""
    top = module.split(".")[0]
    return f"pip install 'retinalens[{EXTRAS.get(top, extra or top)}]'"


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Import `module` for `purpose` ("ONNX export", "the web app", ...) or say which extra installs it."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        return loaded
    try:
        with silenced():  # coremltools prints a page of notes about its optional native parts on import
            return import_module(module)
    except ImportError:
        raise RetinaLensError(f"{purpose} needs the '{module.split('.')[0]}' package, which is not installed: "
                              f"{install_hint(module, extra)}") from None


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Silence library chatter (import notes, tracer warnings, converter logs); errors still raise."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield
