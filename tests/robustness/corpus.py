"""A generated corpus of hostile and careless inputs, derived from real OCT scans.

`corpus_specs(sources)` describes a few hundred items (deterministic: every random choice comes from a
generator seeded by the item's own name), `build(specs, folder)` writes them. Each item says what the
toolkit must do with it:

- `error`: not a readable image; it must come back as an error entry, never with a class label;
- `valid`: a legitimate image, however it is named or encoded; it must be predicted (none lost);
- `ungradable`: decodes (or half-decodes) to something no grader could read; the decoder or the
  quality gate may refuse it, but it must never get a class label.

Nothing large is committed: the items are made at test time from the demo's bundled scans and, when
present, the shared Kermany set. The decompression bombs are small files that claim huge images.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

EXPECTS = ("error", "valid", "ungradable")
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
# Where in the file a truncated JPEG stops: header-only cuts, then fractions of the file.
TRUNCATE_BYTES = (2, 20, 200, 600)
TRUNCATE_FRACTIONS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 0.97)
SHARED_ENCODINGS = ("orig", "grey16", "progressive", "cmyk")  # the variants made of the shared set's scans too


@dataclass(frozen=True)
class Spec:
    name: str  # the item's path relative to the corpus folder (str: may hold any character a file name can)
    cls: str  # the corpus class, e.g. jpeg-truncated
    expect: str  # error | valid | ungradable
    kind: str = "file"  # file | symlink | fifo | dir
    data: bytes = b""  # a file's content
    target: str = ""  # a symlink's target (relative to the link's folder)
    source: str = ""  # a damaged copy: the name of the clean item it was made from (orig-STEM.jpeg)
    source_data: bytes = field(default=b"", repr=False)  # and that item's bytes

    def __post_init__(self) -> None:
        assert self.expect in EXPECTS, self.expect

    @property
    def has_bytes(self) -> bool:
        """Whether a client could upload it (special files have no content to send)."""
        return self.kind == "file"


def source_scans(demo: Path, shared_oct: Path | None) -> list[Path]:
    """The real scans the corpus derives from: one per class from the demo's test split and, when the
    shared Kermany set is there, one per class from its test split too (sorted: the same files every run)."""
    roots = [demo / "test"] + ([shared_oct / "test"] if shared_oct and (shared_oct / "test").is_dir() else [])
    return [min((root / c).glob("*.jpeg")) for root in roots for c in OCT_CLASSES if (root / c).is_dir()]


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big"))


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, raw: bytes, *, idat_crc: int | None = None,
         ihdr_crc: int | None = None) -> bytes:
    """A greyscale PNG written chunk by chunk, so that its header may claim what its data does not hold."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr, ihdr_crc) + _png_chunk(b"IDAT", raw, idat_crc)
            + _png_chunk(b"IEND", b""))


