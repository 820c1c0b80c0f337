"""Images of concurrent requests go through the model together.

On a CPU a batch of 4 costs less than 4 single calls, so when requests arrive faster than the
model answers, the images that queued while a model call ran go into the next call as one batch
(at most `max_batch` images). No timer: a lone request starts at once, so its latency is unchanged;
under load the batches grow by themselves. At most `calls` model calls run at a time, in threads
(one per core by default: while one call decodes, another runs the network), so the event loop
keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

Predict = Callable[[list[bytes]], list[dict[str, Any]]]


class Batcher:
    def __init__(self, predict: Predict, *, max_batch: int, calls: int) -> None:
        self._predict = predict
        self.max_batch = max_batch
        self.calls = calls
        self._pending: list[tuple[bytes, asyncio.Future[dict[str, Any]]]] = []
        self._running = 0
        self.batch_sizes: list[int] = []  # of the last model calls, for the benchmark (bounded below)

    async def predict(self, images: Sequence[bytes]) -> list[dict[str, Any]]:
        """One result per image, in order (the model's {label, ...} or {error}); must run in the event loop."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        self._pending += zip(images, futures)
        self._start_calls()
        return list(await asyncio.gather(*futures))

    def _start_calls(self) -> None:
        while self._pending and self._running < self.calls:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            self._running += 1
            asyncio.get_running_loop().create_task(self._call(batch))

    async def _call(self, batch: list[tuple[bytes, asyncio.Future[dict[str, Any]]]]) -> None:
        try:
            results = await asyncio.to_thread(self._predict, [image for image, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the model gave {len(results)} results for {len(batch)} images")
            for (_, future), result in zip(batch, results):
                if not future.done():  # done: its request was cancelled (client gone)
                    future.set_result(result)
        except Exception as exc:  # noqa: BLE001 - a bug in the model call: every request of the batch gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._running -= 1
            self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
            self._start_calls()
