"""Damage checks that Pillow does not make: corrupt JPEG entropy data and incomplete PNG pixel data.

Pillow decodes a JPEG whose entropy-coded data is damaged without an error: its libjpeg error
manager drops libjpeg's warnings ("Corrupt JPEG data: N extraneous bytes before marker", "premature
end of data segment", bad Huffman codes, restart markers out of sequence) and fills the rest with
grey or repeated blocks. A scan damaged like that can get a confident wrong label, so every JPEG is
also run through libjpeg-turbo in strict mode (simplejpeg, `strict=True`: warnings raise), scaled
1/8 so that only the entropy decoding is paid for in full. libjpeg tolerates an entropy stream that
ends a few bytes early (its bit buffer swallows them), so a second strict pass without the last
entropy byte must fail: a sound stream needs its last byte.

Limits, inherent to the format: JPEG carries no checksum, and its Huffman code resynchronises, so a
flipped bit whose damage keeps the block count (typically a shifted DC level from there on) is a
valid stream of a different image and cannot be told apart from the original. For progressive
JPEGs the end check covers the last scan; restart intervals are each checked by libjpeg.

PNG: Pillow checks the CRCs of the chunks it parses (unless `ImageFile.LOAD_TRUNCATED_IMAGES`, which
we never set) but not those of IDAT, whose bytes go straight to zlib, and a zlib stream that ends
properly after half the rows decodes silently with a black lower half. So every chunk's CRC is
checked here, and the IDAT stream is inflated (in bounded pieces) and must yield exactly the rows
the header promises, and end there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
import struct
import zlib

import numpy as np

from ..errors import ImageDecodeError

# A marker inside entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a restart
# marker (RST0-7) or fill bytes.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_NO_LENGTH = {0x01, *range(0xD0, 0xDA)}  # TEM, RST0-7, SOI, EOI: markers without a segment
_ADAM7 = ((8, 8, 0, 0), (8, 8, 4, 0), (4, 8, 0, 4), (4, 4, 2, 0), (2, 4, 0, 2), (2, 2, 1, 0), (1, 2, 0, 1))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def damaged(reason: str) -> ImageDecodeError:
    return ImageDecodeError(f"damaged image ({reason})")


def _strict_jpeg(data: bytes, colorspace: str, min_factor: int = 8) -> np.ndarray:
    import simplejpeg  # lazily: only JPEGs need it

    try:
        return simplejpeg.decode_jpeg(data, colorspace=colorspace, min_factor=min_factor, strict=True)
    except ValueError as exc:
        raise damaged(str(exc).splitlines()[0] if str(exc) else "corrupt JPEG data") from None


def jpeg_segments(data: bytes) -> Iterator[tuple[int | None, int, int]]:
    """A JPEG's pieces after SOI, in order: (marker, start, end) for each marker segment, and (None, start,
    end) for the entropy-coded data after a start of scan; the last piece is EOI's. Stops early, without
    EOI, where the marker structure is broken (the decoder counts that as damage; upload stripping
    falls back to re-encoding). The one walk over JPEG markers: damage checks and metadata stripping."""
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _NO_LENGTH:  # TEM, RSTn, SOI, EOI: markers without a segment
            yield marker, pos, pos + 2
            if marker == 0xD9:
                return
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > n:
            return
        yield marker, pos, end
        pos = end
        if marker == 0xDA:  # entropy-coded data runs to the next real marker
            found = _MARKER.search(data, pos)
            if found is None:
                return
            yield None, pos, found.start()
            pos = found.start()


def _jpeg_eoi(data: bytes) -> int | None:
    """Offset of the EOI marker that ends the main image (not an embedded thumbnail's), or None."""
    return next((start for marker, start, _ in jpeg_segments(data) if marker == 0xD9), None)


def check_jpeg(data: bytes, mode: str, want_pixels: bool = True, concurrent: bool = False) -> np.ndarray | None:
    """ImageDecodeError "damaged image (...)" unless libjpeg decodes `data` without a warning and
    the entropy-coded data ends exactly where the image does. With `want_pixels`, for an L or RGB
    JPEG returns its full-size pixels (libjpeg-turbo's default decode, the pixels Pillow gives:
    compared on every scan and photo of the shared data), else None. `concurrent`: the end check
    decodes on a second thread meanwhile (both decodes release the GIL), for a caller with a core
    idle: a lone image to predict, whose two decodes then cost about one."""
    full = want_pixels and mode in ("L", "RGB")
    colorspace = "RGB" if mode == "RGB" else "CMYK" if mode == "CMYK" else "GRAY"
    if concurrent:
        with ThreadPoolExecutor(max_workers=1) as beside:
            end = beside.submit(_check_end, data, colorspace)
            pixels = _strict_jpeg(data, colorspace, 1 if full else 8)  # its error first, as in the serial order
            end.result()
    else:
        pixels = _strict_jpeg(data, colorspace, 1 if full else 8)  # 1/8: only the entropy decoding costs
        _check_end(data, colorspace)
    return pixels[..., 0] if full and mode == "L" else pixels if full else None


def _check_end(data: bytes, colorspace: str) -> None:
    """Raises "damaged image (...)" unless the entropy-coded data needs its last byte (module notes)."""
    eoi = _jpeg_eoi(data)
    if eoi is None:
        raise damaged("no end-of-image marker")
    cut = eoi - 2 if data[eoi - 2:eoi] == b"\xff\x00" else eoi - 1  # drop the last entropy byte
    try:
        _strict_jpeg(data[:cut] + data[eoi:], "GRAY" if colorspace == "RGB" else colorspace)
    except ImageDecodeError:
        return
    raise damaged("entropy-coded data continues past the last block")


def _png_rows_bytes(width: int, height: int, depth: int, colour: int, interlace: int) -> int:
    bits = depth * _PNG_CHANNELS.get(colour, 1)

    def size(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w and h else 0

    if not interlace:
        return size(width, height)
    return sum(size((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy)
               for dx, dy, x0, y0 in _ADAM7)


def check_png(data: bytes) -> None:
    """ImageDecodeError "damaged image (...)" unless the IDAT chunks hold one complete zlib stream
    with exactly the scanlines the header promises (checked in 1 MiB pieces: bounded memory)."""
    pos, expected, inflater, produced = 8, None, zlib.decompressobj(), 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        pos += 12 + length
        if len(crc) < 4 or zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            # Pillow skips the CRCs of IDAT chunks, whose bytes go straight to zlib
            raise damaged(f"{kind.decode('latin-1')} chunk fails its CRC or is cut short")
        if kind == b"IHDR" and len(body) >= 13:
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            expected = _png_rows_bytes(width, height, depth, colour, interlace)
        elif kind == b"IDAT":
            try:
                while body and not inflater.eof:
                    produced += len(inflater.decompress(body, 1 << 20))
                    body = inflater.unconsumed_tail
                    if produced > (expected or 0):
                        raise damaged("more pixel data than the header's size")
            except zlib.error as exc:
                raise damaged(f"pixel data: {exc}") from None
        elif kind == b"IEND":
            break
    if not inflater.eof or produced != expected:
        raise damaged(f"pixel data ends after {produced:,} of {expected or 0:,} bytes")
