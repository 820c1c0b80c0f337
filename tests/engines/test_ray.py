"""`--engine ray` on a real local Ray cluster (2 CPUs, loopback): the feature cache it builds is the
local one byte for byte, also when a worker or the driver is killed part-way, and its Parquet
predictions are `predict`'s.

One cluster serves the module (started once: it costs seconds); the CLI tests join it with --address.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import retinalens
from retinalens.config import EngineConfig
from retinalens.data.hashing import sha256_files
from retinalens.engines import engine_config
from retinalens.engines.ray_extract import extract_features_ray
from retinalens.engines.ray_predict import iter_predictions_ray
from retinalens.errors import RetinaLensError
from retinalens.features.extract import open_cache

from helpers import SRC, assert_clean_error, cli_env, extract_into, records, run_cli

ray = pytest.importorskip("ray", reason="the Ray engine needs the 'distributed' extra")
pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow")

BATCH, CHUNK = 2, 4  # 16 images: 8 batches in 4 chunks, so that a kill lands mid-job
# Each worker runs the torch threads of this process: oneDNN's small-batch kernels depend on the
# thread count, and the local reference runs here.
THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray instance on loopback for the module; yields its address for other drivers."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20,
             _node_ip_address="127.0.0.1")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(oct_pool: list[Path]) -> list[Path]:
    return oct_pool


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, backbone, images):
    """The local path's cache of the 16 images (batches of 2, chunks of 4)."""
    cache = open_cache(tmp_path_factory.mktemp("local"), backbone, "fp32")
    extract_into(images, backbone, cache, batch_size=BATCH, chunk_size=CHUNK)
    return cache


def chunk_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("chunk-*"))}


def ray_extract(images: list[Path], backbone, cache, workers: int = 2):
    return extract_features_ray(images, sha256_files(images), backbone, cache, precision="fp32", batch_size=BATCH,
                                chunk_size=CHUNK, engine=EngineConfig(engine="ray", workers=workers, threads=THREADS),
                                progress=False)


