"""Batches of decoded images for the backbone; a bad image yields its error message instead of
stopping the batch. Decoding runs in threads (workers=0: Pillow releases the GIL; the next batches
are decoded while the backbone computes on this one) or in DataLoader processes (workers>0, which
pays off when there are cores to spare).

`measure`: a function of the full-resolution decode (the quality gate's file statistics: its size,
its 8x8 blocks), called before the resize throws that resolution away; its values come back as a
fourth element of each item (NaN for an image that could not be decoded)."""

from __future__ import annotations

from pathlib import Path
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import ImageDecodeError, RetinaLensError
from .decode import decode_image
from .transforms import Preprocessing

ImageItem = Union[Path, bytes]


class ImageFiles(Dataset):
    def __init__(self, items: Sequence[ImageItem], preprocessing: Preprocessing, names: Sequence[str] | None = None,
                 measure: Callable[[Image.Image], Sequence[float]] | None = None, n_measures: int = 0) -> None:
        self.items, self.pp = items, preprocessing
        self.names = names
        self.measure, self.n_measures = measure, n_measures

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        name = self.names[i] if self.names else None
        try:
            if self.measure is None:
                return self.pp.load(self.items[i], name=name), i, ""
            img = decode_image(self.items[i], name=name, keep_grey=True)  # Preprocessing.load, keeping the image
            return self.pp.pixels(img), i, "", torch.tensor(self.measure(img), dtype=torch.float64)
        except ImageDecodeError as exc:
            blank = torch.zeros(*self.pp.shape, 3, dtype=torch.uint8)
            if self.measure is None:
                return blank, i, str(exc)
            return blank, i, str(exc), torch.full((self.n_measures,), float("nan"), dtype=torch.float64)


def _background_priority(_: int) -> None:
    """Decoding workers (processes, or threads on Linux) yield the cores to the backbone's threads: a
    worker competing on equal terms stalls every parallel region of the backbone (measured on 2 cores)."""
    if hasattr(os, "nice"):  # not on Windows
        os.nice(10)


def check_batching(batch_size: int, workers: int) -> None:
    """The options every batched command takes, checked once for all of them."""
    if batch_size < 1 or workers < 0:
        raise RetinaLensError(f"need --batch-size >= 1 and --workers >= 0 (got {batch_size}, {workers})")


PREFETCH_BATCHES = 2  # decoded batches waiting for the backbone: enough to hide a slow file, few MB each


def image_batches(dataset: Dataset, batches: Sequence[Sequence[Any]], workers: int = 0,
                  threads: int | None = None, pin_memory: bool = False,
                  prefetch: int = PREFETCH_BATCHES) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Yield (pixels uint8 (N, S, S, 3), indices, errors) for each list of dataset keys in `batches`,
    in that order. `pin_memory`: page-locked batches, for fast copies to a GPU. `prefetch` (threads
    only): batches decoded ahead while the caller computes on the current one (0: decode each batch
    when it is asked for)."""
    if workers > 0:
        yield from DataLoader(dataset, batch_sampler=batches, num_workers=workers, prefetch_factor=4,
                              worker_init_fn=_background_priority, pin_memory=pin_memory)
        return
    # Decoding threads run at a lower priority (Linux: nice is per thread), so they fill the cores
    # the backbone leaves idle instead of stalling its parallel regions.
    with ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1),
                            initializer=_background_priority, initargs=(0,)) as pool:
        def decode(batch: Sequence[Any]) -> Any:
            if len(batch) == 1:  # one image: a pool thread would add its start and, at low priority, its wait
                return default_collate([dataset[batch[0]]])
            return default_collate(list(pool.map(dataset.__getitem__, batch)))

        if prefetch <= 0 or len(batches) == 1:  # nothing to overlap a single batch with
            for batch in batches:
                yield decode(batch)
            return
        # One loader thread runs the batches in order, at most `prefetch` ahead of the caller.
        loader = ThreadPoolExecutor(max_workers=1)
        try:
            todo = iter(batches)
            ahead = deque(loader.submit(decode, b) for b in islice(todo, prefetch))
            while ahead:
                done = ahead.popleft().result()
                following = next(todo, None)
                if following is not None:
                    ahead.append(loader.submit(decode, following))
                yield done
        finally:
            loader.shutdown(wait=True, cancel_futures=True)
