"""`predict --out results.parquet` (either engine): the results as one Parquet file, written as they come.

The columns are the CSV's (predict/table.py) in plain Arrow types, so Pandas, Polars, DuckDB and
Spark read the file as it is: strings (input, label, referral, gate "ok" | "ungradable",
gate_reason, error), float64 probabilities (p_<class>, p_referral) and a bool `refer`; null where a
value does not apply (a failed input has only `input` and `error`; an ungradable one has its
probabilities but no label, referral or decision). The bundle's classes, in order, are in the
schema metadata (retinalens.classes).

The writer takes an iterable and holds at most one row group of rows (ROWS_PER_GROUP) before it
writes them: a job of millions of images (`--engine ray`) streams into the file. It writes a
temporary file in the target's folder and renames it into place at the end, so a reader never sees
half a file and an interrupted job leaves none (a killed process's temporary file is a hidden
`.rl-*.tmp`, see _io.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import IO, Any

from .._deps import require
from .._io import atomic_write_with
from .table import prediction_columns, prediction_records

CLASSES_KEY = b"retinalens.classes"
# Rows held in memory before they are written as one row group: a peak of about 70 MB of Python
# memory however many groups follow (README, Parquet predictions), and groups large enough that
# readers scan them at full speed.
ROWS_PER_GROUP = 100_000


def predictions_schema(classes: list[str]) -> Any:
    """The file's pyarrow schema (see above)."""
    pa = require("pyarrow", "Parquet output (--out)")
    names = prediction_columns(classes)
    types = {n: pa.float64() for n in names if n.startswith("p_")} | {"refer": pa.bool_()}
    return pa.schema([pa.field(n, types.get(n, pa.string())) for n in names],
                     metadata={CLASSES_KEY: json.dumps(classes).encode()})


def _table(rows: list[list[Any]], schema: Any) -> Any:
    pa = require("pyarrow", "Parquet output (--out)")
    columns = list(zip(*rows)) or [()] * len(schema)
    return pa.table([pa.array(list(col), type=f.type) for col, f in zip(columns, schema)], schema=schema)


def predictions_table(results: list[dict[str, Any]], classes: list[str]) -> Any:
    """The results as a pyarrow Table (the schema above)."""
    return _table(list(prediction_records(results, classes)), predictions_schema(classes))


def write_predictions_parquet(results: Iterable[dict[str, Any]], classes: list[str], path: str | Path, *,
                              rows_per_group: int = ROWS_PER_GROUP) -> int:
    """Write the results to `path`, in their order, `rows_per_group` at a time as they come, atomically
    (see above); the number of rows written."""
    pq = require("pyarrow.parquet", "Parquet output (--out)")
    schema = predictions_schema(classes)
    records = prediction_records(results, classes)
    written = 0

    def write(handle: IO[bytes]) -> None:
        nonlocal written
        with pq.ParquetWriter(handle, schema) as writer:
            while rows := list(islice(records, rows_per_group)):
                writer.write_table(_table(rows, schema), row_group_size=rows_per_group)
                written += len(rows)

    atomic_write_with(Path(path), write)
    return written
