"""The REST API on a real server over loopback: predictions, sniffing, the upload cap, feedback, heat maps."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image


def _png_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (96, 128), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _stored_images(serve_dir: Path) -> set[str]:
    return {p.name for p in (serve_dir / "images").iterdir()}


def _store(serve_dir: Path):
    from retinalens.feedback.store import FeedbackStore

    return FeedbackStore(serve_dir / "feedback.db")


def test_health_model_card_and_pages(client, live_app, small_bundle):
    manifest_sha = hashlib.sha256((small_bundle.path / "manifest.json").read_bytes()).hexdigest()
    assert client.get("/healthz").json() == {"status": "ok", "model": manifest_sha}
    card = client.get("/api/model").json()
    assert card["classes"] == small_bundle.classes
    assert "not a medical device" in card["intended_use"]
    assert card["version"]["manifest_sha256"] == manifest_sha
    assert card["backbone"]["name"] == small_bundle.manifest.to_dict()["backbone"]["name"]
    assert card["training_data"]["splits"]["train"]["n_images"] == small_bundle.manifest.to_dict()["training"]["splits"]["train"]["n_images"]
    assert card["validation"]["accuracy"] == pytest.approx(small_bundle.manifest.to_dict()["validation"]["accuracy"])
    assert card["limits"]["max_upload_bytes"] == live_app[1].state.service.cfg.max_upload_bytes
    assert str(small_bundle.manifest.to_dict()["training"]["data"]) not in json.dumps(card)  # no local paths leak
    page = client.get("/model").text
    for needle in ("not a medical device", "efficientnet_lite0", "Training data", "Validation", "DRUSEN"):
        assert needle in page
    index = client.get("/").text
    assert 'type="file"' in index and "multiple" in index and "not a medical device" in index
    for page_text in (page, index, client.get("/docs").text):  # offline: nothing to fetch from elsewhere
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page_text) and "@import" not in page_text
    for page_text in (page, client.get("/docs").text):
        assert "<script src" not in page_text and 'rel="stylesheet"' not in page_text
    # the analysis page's script and style are the app's own files (no inline code, for a script-src 'self' policy)
    assert not re.search(r"<script>|<style>|\son[a-z]+=", index)
    for asset, kind in (("/static/page.js", "javascript"), ("/static/style.css", "text/css")):
        assert f'"{asset}"' in index
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 1000


def test_predict_many_in_order_and_stored_by_content(predict, demo_scans, serve_dir, small_bundle, pixels):
    names = ["CNV", "DME", "NORMAL"]
    parts = [(f"{n}.jpeg", demo_scans[n].read_bytes(), "image/jpeg") for n in names]
    body = predict(*parts, ("notes.jpeg", b"not an image at all", "image/jpeg"))
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["name"] for r in results] == ["CNV.jpeg", "DME.jpeg", "NORMAL.jpeg", "notes.jpeg"]
    assert "not an image" in results[3]["error"] and "id" not in results[3]
    store = _store(serve_dir)
    for part, r in zip(parts, results[:3]):
        assert "probabilities_unvalidated" not in r  # the gate passed these scans: their probabilities are results
        assert r["label"] in small_bundle.classes and sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert r["referral"] == small_bundle.referral[r["label"]]
        assert r["heatmap"] == f"/api/analyses/{r['id']}/heatmap.png"
        if "gate" in r:  # the quality gate's verdict travels with the result
            assert set(r["gate"]) >= {"ok", "reason", "scores"}
        record = store.analysis(r["id"])
        stored = (serve_dir / "images" / record["image"]).read_bytes()
        assert record["image"] == f"{hashlib.sha256(stored).hexdigest()}.jpeg" and stored.startswith(b"\xff\xd8")
        assert record["image_sha256"] == hashlib.sha256(part[1]).hexdigest()  # the upload's identity
        assert record["probabilities"] == r["probabilities"] and record["original"] is None
        assert record["model_sha256"] == body["model"] and record["predicted"] == r["label"]
        assert np.array_equal(pixels(stored), pixels(part[1]))  # the pixels, losslessly
    assert all(n.split(".")[0] not in ("CNV", "DME", "NORMAL", "notes") for n in _stored_images(serve_dir))
    store.close()


def test_content_is_sniffed_never_the_name_or_type(predict, serve_dir, pixels):
    png = _png_bytes(1)
    before = _stored_images(serve_dir)
    [r] = predict(("scan.txt", png, "text/plain"))["results"]  # a real PNG that claims to be text
    assert "id" in r
    [new] = _stored_images(serve_dir) - before
    assert np.array_equal(pixels((serve_dir / "images" / new).read_bytes()), pixels(png))
    before = _stored_images(serve_dir)
    [r] = predict(("scan.jpeg", b"%PDF-1.4 not an image", "image/jpeg"))["results"]  # a lie the other way
    assert "not an image" in r["error"]
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    [r] = predict(("scan.png", gif.getvalue(), "image/png"))["results"]  # an image, but not a format we take
    assert "error" in r
    assert _stored_images(serve_dir) == before  # refused uploads are never stored


def test_client_paths_are_never_used(predict, serve_dir):
    png = _png_bytes(2)
    [r] = predict(("../../../escaped.png", png, "image/png"))["results"]
    assert r["name"] == "escaped.png"  # shown without its path, stored under the hash
    assert not list(serve_dir.parent.rglob("escaped*"))
    assert _store(serve_dir).analysis(r["id"])["image_sha256"] == hashlib.sha256(png).hexdigest()


def test_no_files_and_too_many_files(client):
    assert client.post("/api/predict", data={"x": "1"}).status_code == 400
    r = client.post("/api/predict", files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(33)])
    assert r.status_code == 400


def _raw_request(url: str, head: str, body_chunks, *, chunked: bool) -> tuple[str, int]:
    """Send a request on a raw socket from a thread, read the answer meanwhile: (status line, bytes sent
    when the answer came). The body keeps coming until the answer arrives (or the chunks run out)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    answered = threading.Event()
    sent = [0]

    def send() -> None:
        try:
            sock.sendall(head.encode())
            for chunk in body_chunks:
                if answered.is_set():
                    return
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
                sent[0] += len(chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may close once it has answered

    sender = threading.Thread(target=send)
    sender.start()
    answer = sock.recv(4096).decode("latin-1")
    sent_when_answered = sent[0]
    answered.set()
    sender.join(60)
    sock.close()
    return answer.split("\r\n")[0], sent_when_answered


def _slow_chunks(total: int, size: int = 64 * 1024):
    """A well-formed multipart body of one endless file part (so the parser keeps reading it)."""
    import time

    yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(total // size):
        time.sleep(0.002)  # a client that keeps streaming: the answer must not wait for the end
        yield b"\0" * size


def test_upload_cap_on_declared_length(live_url, client, serve_dir):
    before = _stored_images(serve_dir)
    head = ("POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {200 * 1024 * 1024}\r\n\r\n")
    status, sent = _raw_request(live_url, head, _slow_chunks(200 * 1024 * 1024), chunked=False)
    assert status.startswith("HTTP/1.1 413"), status
    assert sent < 200 * 1024 * 1024  # answered long before the declared body could have been read
    r = client.post("/api/predict", files=[("files", ("big.png", b"\x89PNG" + b"\0" * int(1.5 * 2**20), "image/png"))])
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]
    assert _stored_images(serve_dir) == before
    assert client.get("/healthz").status_code == 200


def test_upload_cap_on_chunked_body(live_url, client, serve_dir):
    before = _stored_images(serve_dir)
    head = ("POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    total = 64 * 1024 * 1024
    status, sent = _raw_request(live_url, head, _slow_chunks(total), chunked=True)
    assert status.startswith("HTTP/1.1 413"), status
    assert sent < total  # cut off while the body was still streaming, not after it
    assert _stored_images(serve_dir) == before
    assert client.get("/healthz").status_code == 200


def test_feedback_confirm_correct_and_refuse(client, predict, demo_scans, serve_dir, small_bundle, pixels):
    [r] = predict(("a.jpeg", demo_scans["DRUSEN"].read_bytes(), "image/jpeg"))["results"]
    other = next(c for c in small_bundle.classes if c != r["label"])
    ok = client.post("/api/feedback", json={"analysis_id": r["id"], "label": r["label"]})
    assert ok.status_code == 200 and ok.json()["confirmed"] is True
    fixed = client.post("/api/feedback", json={"analysis_id": r["id"], "label": other})
    assert fixed.status_code == 200 and fixed.json()["confirmed"] is False and fixed.json()["label"] == other
    bad = client.post("/api/feedback", json={"analysis_id": r["id"], "label": "GLAUCOMA"})
    assert bad.status_code == 422 and "not one of the model's classes" in bad.json()["detail"]
    assert client.post("/api/feedback", json={"analysis_id": "0" * 32, "label": other}).status_code == 404
    assert client.post("/api/feedback", json={"label": other}).status_code == 422
    record = client.get(f"/api/analyses/{r['id']}").json()
    assert record["feedback"]["label"] == other and record["predicted"] == r["label"]
    assert client.get(f"/api/analyses/{'0' * 32}").status_code == 404
    store = _store(serve_dir)
    mine = [c for c in store.confirmed() if c.record["analysis_id"] == r["id"]]
    assert len(mine) == 1  # the latest label wins
    image, label, rec = mine[0]
    assert label == other and np.array_equal(pixels(image.read_bytes()), pixels(demo_scans["DRUSEN"].read_bytes()))
    assert rec["model_sha256"] == client.get("/healthz").json()["model"] and rec["probabilities"] == r["probabilities"]
    assert rec["analysed_at"] and rec["feedback_at"] and rec["confirmed"] is False
    store.close()


def test_ungradable_image_gets_the_gate_verdict_and_no_label(client, predict, small_bundle):
    black = io.BytesIO()
    Image.new("L", (300, 200)).save(black, format="PNG")
    [r] = predict(("black.png", black.getvalue(), "image/png"))["results"]
    assert r["gate"]["ok"] is False and r["gate"]["reason"]  # the quality gate refuses a black frame
    assert r["label"] is None and r["referral"] is None and r["refer"] is None
    # no class probabilities as if valid: the raw output only under a name that says so
    assert r["probabilities"] is None and r["p_referral"] is None
    assert set(r["probabilities_unvalidated"]) == set(small_bundle.classes)
    assert sum(r["probabilities_unvalidated"].values()) == pytest.approx(1, abs=1e-4)
    record = client.get(f"/api/analyses/{r['id']}").json()
    assert record["predicted"] is None and record["gate"] == r["gate"]
    fb = client.post("/api/feedback", json={"analysis_id": r["id"], "label": small_bundle.classes[0]})
    assert fb.status_code == 200 and fb.json()["confirmed"] is False
    assert client.get(r["heatmap"]).status_code == 200  # explained for the most likely class


def test_heatmaps_concurrent_and_deterministic(client, predict, demo_scans):
    results = predict(*[(f"{n}.jpeg", demo_scans[n].read_bytes(), "image/jpeg") for n in ("CNV", "NORMAL")])["results"]
    urls = [r["heatmap"] for r in results] * 3
    with ThreadPoolExecutor(6) as pool:  # Grad-CAM is not thread-safe: the server must serialise it
        answers = list(pool.map(client.get, urls))
    assert all(a.status_code == 200 and a.headers["content-type"] == "image/png" for a in answers)
    for k, name in enumerate(("CNV", "NORMAL")):
        pngs = {a.content for a in answers[k::2]}
        assert len(pngs) == 1  # the same map every time, whatever ran beside it
        overlay = Image.open(io.BytesIO(pngs.pop()))
        assert overlay.size == Image.open(demo_scans[name]).size and overlay.mode == "RGB"
    assert client.get(f"/api/analyses/{'0' * 32}/heatmap.png").status_code == 404


def test_concurrent_requests_share_one_model(live_app, client, demo_scans, small_bundle):
    from retinalens.predict.model import Model

    def models() -> list:
        gc.collect()  # other tests of this session may have made (and dropped) Models of the same bundle
        return [m for m in gc.get_objects() if type(m) is Model and m.bundle.path == small_bundle.path]

    before = models()
    data = demo_scans["DME"].read_bytes()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: client.post("/api/predict", files=[("files", ("x.jpeg", data, "image/jpeg"))]),
                                range(32)))
    assert all(a.status_code == 200 for a in answers)
    labels = {a.json()["results"][0]["label"] for a in answers}
    probs = np.array([list(a.json()["results"][0]["probabilities"].values()) for a in answers])
    assert len(labels) == 1 and np.allclose(probs, probs[0], atol=1e-3)  # batched or alone, the same answer
    served = models()
    # one model in the process, whatever the concurrency: the requests made no Model of their own
    assert len(served) == len(before) and live_app[1].state.service.model in served


def test_openapi_is_the_contract(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/feedback", "/api/model", "/healthz", "/api/analyses/{analysis_id}",
            "/api/analyses/{analysis_id}/heatmap.png"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert "probabilities_unvalidated" in spec["paths"]["/api/predict"]["post"]["description"]  # what ungradable means
    docs = client.get("/docs").text
    assert "/api/predict" in docs and "/openapi.json" in docs and "/api/feedback" in docs
