"""`predict --out` Parquet writer (predict/parquet.py): a job larger than one row group is written in
several, every row once and in order, with the same rows as one group; an interrupted job leaves no
file; the command-line's streamed Ray path is compared with the local one in tests/engines/test_ray.py."""

from __future__ import annotations

import json

import pytest

import retinalens
from retinalens.predict.parquet import write_predictions_parquet

pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow")


@pytest.fixture(scope="module")
def results(small_bundle, oct_images, tmp_path_factory):
    """Real predictions of the 8 real scans and a missing file (an error row)."""
    missing = tmp_path_factory.mktemp("gone") / "missing.jpeg"
    return retinalens.predict(small_bundle.path, [*map(str, oct_images), str(missing)], batch_size=4)


def test_a_job_larger_than_a_row_group_is_written_in_several_every_row_once(results, small_bundle, tmp_path):
    assert len(results) == 9 and sum("error" in r for r in results) == 1
    one, three = tmp_path / "one.parquet", tmp_path / "three.parquet"
    assert write_predictions_parquet(iter(results), small_bundle.classes, one) == 9
    assert write_predictions_parquet(iter(results), small_bundle.classes, three, rows_per_group=4) == 9
    assert pq.ParquetFile(one).metadata.num_row_groups == 1
    meta = pq.ParquetFile(three).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 1]
    a, b = pq.read_table(one), pq.read_table(three)
    assert a.schema == b.schema and a.equals(b)  # the same rows, in the results' order, however grouped
    assert b.column("input").to_pylist() == [r["input"] for r in results]
    assert json.loads(b.schema.metadata[b"retinalens.classes"]) == small_bundle.classes
    probs = [f"p_{c}" for c in small_bundle.classes]
    for r, row in zip(results, b.to_pylist(), strict=True):
        assert [row[p] for p in probs] == [r.get("probabilities", {}).get(c) for c in small_bundle.classes]
        assert row["error"] == r.get("error")


def test_an_interrupted_job_leaves_no_file(results, small_bundle, tmp_path):
    out = tmp_path / "p.parquet"

    def dies():
        yield from results[:5]  # one row group written, then the job ends
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_predictions_parquet(dies(), small_bundle.classes, out, rows_per_group=4)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    write_predictions_parquet(iter(results), small_bundle.classes, out, rows_per_group=4)
    assert pq.read_table(out).num_rows == 9 and [p.name for p in tmp_path.iterdir()] == ["p.parquet"]