def _zeros_zlib(row_bytes: int, rows: int) -> bytes:
    """The zlib stream of `rows` filter-0 rows of zeros, compressed as it goes (never held whole)."""
    c = zlib.compressobj(9)
    row = bytes(row_bytes + 1)
    block = row * max(1, (1 << 20) // len(row))
    full, rest = divmod(rows * len(row), len(block))
    return b"".join([c.compress(block) for _ in range(full)] + [c.compress(block[:rest]), c.flush()])


def entropy_span(jpeg: bytes) -> tuple[int, int]:
    """(start, end) of the entropy-coded data after the first SOS marker (end: the EOI marker)."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", jpeg[sos + 2:sos + 4])[0]
    return start, jpeg.rindex(b"\xff\xd9")


def _sof_offset(jpeg: bytes) -> int:
    """Offset of the height field of the first SOF0/SOF2 frame header."""
    i = 2
    while i < len(jpeg) - 4:
        marker, length = jpeg[i + 1], struct.unpack(">H", jpeg[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC2):
            return i + 5
        i += 2 + length
    raise ValueError("no SOF marker")


def _damaged_jpegs(stem: str, jpeg: bytes, fractions: tuple[float, ...] = TRUNCATE_FRACTIONS) -> Iterable[Spec]:
    for cut in (*TRUNCATE_BYTES, *(int(f * len(jpeg)) for f in fractions), len(jpeg) - 16):
        yield Spec(f"trunc-{stem}-{cut}.jpeg", "jpeg-truncated", "error", data=jpeg[:cut])
    start, end = entropy_span(jpeg)
    half = start + (end - start) // 2  # damage in the first half: the rest of the picture decodes as garbage
    for flips in (4, 16, 64):
        name = f"bitflip-{stem}-{flips}.jpeg"
        data = bytearray(jpeg)
        for pos, bit in zip(_rng(name).integers(start, half, flips), _rng(name + "b").integers(0, 8, flips)):
            data[pos] ^= 1 << int(bit)
        yield Spec(name, "jpeg-bitflip", "ungradable", data=bytes(data), source=f"orig-{stem}.jpeg", source_data=jpeg)
    for run in (256, 1024, 4096):
        name = f"zeroed-{stem}-{run}.jpeg"
        at = int(_rng(name).integers(start, max(start + 1, half - run)))
        yield Spec(name, "jpeg-zeroed-run", "ungradable", data=jpeg[:at] + bytes(run) + jpeg[at + run:])


def dc_shifted(jpeg: bytes, at: tuple[float, float], shift: int) -> bytes:
    """The scan of `jpeg` re-encoded (quality 90) with every 8x8 block from the one at (fraction of the
    height, of the width) to the end, in the raster order a greyscale JPEG codes its blocks in, `shift`
    grey levels brighter (clipped to 0..255): what a flipped bit that changed one DC difference decodes to.
    shift=0: the same scan re-encoded alike."""
    with Image.open(io.BytesIO(jpeg)) as im:
        grey = np.asarray(im.convert("L"), dtype=np.int16)
    row, col = int(at[0] * grey.shape[0]) // 8 * 8, int(at[1] * grey.shape[1]) // 8 * 8
    grey = grey.copy()
    grey[row:row + 8, col:] += shift
    grey[row + 8:] += shift
    return _encode(Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def _dc_shifts(stem: str, jpeg: bytes) -> Iterable[Spec]:
    """Brightness shifts from one block on, up (the dark background turns grey) and down (clipped black)."""
    for at, shift in (((0.35, 0.45), 24), ((0.45, 0.6), -120)):
        yield Spec(f"dcshift-{stem}-{shift}.jpeg", "jpeg-dc-shift", "ungradable", data=dc_shifted(jpeg, at, shift),
                   source=f"orig-{stem}.jpeg", source_data=jpeg)


def _damaged_pngs(stem: str, grey: Image.Image) -> Iterable[Spec]:
    w, h = grey.size
    raw = zlib.compress(b"".join(b"\x00" + grey.tobytes()[y * w:(y + 1) * w] for y in range(h)), 9)
    for frac in (0.1, 0.5, 0.9):  # a well-formed file whose zlib stream stops early (chunk CRCs right)
        yield Spec(f"zlibcut-{stem}-{int(frac * 100)}.png", "png-truncated-zlib", "error",
                   data=_png(w, h, 8, raw[:int(frac * len(raw))]))
    whole = _png(w, h, 8, raw)
    for frac in (0.3, 0.8):  # the file itself cut short
        yield Spec(f"pngcut-{stem}-{int(frac * 100)}.png", "png-truncated-file", "error", data=whole[:int(frac * len(whole))])
    yield Spec(f"badcrc-idat-{stem}.png", "png-bad-crc", "error", data=_png(w, h, 8, raw, idat_crc=zlib.crc32(raw) ^ 1))
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0x10  # corrupted data under a stale CRC: what a bad disk or download gives
    yield Spec(f"badcrc-data-{stem}.png", "png-bad-crc", "error", data=_png(w, h, 8, bytes(flipped), idat_crc=zlib.crc32(raw)))
    yield Spec(f"badcrc-ihdr-{stem}.png", "png-bad-crc", "error", data=_png(w, h, 8, raw, ihdr_crc=0))


def _bombs(jpeg: bytes) -> Iterable[Spec]:
    """Small files that claim huge images: beyond the pixel limit (refused), and within it (decoded, blank)."""
    few_rows = _zeros_zlib(100_000, 4)
    yield Spec("bomb-png-100000x100000.png", "bomb", "error", data=_png(100_000, 100_000, 8, few_rows))
    yield Spec("bomb-png16-60000x60000.png", "bomb", "error", data=_png(60_000, 60_000, 16, _zeros_zlib(120_000, 4)))
    yield Spec("bomb-png-zeros-12000x12000.png", "bomb", "error", data=_png(12_000, 12_000, 8, _zeros_zlib(12_000, 12_000)))
    yield Spec("bomb-png-zeros-7000x7000.png", "bomb", "ungradable", data=_png(7000, 7000, 8, _zeros_zlib(7000, 7000)))
    yield Spec("bomb-png16-zeros-7000x7000.png", "bomb", "ungradable",
               data=_png(7000, 7000, 16, _zeros_zlib(14_000, 7000)))
    at = _sof_offset(jpeg)
    yield Spec("bomb-jpeg-65000x65000.jpeg", "bomb", "error", data=jpeg[:at] + struct.pack(">HH", 65000, 65000) + jpeg[at + 4:])
    yield Spec("bomb-jpeg-7000x7000.jpeg", "bomb", "ungradable", data=jpeg[:at] + struct.pack(">HH", 7000, 7000) + jpeg[at + 4:])


def _webp_with_pcd(img: Image.Image) -> bytes:
    """A valid WebP whose ICC profile puts b'PCD_' at offset 2048, where Pillow's PhotoCD plugin looks."""
    probe = _encode(img, "WEBP", quality=80, icc_profile=b"\0" * 4096)
    at = probe.index(b"ICCP") + 8  # the profile's first byte
    profile = bytearray(4096)
    profile[2048 - at:2048 - at + 4] = b"PCD_"
    data = _encode(img, "WEBP", quality=80, icc_profile=bytes(profile))
    assert data[2048:2052] == b"PCD_"
    return data


def _zip_polyglot() -> bytes:
    """An ELF header followed by a zip archive: `file` says executable, unzip opens it."""
    import zipfile

    buf = io.BytesIO()
    buf.write(b"\x7fELF\x02\x01\x01" + bytes(57))
    with zipfile.ZipFile(buf, "a") as z:
        z.writestr(zipfile.ZipInfo("payload.sh", date_time=(2020, 1, 1, 0, 0, 0)), "#!/bin/sh\necho hello\n")
    return buf.getvalue()


def _confusions(scan: Image.Image) -> Iterable[Spec]:
    yield Spec("png-named.jpeg", "format-confusion", "valid", data=_encode(scan, "PNG"))
    yield Spec("webp-pcd-at-2048.webp", "format-confusion", "valid", data=_webp_with_pcd(scan))
    yield Spec("postscript.jpeg", "format-confusion", "error",
               data=b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n/Times findfont 12 scalefont setfont\n"
                    b"10 10 moveto (hello) show showpage\n%%EOF\n")
    yield Spec("document.jpeg", "format-confusion", "error",
               data=b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n2 0 obj << /Type /Pages /Kids [] "
                    b"/Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    yield Spec("vector.jpeg", "format-confusion", "error",
               data=b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="512" height="496">'
                    b'<rect width="512" height="496" fill="grey"/></svg>\n')
    yield Spec("notes.png", "format-confusion", "error", data=b"patient notes: scan to follow\n" * 20)
    yield Spec("polyglot.jpeg", "format-confusion", "error", data=_zip_polyglot())


def _encodings(stem: str, scan: Image.Image, grey: Image.Image, jpeg: bytes) -> Iterable[Spec]:
    """The same real scan as users' tools write it: each must still be predicted."""
    yield Spec(f"orig-{stem}.jpeg", "valid-encoding", "valid", data=jpeg)
    yield Spec(f"upper-{stem}.JPEG", "valid-encoding", "valid", data=jpeg)
    yield Spec(f"grey-{stem}.png", "valid-encoding", "valid", data=_encode(grey, "PNG"))
    wide = Image.fromarray((np.asarray(grey, np.uint16) * 257))
    yield Spec(f"grey16-{stem}.png", "valid-encoding", "valid", data=_encode(wide, "PNG"))
    yield Spec(f"progressive-{stem}.jpeg", "valid-encoding", "valid", data=_encode(scan, "JPEG", progressive=True, quality=90))
    yield Spec(f"cmyk-{stem}.jpeg", "valid-encoding", "valid", data=_encode(scan.convert("CMYK"), "JPEG", quality=90))
    yield Spec(f"rgba-{stem}.png", "valid-encoding", "valid", data=_encode(scan.convert("RGBA"), "PNG"))
    yield Spec(f"tiff-{stem}.tif", "valid-encoding", "valid", data=_encode(grey, "TIFF"))
    yield Spec(f"bmp-{stem}.bmp", "valid-encoding", "valid", data=_encode(scan, "BMP"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the pixels are stored turned, as cameras and some exporters write
    yield Spec(f"exif-rotated-{stem}.jpeg", "valid-encoding", "valid",
               data=_encode(scan.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif))


def _degenerate(grey: Image.Image) -> Iterable[Spec]:
    """Decodable, but nothing a grader could read."""
    rng = _rng("degenerate")
    for size in ((1, 1), (2, 2)):
        yield Spec(f"tiny-{size[0]}x{size[1]}.png", "tiny", "ungradable", data=_encode(grey.resize(size), "PNG"))
    yield Spec("strip-4000x20.png", "strip", "ungradable", data=_encode(grey.resize((4000, 20)), "PNG"))
    yield Spec("strip-20x4000.png", "strip", "ungradable", data=_encode(grey.resize((20, 4000)), "PNG"))
    for value in (0, 128, 255):
        yield Spec(f"uniform-{value}.png", "uniform", "ungradable", data=_encode(Image.new("L", (512, 496), value), "PNG"))
    yield Spec("uniform-128.jpeg", "uniform", "ungradable", data=_encode(Image.new("RGB", (512, 496), (128,) * 3), "JPEG"))
    yield Spec("noise-grey.png", "noise", "ungradable", data=_encode(Image.fromarray(rng.integers(0, 256, (496, 512), dtype=np.uint8)), "PNG"))
    yield Spec("noise-rgb.jpeg", "noise", "ungradable",
               data=_encode(Image.fromarray(rng.integers(0, 256, (496, 512, 3), dtype=np.uint8)), "JPEG", quality=95))
    yield Spec("noise-binary.png", "noise", "ungradable",
               data=_encode(Image.fromarray((rng.integers(0, 2, (496, 512)) * 255).astype(np.uint8)), "PNG"))


ESCAPE = "\x1b[31m"  # what a hostile name would print, raw, to colour a terminal red
ODD_NAMES = (
    "x" * 245 + ".jpeg",  # 250 bytes: any derived name (stem + class + .png) is over the 255-byte limit
    "扫描 ñ é 🩺.jpeg",
    "e\u0301-combining-and-\u202eright-to-left.jpeg",
    "with spaces  and  tabs\t.jpeg",
    "-leading-dash.jpeg",
    "--json.jpeg",
    f"{ESCAPE}red{chr(27)}[0m.jpeg",
    "\x1b]0;retitled\x07title.jpeg",
    "new\nline.jpeg",
    "carriage\rreturn.jpeg",
    os.fsdecode(b"latin1-\xe9t\xe9.jpeg"),  # not UTF-8: the name holds surrogates once decoded
    "semi;colon'quote\"`$(echo).jpeg",
)


def _odd_names(jpeg: bytes) -> Iterable[Spec]:
    for name in ODD_NAMES:
        yield Spec(name, "odd-name", "valid", data=jpeg)


def _filesystem(stem: str) -> Iterable[Spec]:
    yield Spec("empty.jpeg", "empty", "error", data=b"")
    yield Spec("loop-a.jpeg", "symlink-loop", "error", kind="symlink", target="loop-b.jpeg")
    yield Spec("loop-b.jpeg", "symlink-loop", "error", kind="symlink", target="loop-a.jpeg")
    yield Spec("dangling.jpeg", "dangling-symlink", "error", kind="symlink", target="no-such-scan.jpeg")
    yield Spec("pipe.jpeg", "fifo", "error", kind="fifo")
    yield Spec("folder.jpeg", "directory", "error", kind="dir")
    yield Spec("link-to-scan.jpeg", "valid-encoding", "valid", kind="symlink", target=f"orig-{stem}.jpeg")


def corpus_specs(sources: list[Path]) -> list[Spec]:
    """Every item of the corpus, derived from `sources` (real JPEG scans); names are unique."""
    specs: list[Spec] = []
    for k, path in enumerate(sources):
        stem, jpeg = f"{k}{path.stem}", path.read_bytes()
        with Image.open(path) as im:
            scan = im.convert("RGB")
        grey = scan.convert("L")
        specs += _dc_shifts(stem, jpeg)
        if k < 4:  # the first four (the demo's, one per class) in every variant
            specs += [*_damaged_jpegs(stem, jpeg), *_encodings(stem, scan, grey, jpeg), *_damaged_pngs(stem, grey)]
        else:  # full-size scans from the shared set: fewer cuts, the commonest encodings
            specs += [*_damaged_jpegs(stem, jpeg, TRUNCATE_FRACTIONS[1::2]),
                      *(s for s in _encodings(stem, scan, grey, jpeg) if s.name.split("-")[0] in SHARED_ENCODINGS)]
    first = sources[0]
    with Image.open(first) as im:
        scan = im.convert("RGB")
    jpeg, stem = first.read_bytes(), f"0{first.stem}"
    specs += [*_bombs(jpeg), *_confusions(scan), *_degenerate(scan.convert("L")), *_odd_names(jpeg), *_filesystem(stem)]
    names = [s.name for s in specs]
    assert len(set(names)) == len(names), "corpus names must be unique"
    return specs


def build(specs: Iterable[Spec], folder: Path) -> Path:
    """Write the items into `folder` (created); links and special files as the specs say."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in specs:
        path = folder / s.name
        if s.kind == "file":
            path.write_bytes(s.data)
        elif s.kind == "symlink":
            path.symlink_to(s.target)
        elif s.kind == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
    return folder


def subset(specs: list[Spec], n: int, must: Iterable[str] = ()) -> list[Spec]:
    """The items named in `must`, then up to n in all covering every class (round robin over the classes,
    in corpus order); a symlink comes with its target so that it points where it did in the full corpus."""
    wanted = set(must)
    picked = [s for s in specs if s.name in wanted]
    by_cls: dict[str, list[Spec]] = {}
    for s in specs:
        if s.name not in wanted:
            by_cls.setdefault(s.cls, []).append(s)
    while len(picked) < n and any(by_cls.values()):
        for queue in by_cls.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    names = {s.name for s in picked}
    link_targets = {p.target for p in picked if p.kind == "symlink"}
    return picked + [s for s in specs if s.name in link_targets and s.name not in names]
