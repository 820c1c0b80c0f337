"""Hostile input on a real server over loopback: bombs, unencodable JSON, DNS rebinding, cross-site
posts. Every refusal is a 4xx with a JSON message, with the security headers, and the keep-alive
connection it came on keeps working."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image


def _png(width: int, height: int, idat: bytes) -> bytes:
    """A greyscale PNG with the given header size and compressed pixel stream (written by hand: a
    bomb's header says more than any encoder should be made to produce)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _connections(client: httpx.Client) -> int:
    return len(client._transport._pool.connections)  # type: ignore[attr-defined]


def _scan(demo_scans) -> bytes:
    return demo_scans["CNV"].read_bytes()


def test_decompression_bombs_are_413_and_the_connection_lives_on(client, demo_scans, serve_dir):
    side = 8000  # 64 Mpixel: over the decoder's limit, under Pillow's own; a real zlib stream of 64 MB of zeros
    bomb = _png(side, side, zlib.compress(b"\0" * ((side + 1) * side), 9))
    huge = _png(40000, 40000, zlib.compress(b"\0" * 1024))  # 1.6 Gpixel: Pillow's DecompressionBombError
    assert len(bomb) < 200_000 and len(huge) < 2000
    before = {p.name for p in (serve_dir / "images").iterdir()}
    assert client.get("/healthz").status_code == 200
    for data in (bomb, huge):
        r = client.post("/api/predict", files=[("files", ("scan.jpeg", _scan(demo_scans), "image/jpeg")),
                                               ("files", ("bomb.png", data, "image/png"))])
        assert r.status_code == 413, r.text
        assert r.json()["detail"].startswith("bomb.png: refused") and "pixels" in r.json()["detail"]
        assert r.headers["x-content-type-options"] == "nosniff"
        ok = client.post("/api/predict", files=[("files", ("scan.jpeg", _scan(demo_scans), "image/jpeg"))])
        assert ok.status_code == 200 and "id" in ok.json()["results"][0]
        assert _connections(client) == 1  # the same keep-alive connection answered both
        before.add(client.get(f"/api/analyses/{ok.json()['results'][0]['id']}").json()["image"])
    assert {p.name for p in (serve_dir / "images").iterdir()} == before  # nothing of a refused request


@pytest.mark.parametrize("body", [b'{"analysis_id": "\\ud800"}', b'{"analysis_id": "\\ud800", "label": "CNV"}',
                                  b'{"analysis_id": NaN, "label": "CNV"}', b'{"analysis_id": "ab", "label": NaN}',
                                  b'{"analysis_id": Infinity}', b'{"analysis_id": "\\udfff\\ud800", "label": ["x"]}',
                                  b'{"analysis_id": ', b"\xff\xfe"])
def test_unencodable_feedback_is_a_clean_422(client, body):
    r = client.post("/api/feedback", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail and all(set(e) == {"loc", "msg", "type"} for e in detail)  # where and why, never the input
    assert "\\ud800" not in r.text and "NaN" not in r.text
    assert client.get("/healthz").status_code == 200 and _connections(client) == 1


def test_bad_ids_and_names_are_4xx(client, demo_scans):
    for path in ("/api/analyses/%ED%A0%80", "/api/analyses/..%2F..%2Fetc", "/api/analyses/x/heatmap.png"):
        assert client.get(path).status_code in (404, 422)
    # a file name that is not UTF-8 is shown as well as it can be, never a 500
    body = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="\xed\xa0\x80\xff.jpeg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + _scan(demo_scans) + b"\r\n--b--\r\n")
    r = client.post("/api/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200 and "id" in r.json()["results"][0]
    assert client.get("/healthz").status_code == 200


def test_dns_rebinding_is_refused(client, predict, demo_scans, live_url):
    [r] = predict(("a.jpeg", _scan(demo_scans), "image/jpeg"))["results"]
    port = live_url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", ""):
        refused = client.get(f"/api/analyses/{r['id']}", headers={"host": host})
        assert refused.status_code == 421 and "host" in refused.json()["detail"]
        assert r["id"] not in refused.text and refused.headers["x-frame-options"] == "DENY"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", "[::1]"):
        assert client.get(f"/api/analyses/{r['id']}", headers={"host": host}).status_code == 200


def test_cross_origin_posts_are_refused(client, predict, demo_scans, live_url, serve_dir):
    [r] = predict(("a.jpeg", _scan(demo_scans), "image/jpeg"))["results"]
    before = {p.name for p in (serve_dir / "images").iterdir()}
    form = [("files", ("a.png", _png(8, 8, zlib.compress(b"\0" * 72)), "image/png"))]
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"},
                    {"referer": "http://evil.example/page.html"}, {"origin": live_url.replace("127.0.0.1", "localhost")}):
        refused = client.post("/api/predict", files=form, headers=headers)
        assert refused.status_code == 403 and "cross-origin" in refused.json()["detail"]
        fb = client.post("/api/feedback", json={"analysis_id": r["id"], "label": r["label"]}, headers=headers)
        assert fb.status_code == 403
    assert {p.name for p in (serve_dir / "images").iterdir()} == before
    assert client.get(f"/api/analyses/{r['id']}").json()["feedback"] is None  # nothing was stored
    for headers in ({"origin": live_url}, {"referer": live_url + "/"}, {}):  # the page itself, and scripts
        assert client.post("/api/feedback", json={"analysis_id": r["id"], "label": r["label"]},
                           headers=headers).status_code == 200


def test_security_headers_on_every_response(client):
    answers = [client.get("/"), client.get("/model"), client.get("/docs"), client.get("/api/model"),
               client.get("/healthz"), client.get("/nothing-here"), client.get("/", headers={"host": "evil.example"}),
               client.post("/api/predict", content=b"\0" * (2 * 2**20), headers={"content-type": "multipart/form-data"})]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 200, 404, 421, 413]
    for a in answers:
        csp = a.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert a.headers["x-frame-options"] == "DENY" and a.headers["x-content-type-options"] == "nosniff"
        assert a.headers["referrer-policy"] == "no-referrer"
        assert a.headers["content-type"].split(";")[0] in ("text/html", "application/json")
    page_csp = answers[0].headers["content-security-policy"]
    # the page's script and style are the app's own files (/static): 'self', and hashes of any inline block
    assert "script-src 'self'" in page_csp and "style-src 'self'" in page_csp and "connect-src 'self'" in page_csp


def test_a_stored_copy_predicts_and_explains_as_the_upload(client, live_app, demo_scans, serve_dir, pixels):
    """What is kept is the pixels alone; the model and Grad-CAM see exactly what they saw in the upload."""
    from retinalens.explain import Explainer

    rotated = io.BytesIO()  # an EXIF orientation: the stored copy must hold the pixels as the model saw them
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(demo_scans["DME"]).save(rotated, format="JPEG", exif=exif, quality=90)
    service = live_app[1].state.service
    for data in (rotated.getvalue(), _scan(demo_scans)):
        r = client.post("/api/predict", files=[("files", ("a.jpeg", data, "image/jpeg"))]).json()["results"][0]
        stored = (serve_dir / "images" / client.get(f"/api/analyses/{r['id']}").json()["image"]).read_bytes()
        assert np.array_equal(pixels(stored), pixels(data))
        again = service.model.predict_many([stored])[0]
        assert again["label"] == r["label"]
        assert np.allclose([again["probabilities"][c] for c in r["probabilities"]], list(r["probabilities"].values()),
                           atol=1e-6)
        heatmap = client.get(r["heatmap"]).content  # made from the stored copy
        with Explainer(service.model) as explainer:
            from retinalens.serve.service import HEATMAP_SIDE

            [made] = explainer.explain_many([data], r["label"], max_side=HEATMAP_SIDE)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(made.overlay_png()))),
                              np.asarray(Image.open(io.BytesIO(heatmap))))
