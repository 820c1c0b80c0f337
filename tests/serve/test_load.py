"""A bounded load test: 500 requests from 16 concurrent clients, no errors, nothing lost.

Timings are printed (run with -s to see them), never asserted; benchmarks/bench_serve.py measures them.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from retinalens.demo import DEMO_DATA

REQUESTS, CLIENTS = 500, 16


@pytest.mark.load
@pytest.mark.timeout(300)
def test_500_requests_16_concurrent_no_errors(live_url, serve_dir, small_bundle):
    from retinalens.feedback.store import FeedbackStore

    scans = [p.read_bytes() for p in sorted((DEMO_DATA / "test").rglob("*.jpeg"))]
    classes = small_bundle.classes
    with FeedbackStore(serve_dir / "feedback.db") as store:
        before = store.counts()
    analysed: list[str] = []
    fed: list[int] = []
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []

    def one(i: int, client: httpx.Client) -> None:
        kind = i % 10
        t = time.perf_counter()
        if kind < 7 or not analysed:  # mostly analyses: the expensive path
            r = client.post("/api/predict", files=[("files", ("scan.jpeg", scans[i % len(scans)], "image/jpeg"))])
            ok = r.status_code == 200 and "id" in r.json()["results"][0]
            if ok:
                with lock:
                    analysed.append(r.json()["results"][0]["id"])
        elif kind < 9:
            with lock:
                aid = analysed[i % len(analysed)]
            r = client.post("/api/feedback", json={"analysis_id": aid, "label": classes[i % len(classes)]})
            ok = r.status_code == 200
            if ok:
                with lock:
                    fed.append(r.json()["id"])
        else:
            r = client.get("/api/model" if i % 20 == 9 else "/healthz")
            ok = r.status_code == 200
        latencies.append(time.perf_counter() - t)
        if not ok:
            failures.append(f"request {i}: {r.status_code} {r.text[:200]}")

    def worker(k: int) -> None:
        with httpx.Client(base_url=live_url, timeout=120) as client:
            for i in range(k, REQUESTS, CLIENTS):
                one(i, client)

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(worker, range(CLIENTS)))
    wall = time.perf_counter() - start
    assert failures == []
    assert len(latencies) == REQUESTS
    with FeedbackStore(serve_dir / "feedback.db") as store:
        after = store.counts()
        assert after["analyses"] - before["analyses"] == len(analysed)
        assert after["feedback"] - before["feedback"] == len(fed) > 0
        assert store.verify() == []
    ms = sorted(t * 1000 for t in latencies)
    print(f"\n{REQUESTS} requests, {CLIENTS} clients: {REQUESTS / wall:.1f} req/s, "
          f"p50 {statistics.median(ms):.0f} ms, p95 {ms[int(0.95 * len(ms))]:.0f} ms")
