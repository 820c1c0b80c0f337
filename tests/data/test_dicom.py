"""DICOM input through the one decoder: files built at test time from real scans and photos (valid IODs,
checked by dciodvfy where Debian's dicom3tools is installed), decoded to the pixels they hold; broken
files each get one clear error."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

import dicom_files as F  # noqa: E402
from retinalens.data.decode import decode_frames, decode_image  # noqa: E402
from retinalens.data.discover import list_images  # noqa: E402
from retinalens.errors import ImageDecodeError  # noqa: E402

# dicom3tools holds the OPT IOD's concatenation attributes both required and forbidden for a single
# instance; these two of its messages are about that and nothing else.
_DCIODVFY_CONTRADICTIONS = ("ConcatenationUID> Module=<MultiFrameFunctionalGroupsCommon>",
                            "not a Concatenation - attribute <InConcatenationTotalNumber>")


@pytest.fixture(scope="module")
def one_patient(oct_sample_root: Path) -> list[Path]:
    """The B-scans of the one patient with the most scans in a class of the train split (>= 3)."""
    by_patient: dict[str, list[Path]] = {}
    for p in sorted((oct_sample_root / "train" / "DRUSEN").glob("*.jpeg")):
        by_patient.setdefault(p.stem.split("-")[1], []).append(p)
    scans = max(by_patient.values(), key=len)
    if len(scans) < 3:
        pytest.skip("no patient with three B-scans in the sample")
    return scans[:8]


@pytest.fixture(scope="module")
def fundus_photo(shared_data: Path) -> Path:
    photos = sorted((shared_data / "fundus-idrid").rglob("*.jpg"))
    if not photos:
        pytest.skip("no IDRiD fundus photographs in the shared data")
    return photos[0]


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error") and not any(c in line for c in _DCIODVFY_CONTRADICTIONS)]


def test_photo_rgb_8bit_is_a_valid_op_image_with_its_pixels(tmp_path: Path, fundus_photo: Path) -> None:
    rgb = F.rgb_pixels(fundus_photo)
    path = F.save(F.build(rgb), tmp_path / "IM0001")  # no extension, as devices export
    img = decode_image(path)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgb)
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path) == []


def test_opt_volume_of_one_patient_decodes_frame_by_frame(tmp_path: Path, one_patient: list[Path]) -> None:
    vol = F.volume(one_patient)
    path = F.save(F.build(vol, sop_class=F.OPT), tmp_path / "volume")
    frames = list(decode_frames(path, keep_grey=True))
    assert len(frames) == len(one_patient)
    assert all(np.array_equal(np.asarray(f), v) for f, v in zip(frames, vol))
    with pytest.raises(ImageDecodeError, match="multi-frame DICOM file .* a volume"):
        decode_image(path)  # one image was asked for: a volume is not silently cut to a slice
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path) == []


def test_any_other_image_is_one_frame(oct_images: list[Path]) -> None:
    frames = list(decode_frames(oct_images[0]))
    assert len(frames) == 1 and np.array_equal(np.asarray(frames[0]), np.asarray(decode_image(oct_images[0])))


@pytest.mark.parametrize("syntax", [F.JPEG_2000_LOSSLESS, F.JPEG_LS_LOSSLESS, F.RLE, F.JPEG_BASELINE])
def test_compressed_files(tmp_path: Path, oct_images: list[Path], syntax: str) -> None:
    grey = F.grey_pixels(oct_images[0])
    path = F.save(F.build(grey), tmp_path / "scan", syntax)
    got = np.asarray(decode_image(path, keep_grey=True)).astype(int)
    if syntax == F.JPEG_BASELINE:  # lossy: close, not equal
        assert np.abs(got - grey).mean() < 2.0 and not np.array_equal(got, grey)
    else:
        assert np.array_equal(got, grey)
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path) == []


def test_jpeg_baseline_colour_photo(tmp_path: Path, fundus_photo: Path) -> None:
    rgb = F.rgb_pixels(fundus_photo)
    path = F.save(F.build(rgb), tmp_path / "photo", F.JPEG_BASELINE)  # YBR_FULL_422, turned into RGB
    assert np.abs(np.asarray(decode_image(path)).astype(int) - rgb).mean() < 3.0


def test_uncompressed_ybr_full_photo_comes_back_rgb(tmp_path: Path, fundus_photo: Path) -> None:
    from pydicom.pixels import convert_color_space

    rgb = F.rgb_pixels(fundus_photo, side=256)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = F.save(F.build(ybr, photometric="YBR_FULL"), tmp_path / "ybr")
    assert np.abs(np.asarray(decode_image(path)).astype(int) - rgb).max() <= 2  # 8-bit YCbCr rounding


def test_monochrome1_is_inverted_and_16_bit_stretched(tmp_path: Path, oct_images: list[Path]) -> None:
    grey = F.grey_pixels(oct_images[0])
    mono1 = F.save(F.build(255 - grey, sop_class=F.SECONDARY_CAPTURE, photometric="MONOCHROME1"), tmp_path / "m1")
    assert np.array_equal(np.asarray(decode_image(mono1, keep_grey=True)), grey)
    wide = F.save(F.build(grey.astype(np.uint16) * 257, sop_class=F.OP_16BIT), tmp_path / "w16")
    stretched = np.rint((grey.astype(float) - grey.min()) * 255 / (grey.max() - grey.min()))
    assert np.array_equal(np.asarray(decode_image(wide, keep_grey=True)), stretched)
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(wide) == []


def test_windowing_is_applied(tmp_path: Path, oct_images: list[Path]) -> None:
    grey = F.grey_pixels(oct_images[0])
    ds = F.build(grey.astype(np.uint16) * 16, sop_class=F.OP_16BIT)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.WindowCenter, ds.WindowWidth = 2048, 2048  # the upper half of the used range is clipped white
    got = np.asarray(decode_image(F.save(ds, tmp_path / "win"), keep_grey=True))
    assert got[grey.astype(int) * 16 >= 3072].min() == 255 and got[grey.astype(int) * 16 <= 1024].max() == 0


def _broken(tmp_path: Path, grey: np.ndarray) -> dict[str, tuple[Path, str]]:
    vol = np.stack([grey, grey, grey])
    good = F.save(F.build(vol, sop_class=F.OPT), tmp_path / "good").read_bytes()
    cases: dict[str, tuple[Path, str]] = {}
    cut = tmp_path / "truncated"
    cut.write_bytes(good[:len(good) - grey.size])
    cases["truncated"] = (cut, "pixel data ends after")
    ds = F.build(vol, sop_class=F.OPT)
    del ds.PixelData
    cases["no pixel data"] = (F.save(ds, tmp_path / "nopixels"), "no pixel data")
    cases["wrong frame count"] = (F.save(F.build(vol, sop_class=F.OPT, frames=5), tmp_path / "count"),
                                  "truncated, or a wrong frame count")
    j2k = F.save(F.build(vol, sop_class=F.OPT), tmp_path / "j2k", F.JPEG_2000_LOSSLESS)
    from pydicom import dcmread

    ds = dcmread(j2k)
    ds.NumberOfFrames = 5
    ds.save_as(tmp_path / "j2kcount")
    cases["wrong frame count, compressed"] = (tmp_path / "j2kcount", "wrong frame count")
    cases["frame-count bomb"] = (F.save(F.build(vol, sop_class=F.OPT, frames=10**9), tmp_path / "bomb"),
                                 "claims 1,000,000,000 frames")
    from pydicom.encaps import encapsulate

    ds = F.build(grey)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not an image syntax we read
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(tmp_path / "mpeg", enforce_file_format=True)
    cases["unsupported syntax"] = (tmp_path / "mpeg", "transfer syntax MPEG2")
    cases["palette colour"] = (F.save(F.build(grey, photometric="PALETTE COLOR"), tmp_path / "palette"),
                               "photometric interpretation 'PALETTE COLOR' is not supported")
    ct = F.build(grey)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    cases["not an ophthalmic image"] = (F.save(ct, tmp_path / "ct"), "CT Image Storage is not an image we read")
    return cases


def test_broken_files_each_get_one_clear_error(tmp_path: Path, oct_images: list[Path]) -> None:
    for kind, (path, reason) in _broken(tmp_path, F.grey_pixels(oct_images[0])[:64, :64]).items():
        with pytest.raises(ImageDecodeError) as caught:
            list(decode_frames(path, name="scan"))
        message = str(caught.value)
        assert message.startswith("scan: ") and reason in message, (kind, message)
        assert "\n" not in message and F.SENTINEL not in message


def test_folder_walks_find_dicom_by_content(tmp_path: Path, oct_images: list[Path]) -> None:
    dicom = F.save(F.build(F.grey_pixels(oct_images[0])), tmp_path / "in" / "1.2.3.4")  # a UID-like name
    (tmp_path / "in" / "DICOMDIR").write_bytes(dicom.read_bytes())  # a medium's index, not an image
    (tmp_path / "in" / "notes").write_text("x" * 200)
    assert list_images(tmp_path / "in") == [dicom]


def test_same_scan_as_jpeg_and_dicom_same_pixels_and_prediction(tmp_path: Path, small_bundle, demo_scans) -> None:
    from retinalens.predict.model import load

    scan = demo_scans["CNV"]
    dicom = F.save(F.build(F.grey_pixels(scan)), tmp_path / "cnv")
    assert np.array_equal(np.asarray(decode_image(scan)), np.asarray(decode_image(dicom)))
    model = load(small_bundle.path)
    from_jpeg, from_dicom = model.predict_many([scan, dicom])
    assert "error" not in from_dicom
    for key in ("label", "probabilities", "referral", "p_referral"):
        assert from_jpeg[key] == from_dicom[key], key


def test_without_the_extra_a_dicom_file_names_it(tmp_path: Path, oct_images: list[Path]) -> None:
    """pydicom absent (blocked in a child process): one line naming the extra, and exit 2."""
    import subprocess
    import sys

    from helpers import cli_env

    path = F.save(F.build(F.grey_pixels(oct_images[0])), tmp_path / "scan")
    code = ("import sys; sys.modules['pydicom'] = None\n"
            "from retinalens.data.decode import decode_image\n"
            "from retinalens.errors import ImageDecodeError\n"
            f"try: decode_image({str(path)!r})\n"
            "except ImageDecodeError as e: print(e); sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 2 and "pip install 'retinalens[dicom]'" in r.stdout, r.stdout + r.stderr


def test_damaged_headers_never_escape_or_echo_a_value(oct_images: list[Path], tmp_path: Path) -> None:
    """Random bytes overwritten in the header of a real scan's file (seeded: the same 300 files every
    run): each decodes or gets ImageDecodeError, never another exception, never a tag's value."""
    data = F.save(F.build(F.grey_pixels(oct_images[0])[:32, :32]), tmp_path / "scan").read_bytes()
    end = data.index(b"\xe0\x7f\x10\x00")  # the pixel data element: everything before it is header
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(300):
        broken = bytearray(data)
        for at in rng.integers(132, end, size=int(rng.integers(1, 4))):
            broken[at] = int(rng.integers(0, 256))
        try:
            decode_image(bytes(broken))
        except ImageDecodeError as exc:
            refused += 1
            assert F.SENTINEL not in str(exc) and "\n" not in str(exc)
    assert refused > 30  # the damage was real often enough for the check to mean something
