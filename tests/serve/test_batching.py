"""The batcher that groups concurrent requests' images into model calls, and the server's thread plan."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from retinalens.errors import RetinaLensError
from retinalens.serve.batching import Batcher
from retinalens.models.machine import usable_cores
from retinalens.serve.service import ServeConfig


class FakeModel:
    """Stands in for Model.predict_many: records every call's batch and how many calls overlapped."""

    def __init__(self, seconds: float = 0.02, fail_on: bytes | None = None) -> None:
        self.seconds, self.fail_on = seconds, fail_on
        self.batches: list[list[bytes]] = []
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, images: list[bytes]) -> list[dict]:
        with self._lock:
            self.batches.append(list(images))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.seconds)  # the model's time: other requests queue meanwhile
            if self.fail_on in images:
                raise RuntimeError("model failure")
            return [{"label": image.decode()} for image in images]
        finally:
            with self._lock:
                self.running -= 1


def _run(batcher: Batcher, requests: list[list[bytes]]) -> list:
    async def main() -> list:
        return await asyncio.gather(*(batcher.predict(r) for r in requests), return_exceptions=True)

    return asyncio.run(main())


def test_concurrent_requests_are_batched_within_the_limits_and_answered_in_order():
    model = FakeModel()
    batcher = Batcher(model, max_batch=4, calls=2)
    requests = [[f"{k}-{j}".encode() for j in range(1 + k % 3)] for k in range(24)]  # 1-3 images each
    answers = _run(batcher, requests)
    for request, answer in zip(requests, answers):
        assert [a["label"] for a in answer] == [image.decode() for image in request]  # each its own, in order
    sizes = [len(b) for b in model.batches]
    assert sum(sizes) == sum(map(len, requests))  # every image once
    assert max(sizes) == 4  # images of many requests went together, never more than max_batch
    assert model.most_running == 2  # two model calls overlapped, never more


def test_a_lone_request_starts_at_once():
    model = FakeModel()
    assert _run(Batcher(model, max_batch=4, calls=1), [[b"only"]]) == [[{"label": "only"}]]
    assert [len(b) for b in model.batches] == [1]


def test_a_failing_model_call_fails_its_batch_only():
    model = FakeModel(fail_on=b"bad")
    batcher = Batcher(model, max_batch=2, calls=1)
    answers = _run(batcher, [[b"a"], [b"bad"], [b"c"], [b"d"], [b"e"]])
    failed = [k for k, a in enumerate(answers) if isinstance(a, RuntimeError)]
    assert 1 in failed and len(failed) <= 2  # the bad image's batch (at most 2 images), nothing else
    assert all(a == [{"label": r}] for a, r in zip(answers, "a?cde") if not isinstance(a, Exception))


def test_thread_plan_splits_the_cores_among_the_model_calls(tmp_path):
    cores = usable_cores()
    default = ServeConfig(bundle=tmp_path)
    assert (default.model_calls, default.model_threads, default.max_batch) == (cores, 1, 4)  # one call per core
    one = ServeConfig(bundle=tmp_path, threads=1)
    assert (one.model_calls, one.model_threads) == (1, cores)  # one call on every core
    many = ServeConfig(bundle=tmp_path, threads=4 * cores)
    assert many.model_threads == 1  # never fewer than one thread a call
    for bad in ({"threads": -1}, {"max_batch": 0}):
        with pytest.raises(RetinaLensError):
            ServeConfig(bundle=tmp_path, **bad)