def ray_workers() -> list[int]:
    """The pids of this cluster's Ray Data actors: processes below this one (the cluster's raylet is
    a child of it) whose title names a map worker. Other clusters on the machine are not touched."""
    parent, title = {}, {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                # the parent pid is the 2nd field after the parenthesised command name
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title[int(proc.name)] = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return sorted(p for p, t in title.items() if t.startswith(b"ray::MapWorker") and mine(p))


class KillWhen(threading.Thread):
    """kill -9 one process of `pids()` as soon as `ready()` holds; records what it found then."""

    def __init__(self, ready, pids, state) -> None:
        super().__init__(daemon=True)
        self.ready, self.pids, self.state = ready, pids, state
        self.killed: int | None = None
        self.seen: object = None

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.killed is None:
            if self.ready() and self.pids():
                self.seen = self.state()
                self.killed = self.pids()[0]
                os.kill(self.killed, signal.SIGKILL)
            time.sleep(0.02)


def test_ray_cache_is_the_local_cache_when_a_worker_is_killed(cluster, backbone, images, reference, tmp_path) -> None:
    cache = open_cache(tmp_path, backbone, "fp32")
    killer = KillWhen(lambda: any(cache.dir.glob("chunk-*.json")), ray_workers,
                      lambda: len(list(cache.dir.glob("chunk-*.json"))))
    killer.start()
    report = ray_extract(images, backbone, cache)
    killer.join(timeout=1)
    assert killer.killed is not None and 1 <= killer.seen < 4, "the worker was not killed mid-job"
    assert report.n_extracted == len(set(sha256_files(images))) and not report.failures
    # every image exactly once, and the very bytes of the local path's chunks
    keys = [k for rec in records(cache.dir) for k in rec["keys"]]
    assert sorted(keys) == sorted(set(sha256_files(images)))
    assert chunk_bytes(cache.dir) == chunk_bytes(reference.dir)


_DRIVER = """
import sys, torch
from pathlib import Path
from retinalens.config import EngineConfig
from retinalens.data.hashing import sha256_files
from retinalens.engines.ray_extract import extract_features_ray
from retinalens.features.extract import open_cache
from retinalens.models.registry import create_backbone
address, root, threads, *paths = sys.argv[1:]
paths = [Path(p) for p in paths]
bb = create_backbone()
extract_features_ray(paths, sha256_files(paths), bb, open_cache(root, bb, "fp32"), precision="fp32", batch_size=2,
                     chunk_size=4, engine=EngineConfig(engine="ray", address=address, workers=1, threads=int(threads)),
                     progress=False)
sys.exit(3)  # never reached: the test kills this driver
"""


def test_an_interrupted_ray_extraction_resumes_to_the_same_cache(cluster, backbone, images, reference,
                                                                 tmp_path) -> None:
    """A driver process joins the cluster (--address), is killed after its first chunk; the rerun ends
    with the local path's cache, every image once."""
    root = tmp_path / "cache"
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, cluster, str(root), str(THREADS), *map(str, images)],
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not list(root.glob("*/chunk-*.json")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        _, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == -signal.SIGKILL, err.decode()[-2000:]
    cache = open_cache(root, backbone, "fp32")
    assert 1 <= len(records(cache.dir)) < 4  # whole chunks only, and not all of them
    report = ray_extract(images, backbone, cache, workers=1)
    assert report.n_cached + report.n_extracted == len(set(sha256_files(images))) and report.n_cached >= CHUNK
    assert chunk_bytes(cache.dir) == chunk_bytes(reference.dir)


def test_ray_extracts_a_view_of_the_two_view_input_as_the_local_path_does(cluster, images, tmp_path) -> None:
    """The band view (the OCT default's second member): Ray's workers read the driver's input and view."""
    from retinalens.models.registry import create_backbone

    band = create_backbone("efficientnet_lite0", resize="squash+band", view="band")
    local = open_cache(tmp_path / "local", band, "fp32")
    extract_into(images[:6], band, local, batch_size=BATCH, chunk_size=CHUNK)
    remote = open_cache(tmp_path / "ray", band, "fp32")
    ray_extract(images[:6], band, remote, workers=1)
    assert remote.key.feature_shape == (1280, 7, 21) and chunk_bytes(remote.dir) == chunk_bytes(local.dir)


def test_ray_predictions_are_predicts_in_parquet(cluster, small_bundle, images, tmp_path) -> None:
    """`predict --engine ray --address ... --out x.parquet` against the local path's Parquet file."""
    folder = tmp_path / "scans"  # a folder input: every image below it
    folder.mkdir()
    for p in images[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    inputs = [str(folder), *map(str, images[-2:]), str(tmp_path / "missing.jpeg")]
    local = retinalens.predict(small_bundle.path, inputs, out=tmp_path / "local.parquet", batch_size=4)
    r = run_cli("predict", small_bundle.path, *inputs, "--engine", "ray", "--address", cluster, "--out",
                tmp_path / "ray.parquet", "--batch-size", "4", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    # Streamed: the rows are in the file; the terminal gets the failure and the count.
    assert "9 prediction(s) (1 failed)" in r.stderr and "missing.jpeg" in r.stderr, r.stderr[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    pd = pytest.importorskip("pandas")
    a, b = (pd.read_parquet(tmp_path / f"{n}.parquet") for n in ("local", "ray"))
    assert len(a) == len(local) == 9 and list(a.columns) == list(b.columns)
    assert list(b["input"]) == list(a["input"])  # one row per input, in the inputs' order
    probs = [c for c in a.columns if c.startswith("p_")]
    assert np.allclose(a[probs].to_numpy(float, na_value=np.nan), b[probs].to_numpy(float, na_value=np.nan),
                       atol=1e-5, equal_nan=True)
    for col in ("label", "referral", "refer", "gate", "gate_reason", "error"):
        assert a[col].tolist() == b[col].tolist(), col
    assert b["error"].notna().sum() == 1 and "missing.jpeg" in b["error"].dropna().iloc[0]
    schema = pq.read_schema(tmp_path / "ray.parquet")
    assert json.loads(schema.metadata[b"retinalens.classes"]) == small_bundle.classes
    assert {str(schema.field(c).type) for c in probs} == {"double"} and str(schema.field("refer").type) == "bool"
    try:  # SQL engines read the file as it is
        import duckdb
    except ImportError:
        return
    [(n,)] = duckdb.sql(f"select count(*) from '{tmp_path / 'ray.parquet'}' where label is not null").fetchall()
    assert n == a["label"].notna().sum()


def test_killed_predict_worker_loses_and_repeats_no_row(cluster, small_bundle, images) -> None:
    rows: list[int] = []
    killed = None
    for k, result in iter_predictions_ray(small_bundle.path, [str(p) for p in images], batch_size=BATCH,
                                          engine=EngineConfig(engine="ray", workers=2, threads=THREADS)):
        rows.append(k)
        assert result["input"] == str(images[k]) and "error" not in result
        if killed is None:  # the first batch is in: kill -9 a worker while the others are still to come
            killed = ray_workers()[0]
            os.kill(killed, signal.SIGKILL)
            at_kill = len(rows)
    assert killed is not None and at_kill < len(images)
    assert sorted(rows) == list(range(len(images)))


def test_missing_extra_and_bad_engine_options_are_one_clear_line(tmp_path, small_dataset) -> None:
    hidden = tmp_path / "no-ray"  # an environment without Ray: its import fails as an absent package's does
    (hidden / "ray").mkdir(parents=True)
    (hidden / "ray" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\")\n")
    r = subprocess.run([sys.executable, "-m", "retinalens.cli.main", "extract", str(small_dataset), "--engine", "ray"],
                       capture_output=True, text=True, timeout=300,
                       env=cli_env() | {"PYTHONPATH": os.pathsep.join([str(hidden), str(SRC)])})
    assert_clean_error(r, "pip install 'retinalens[distributed]'")
    assert_clean_error(run_cli("extract", small_dataset, "--engine", "spark"), "unknown engine 'spark'", "local, ray")
    for bad, needle in (({"address": "auto"}, "--engine ray"), ({"engine": "ray", "workers": -1}, ">= 0")):
        with pytest.raises(RetinaLensError, match=needle):
            engine_config(**bad)
