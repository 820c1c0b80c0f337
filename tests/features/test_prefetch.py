"""Decoding ahead of the backbone (image_batches' prefetch) yields what decoding on demand yields, in
the same order. Extraction runs through it: test_cache.py's features-equal-encode and resume-after-kill
tests check that its cache holds exactly encode() of the same batches, bit for bit."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from retinalens.data.images import ImageFiles, image_batches


def _batches(n: int, size: int) -> list[list[int]]:
    order = list(range(n))[::-1]  # any order: image_batches must keep the one it is given
    return [order[i:i + size] for i in range(0, n, size)]


def test_prefetched_batches_equal_decoding_on_demand(images: list[Path], tmp_path: Path, backbone) -> None:
    bad = tmp_path / "truncated.jpeg"
    bad.write_bytes(images[0].read_bytes()[:300])
    items = [*images[:5], bad, *images[5:9]]
    dataset = ImageFiles(items, backbone.preprocessing)
    batches = _batches(len(items), 3)
    serial = list(image_batches(dataset, batches, prefetch=0))
    ahead = list(image_batches(dataset, batches, prefetch=2))
    assert len(serial) == len(ahead) == len(batches)
    for (xs, ids, errs), (xa, ida, erra), want in zip(serial, ahead, batches):
        assert ida.tolist() == ids.tolist() == want
        assert torch.equal(xa, xs) and erra == errs
    assert any("truncated.jpeg" in e for _, _, errs in ahead for e in errs)


def test_a_consumer_that_stops_early_leaves_no_decoding_thread(images: list[Path], backbone) -> None:
    before = threading.active_count()
    loader = image_batches(ImageFiles(images, backbone.preprocessing), _batches(len(images), 2), prefetch=2)
    next(loader)
    loader.close()  # what a `break` out of the loop does
    assert threading.active_count() == before


class _RecordingFiles(ImageFiles):
    """ImageFiles that notes which thread decoded each item."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads: list[int] = []

    def __getitem__(self, i: int):
        self.threads.append(threading.get_ident())
        return super().__getitem__(i)


def test_a_single_image_is_decoded_in_the_calling_thread(images: list[Path], backbone) -> None:
    """One image has nothing to overlap with: it is decoded by the caller, not a (low-priority) pool
    thread, and gives the pixels the batched path gives."""
    one = _RecordingFiles(images[:1], backbone.preprocessing)
    (x1, ids, errs), = list(image_batches(one, [[0]]))
    assert one.threads == [threading.get_ident()] and ids.tolist() == [0] and list(errs) == [""]
    many = _RecordingFiles(images[:4], backbone.preprocessing)
    xm = torch.cat([x for x, _, _ in image_batches(many, [[0, 1], [2, 3]])])
    assert threading.get_ident() not in many.threads  # several batches: decoded ahead, in threads
    assert torch.equal(x1[0], xm[0])
