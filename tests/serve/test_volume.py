"""POST /api/volume on a real server: uploaded real B-scans answered as one volume, in slice order."""

from __future__ import annotations

import numpy as np

from retinalens.data.decode import decode_image


def test_uploaded_b_scans_are_one_volume(client, demo_scans, oct_images):
    cnv = demo_scans["CNV"].read_bytes()
    normals = [p.read_bytes() for p in oct_images if p.parent.name == "NORMAL"]
    named = [("scan-10.jpeg", normals[0]), ("scan-2.jpeg", cnv), ("scan-1.jpeg", normals[1]),
             ("scan-3.jpeg", b"not an image")]
    files = [("files", (name, data, "image/jpeg")) for name, data in named]
    r = client.post("/api/volume", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    results, v = body["results"], body["volume"]
    # In the natural order of the names, whatever the order of the upload.
    assert [x["name"] for x in results] == ["scan-1.jpeg", "scan-2.jpeg", "scan-3.jpeg", "scan-10.jpeg"]
    assert "error" in results[2] and (v["n_slices"], v["n_unreadable"]) == (4, 1) and v["grouping"] == "upload"
    gradable = [k for k, x in enumerate(results) if "error" not in x and x["gate"]["ok"]]
    assert v["n_gradable"] == len(gradable) and v["gate"]["ok"] == (len(gradable) >= 2)
    if v["gate"]["ok"]:
        worst = max(gradable, key=lambda k: results[k]["p_referral"])
        assert v["index_slice"] == worst == v["suspicious"][0] and v["label"] == results[worst]["label"]
        assert v["refer"] == any(results[k]["refer"] for k in gradable)
    assert "slices" not in v and "k-th most suspicious" in v["rule"]

    stored = client.get(f"/api/analyses/{results[1]['id']}/image")  # the viewer's B-scan: the stored copy
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/jpeg"
    assert np.array_equal(np.asarray(decode_image(stored.content)), np.asarray(decode_image(cnv)))
    assert client.get("/api/analyses/" + "0" * 32 + "/image").status_code == 404
    assert client.post("/api/volume", data={"x": "1"}).status_code == 400


def test_a_dicom_volume_upload_is_its_frames_and_a_bomb_is_refused(client, oct_images, tmp_path):
    """One multi-frame Ophthalmic Tomography file (real B-scans as frames) is one volume of its frames,
    in file order; a file whose header claims more frames than the limit is a 413, decoded never."""
    import pytest

    pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")
    import dicom_files as F

    scans = oct_images[:3]
    assert len(scans) == 3
    frames = F.volume(scans)
    opt = F.save(F.build(frames, sop_class=F.OPT), tmp_path / "IM0001").read_bytes()
    r = client.post("/api/volume", files=[("files", ("IM0001", opt, "application/dicom"))])
    assert r.status_code == 200, r.text
    results, v = r.json()["results"], r.json()["volume"]
    assert [x["name"] for x in results] == [f"IM0001#frame {i}" for i in (1, 2, 3)] and v["n_slices"] == 3
    stored = client.get(f"/api/analyses/{results[1]['id']}/image")
    assert stored.status_code == 200 and np.array_equal(np.asarray(decode_image(stored.content, keep_grey=True)), frames[1])
    bomb = F.build(frames, sop_class=F.OPT)
    bomb.NumberOfFrames = 100_000
    data = F.save(bomb, tmp_path / "IM0002").read_bytes()
    r = client.post("/api/volume", files=[("files", ("IM0002", data, "application/dicom"))])
    assert r.status_code == 413 and "frames" in r.json()["detail"]


def test_a_multi_frame_dicom_sent_to_predict_is_answered_as_a_volume(client, oct_images, tmp_path):
    """/api/predict answers each multi-frame DICOM file as a volume by itself (in `volumes`), as `predict`
    does on the command line, with the answer /api/volume gives; the other files stay one result each."""
    import pytest

    pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")
    import dicom_files as F

    frames = F.volume(oct_images[:3])[:, :320, :320]  # the test server takes 1 MB a request
    opt = F.save(F.build(frames, sop_class=F.OPT), tmp_path / "IM0001").read_bytes()
    cut = F.save(F.build(frames, sop_class=F.OPT, frames=5), tmp_path / "IM0002").read_bytes()  # holds 3 of 5
    jpegs = [p.read_bytes() for p in oct_images[3:5]]
    files = [("files", ("a.jpeg", jpegs[0], "image/jpeg")), ("files", ("IM0001", opt, "application/dicom")),
             ("files", ("b.jpeg", jpegs[1], "image/jpeg")), ("files", ("IM0002", cut, "application/dicom"))]
    r = client.post("/api/predict", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(x["index"], x["name"]) for x in body["results"]] == [(0, "a.jpeg"), (2, "b.jpeg"), (3, "IM0002")]
    assert "label" in body["results"][0] and "frame" in body["results"][2]["error"]  # a part volume: refused
    [entry] = body["volumes"]
    assert (entry["index"], entry["name"]) == (1, "IM0001")
    v, slices = entry["volume"], entry["results"]
    assert [x["name"] for x in slices] == [f"IM0001#frame {i}" for i in (1, 2, 3)]
    assert (v["grouping"], v["volume"], v["n_slices"]) == ("file", "IM0001", 3) and "slices" not in v
    stored = client.get(f"/api/analyses/{slices[2]['id']}/image")
    assert np.array_equal(np.asarray(decode_image(stored.content, keep_grey=True)), frames[2])
    alone = client.post("/api/volume", files=[("files", ("IM0001", opt, "application/dicom"))]).json()
    same = ("label", "refer", "index_slice", "suspicious", "p_referral", "n_gradable")
    assert {k: v[k] for k in same} == {k: alone["volume"][k] for k in same}
    assert [x["label"] for x in slices] == [x["label"] for x in alone["results"]]
    bomb = F.build(frames, sop_class=F.OPT)
    bomb.NumberOfFrames = 100_000
    r = client.post("/api/predict", files=[("files", ("IM0003", F.save(bomb, tmp_path / "IM0003").read_bytes(),
                                                      "application/dicom"))])
    assert r.status_code == 413 and "frames" in r.json()["detail"]
    plain = client.post("/api/predict", files=[files[0]]).json()
    assert plain["volumes"] == [] and len(plain["results"]) == 1


def test_a_dicom_uploads_frame_count_is_read_from_its_header(oct_images, tmp_path, monkeypatch):
    """Whether an upload is a volume comes from its header alone (no pixel data needed), so a one-frame
    DICOM upload goes on, undecoded, to the ordinary path, which decodes it once."""
    import pytest

    pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")
    import dicom_files as F
    from retinalens.serve import volume as serve_volume

    frames = F.volume(oct_images[:3])
    opt = F.save(F.build(frames, sop_class=F.OPT), tmp_path / "opt").read_bytes()
    single = F.save(F.build(frames[0]), tmp_path / "one").read_bytes()
    header_only = opt[:len(opt) - frames.size + 10]  # the pixel data all but gone: the header still counts
    assert [serve_volume.header_frames(d) for d in (opt, header_only, single, oct_images[0].read_bytes())] == \
        [3, 3, 1, 1]

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("a one-frame upload was decoded to learn its frame count")

    monkeypatch.setattr(serve_volume, "decode_frames", no_decoding)
    for expanded in (serve_volume.with_frames([("one", single)]), serve_volume.in_slice_order([("one", single)])):
        assert expanded.files == [("one", single)] and expanded.volumes == [] and expanded.origin == [0]
