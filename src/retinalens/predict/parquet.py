"""`predict --out results.parquet` (either engine): the results as one Parquet file.

The columns are the CSV's (predict/table.py) in plain Arrow types, so Pandas, Polars, DuckDB and
Spark read the file as it is: strings (input, label, referral, gate "ok" | "ungradable",
gate_reason, error), float64 probabilities (p_<class>, p_referral) and a bool `refer`; null where a
value does not apply (a failed input has only `input` and `error`; an ungradable one has its
probabilities but no label, referral or decision). The bundle's classes, in order, are in the
schema metadata (retinalens.classes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._deps import require
from .._io import atomic_write_bytes
from .table import prediction_columns, prediction_records

CLASSES_KEY = b"retinalens.classes"


def predictions_table(results: list[dict[str, Any]], classes: list[str]) -> Any:
    """The results as a pyarrow Table (the schema above)."""
    pa = require("pyarrow", "Parquet output (--out)")
    names = prediction_columns(classes)
    types = {n: pa.float64() for n in names if n.startswith("p_")} | {"refer": pa.bool_()}
    schema = pa.schema([pa.field(n, types.get(n, pa.string())) for n in names],
                       metadata={CLASSES_KEY: json.dumps(classes).encode()})
    columns = list(zip(*prediction_records(results, classes))) or [()] * len(names)
    return pa.table([pa.array(list(col), type=f.type) for col, f in zip(columns, schema)], schema=schema)


def write_predictions_parquet(results: list[dict[str, Any]], classes: list[str], path: str | Path) -> Path:
    """Write the results to `path` atomically (a reader never sees half a file)."""
    pq = require("pyarrow.parquet", "Parquet output (--out)")
    pa = require("pyarrow", "Parquet output (--out)")
    sink = pa.BufferOutputStream()
    pq.write_table(predictions_table(results, classes), sink)
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())
    return Path(path)
