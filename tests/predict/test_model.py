import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

import retinalens
from retinalens.predict import inputs
from retinalens.predict.model import Model


@pytest.fixture(scope="module")
def model(small_bundle):
    return Model(small_bundle)


@pytest.fixture(scope="module")
def server(small_dataset):
    """A real HTTP server on loopback serving the dataset folder."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(small_dataset), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def a_scan(small_dataset: Path, cls: str = "DME") -> Path:
    return sorted((small_dataset / "test" / cls).glob("*.jpeg"))[0]


def test_predict_one_image(model, small_dataset):
    r = retinalens.load(model.bundle.path).predict(str(a_scan(small_dataset)))
    assert set(r) == {"input", "label", "probabilities", "referral", "p_referral", "refer", "gate"}
    assert r["label"] in model.classes and r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert r["referral"] == model.bundle.referral[r["label"]]


def test_bytes_path_and_url_agree(model, small_dataset, server):
    f = a_scan(small_dataset)
    by_path = model.predict(f)
    by_bytes = model.predict(f.read_bytes())
    by_url = model.predict(f"{server}/test/DME/{f.name}")
    for other in (by_bytes, by_url):
        assert other["label"] == by_path["label"]
        assert np.allclose(list(other["probabilities"].values()), list(by_path["probabilities"].values()), atol=1e-6)


def test_batch_keeps_going_past_bad_inputs(model, small_dataset, server, tmp_path):
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(a_scan(small_dataset).read_bytes()[:500])  # truncated JPEG
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    results = model.predict_many([small_dataset / "test", bad, empty, tmp_path / "missing.jpeg",
                                  f"{server}/nothing-here.jpeg"])
    good = [r for r in results if "error" not in r]
    errors = {r["input"]: r["error"] for r in results if "error" in r}
    assert len(good) == 16
    assert set(errors) == {str(bad), str(empty), str(tmp_path / "missing.jpeg"), f"{server}/nothing-here.jpeg"}
    assert "404" in errors[f"{server}/nothing-here.jpeg"] and "empty" in errors[str(empty)]


def test_url_size_cap(model, small_dataset, server, monkeypatch):
    monkeypatch.setattr(inputs, "URL_MAX_BYTES", 1000)
    monkeypatch.setattr(inputs.fetch_url, "__kwdefaults__", {"timeout": 10.0, "max_bytes": 1000})
    [r] = model.predict_many([f"{server}/test/DME/{a_scan(small_dataset).name}"])
    assert "limit" in r["error"]


def test_url_timeout_is_an_error_not_a_hang():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)  # accepts the connection, never answers
    try:
        with pytest.raises(retinalens.RetinaLensError, match="download failed"):
            inputs.fetch_url(f"http://127.0.0.1:{s.getsockname()[1]}/x.jpeg", timeout=0.5)
    finally:
        s.close()


def test_a_trickling_server_cannot_hold_a_download_past_its_deadline():
    """10 bytes a second with a large Content-Length: the deadline is for the whole download."""
    import socket
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b"x" * 10)
            except OSError:
                break
            time.sleep(0.1)
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(retinalens.RetinaLensError, match="longer than"):
            inputs.fetch_url(f"http://127.0.0.1:{srv.getsockname()[1]}/x.jpeg", timeout=1.0)
        assert time.monotonic() - start < 5  # bounded by the deadline, not by the per-read timeout
    finally:
        stop.set()
        srv.close()


def test_other_url_schemes_are_refused(model):
    [r] = model.predict_many(["ftp://127.0.0.1/x.jpeg"])
    assert r["input"] == "ftp://127.0.0.1/x.jpeg" and "http" in r["error"]


def test_one_image_runs_on_one_thread_and_batches_on_all(small_bundle, small_dataset, monkeypatch):
    """Model.predict computes its single image on one intra-op thread, predict_many on torch's own
    count (or the Model's `threads`), and the caller's thread count is back afterwards."""
    import torch

    from retinalens.errors import RetinaLensError

    before = torch.get_num_threads()
    for threads, want_one, want_many in ((None, 1, before), (2, 2, 2)):
        m = Model(small_bundle, runtime="torch", threads=threads)
        seen, real = [], m.probabilities_and_pooled

        def counted(x, *beside, real=real, seen=seen):
            seen.append(torch.get_num_threads())
            return real(x, *beside)

        monkeypatch.setattr(m, "probabilities_and_pooled", counted)
        assert "probabilities" in m.predict(a_scan(small_dataset))
        m.predict_many([a_scan(small_dataset), a_scan(small_dataset, "CNV")])
        assert seen == [want_one, want_many]
        assert torch.get_num_threads() == before
    with pytest.raises(RetinaLensError, match="threads"):
        Model(small_bundle, runtime="torch", threads=0)
