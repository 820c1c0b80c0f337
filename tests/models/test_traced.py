"""The frozen backbone graph kept on disk: a new process (a new Backbone) loads it instead of tracing,
with the same features; a damaged or foreign file is rebuilt, never an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retinalens.models.registry import create_backbone


def _pixels(oct_images: list[Path], size: int) -> torch.Tensor:
    bb = create_backbone("eyenet", pretrained=False)
    assert bb.preprocessing.size == size
    return torch.stack([bb.preprocessing.load(p) for p in oct_images[:3]])


def _graphs(root: Path) -> list[Path]:
    return sorted((root / "traced").glob("*/graph.pt"))


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RETINALENS_CACHE", str(tmp_path))
    return tmp_path


def test_the_saved_graph_is_loaded_and_computes_the_same_features(cache_root: Path, oct_images: list[Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = create_backbone("eyenet", pretrained=False)  # seeded random weights: the same in both
    x = _pixels(oct_images, first.preprocessing.size)
    spatial, pooled = first.encode(x, "fp32")
    [graph] = _graphs(cache_root)
    assert json.loads(graph.with_suffix(".json").read_text())["identity"]["weights_sha256"] == first.weights_sha256

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced again although the graph is on disk")

    monkeypatch.setattr(torch.jit, "trace", no_tracing)
    second = create_backbone("eyenet", pretrained=False)
    s2, p2 = second.encode(x, "fp32")
    assert torch.equal(s2, spatial) and torch.equal(p2, pooled)
    # Another precision is another graph (bf16 casts are baked in): traced, not the fp32 one reused.
    with pytest.raises(AssertionError, match="traced again"):
        second.encode(x, "bf16")


@pytest.mark.parametrize("damage", ["garbage", "torn", "sidecar"])
def test_a_damaged_graph_is_rebuilt(cache_root: Path, oct_images: list[Path], damage: str) -> None:
    bb = create_backbone("eyenet", pretrained=False)
    x = _pixels(oct_images, bb.preprocessing.size)
    reference = bb.encode(x, "fp32")
    [graph] = _graphs(cache_root)
    sidecar = graph.with_suffix(".json")
    if damage == "garbage":
        graph.write_bytes(b"not a torchscript archive" * 100)
    elif damage == "torn":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    else:
        sidecar.write_text('{"format": 1, "sha2')
    again = create_backbone("eyenet", pretrained=False).encode(x, "fp32")
    assert torch.equal(again[0], reference[0]) and torch.equal(again[1], reference[1])
    import hashlib

    assert json.loads(sidecar.read_text())["sha256"] == hashlib.sha256(graph.read_bytes()).hexdigest()  # rebuilt


def test_a_graph_of_other_weights_in_the_entry_is_not_used(cache_root: Path, oct_images: list[Path]) -> None:
    """A sound file whose network differs (copied over by hand, or weights changed in place) fails the
    probe against the eager network and is rebuilt."""
    a = create_backbone("eyenet", pretrained=False, seed=0)
    b = create_backbone("eyenet", pretrained=False, seed=1)
    x = _pixels(oct_images, a.preprocessing.size)
    a.encode(x, "fp32")
    b_features = b.encode(x, "fp32")
    by_weights = {json.loads(g.with_suffix(".json").read_text())["identity"]["weights_sha256"]: g
                  for g in _graphs(cache_root)}
    graph_a, graph_b = by_weights[a.weights_sha256], by_weights[b.weights_sha256]
    graph_a.write_bytes(graph_b.read_bytes())  # a's entry now holds b's network, with a matching sidecar
    graph_a.with_suffix(".json").write_text(graph_b.with_suffix(".json").read_text())
    fresh = create_backbone("eyenet", pretrained=False, seed=0).encode(x, "fp32")
    assert not torch.allclose(fresh[1], b_features[1])
    assert torch.equal(fresh[1], a.encode(x, "fp32")[1])


def test_onednn_fusion_leaves_every_bf16_feature_unchanged(backbone, oct_images: list[Path]) -> None:
    """encode runs bf16 graphs with oneDNN Graph fusion (models/machine.onednn_fusion): the fused
    convolutions give exactly the unfused graph's features, for one image and for a batch."""
    import io

    from retinalens.models.machine import onednn_fusion

    precision = "bf16"
    x = torch.stack([backbone.preprocessing.load(p) for p in oct_images[:4]])
    buf = io.BytesIO()
    torch.jit.save(backbone._frozen(precision, x), buf)
    fused, plain = (torch.jit.load(io.BytesIO(buf.getvalue())) for _ in range(2))  # two executors
    with torch.inference_mode():
        for batch in (x[:1], x):
            for _ in range(3):  # a new shape is profiled, then optimised (fused) on its second call
                with onednn_fusion():
                    got = fused(batch)
                want = plain(batch)
            assert torch.equal(got, want)
            assert torch.equal(backbone.encode(batch, precision)[0], want.float().permute(0, 2, 3, 1).half())
    assert not torch.jit.onednn_fusion_enabled()  # restored after each call


def test_side_by_side_calls_on_new_shapes_give_the_features_of_calls_in_turn(oct_images: list[Path]) -> None:
    """A server's two model calls on one bf16 graph, each batch size new to it: a shape's first runs take
    turns (torch's oneDNN Graph kernels fail to compile from two threads at once, "partition compile
    failed", on about half such calls when measured), later ones run side by side; every call gets
    the features of the same calls made in turn, by another backbone."""
    import threading

    from retinalens.models.machine import runtime_settings

    shared, alone = create_backbone("efficientnet_lite0"), create_backbone("efficientnet_lite0")
    pixels = torch.stack([shared.preprocessing.load(p) for p in (oct_images * 4)[:12]])
    # Batch sizes 7-12, each thread its own order: shapes no other test compiles (oneDNN keeps compiled
    # kernels for the process, and a shape compiled before would not race).
    sizes = [[7 + (7 * i + 3 * k) % 6 for i in range(24)] for k in range(2)]
    got: list[list[torch.Tensor]] = [[], []]
    errors: list[str] = []

    def calls(k: int) -> None:
        with runtime_settings(threads=1):
            for n in sizes[k]:
                try:
                    got[k].append(shared.encode(pixels[:n], "bf16")[1])
                except RuntimeError as exc:
                    errors.append(str(exc).splitlines()[-1])

    with runtime_settings(threads=1):
        shared.encode(pixels[:1], "bf16")  # traced (or read from the disk cache) before the threads start
    threads = [threading.Thread(target=calls, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with runtime_settings(threads=1):  # after the threads: oneDNN keeps compiled kernels for the process
        want = {n: alone.encode(pixels[:n], "bf16")[1] for n in range(7, 13)}
    assert [len(g) for g in got] == [len(n) for n in sizes]
    assert all(torch.equal(a, want[n]) for g, ns in zip(got, sizes) for a, n in zip(g, ns))
