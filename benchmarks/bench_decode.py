"""The decoder under hostile input: memory and time for a 7071x7071 16-bit PNG, the cost of the
damage checks on real scans and photos, and the share of corrupted demo scans refused.

- png16: a 7071x7071 16-bit greyscale gradient PNG (100 MB of pixels in a small file) decoded in a
  fresh process; peak resident memory (VmHWM) above the resident size before the call, and seconds.
  `--src DIR` runs it against another checkout's src/ (how the "before" figure was taken).
- decode_ms: median ms per image, decode_image against Pillow's plain open + convert("RGB") timed
  back to back on each image, on oct-kermany scans and IDRiD photos.
- corruption: 256 or 16 zeroed bytes, or one flipped byte, at 10%..90% of the entropy-coded data of
  every demo scan; how many Pillow decodes without an error and how many of those decode_image refuses.

`python benchmarks/bench_decode.py [--src DIR]` prints the JSON; `run(shared_data)` returns it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIDE = 7071
_CHILD = """
import sys, time
from retinalens.data.decode import decode_image
def kb(key):
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))
data = open(sys.argv[1], 'rb').read()
before, t = kb('VmRSS'), time.perf_counter()
out = decode_image(data)
print(time.perf_counter() - t, (kb('VmHWM') - before) / 1024, out.size[0], out.size[1])
"""


def png16(src: Path, work: Path) -> dict:
    path = work / "gradient16.png"
    if not path.is_file():
        r, c = np.mgrid[0:SIDE, 0:SIDE].astype(np.uint16)
        Image.fromarray(1000 + 4 * c + 3 * r).save(path, optimize=True)  # mode I;16
        del r, c
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, check=True)
    seconds, peak_mb, w, h = done.stdout.split()
    return {"file_kb": round(path.stat().st_size / 1024), "pixels": f"{SIDE}x{SIDE} 16-bit grey",
            "peak_rss_above_start_mb": round(float(peak_mb), 1), "seconds": round(float(seconds), 2),
            "output": f"{w}x{h}", "src": str(src)}


def _paired_ms(fns: dict, paths: list[Path], reps: int = 3) -> dict:
    """Median ms per image of each function, timed back to back on each image so that all of them
    see the same load (this machine is shared), and the median of their per-image ratio to the last."""
    blobs = [p.read_bytes() for p in paths]
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for blob in blobs:
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(blob)
                times[name].append((time.perf_counter() - t) * 1000)
    names = list(fns)
    ratio = statistics.median(a / b for a, b in zip(times[names[0]], times[names[-1]]))
    return {f"{n}_ms": round(statistics.median(v), 2) for n, v in times.items()} | {"median_ratio": round(ratio, 2)}


def decode_ms(shared: Path) -> dict:
    from retinalens.data.decode import decode_image

    sets = {"oct_kermany_512x496_grey": sorted((shared / "oct-kermany" / "test").rglob("*.jpeg"))[:60],
            "idrid_fundus_colour": sorted((shared / "fundus-idrid").rglob("*.jpg"))[:20]}
    fns = {"decode_image": decode_image, "pillow_plain": lambda b: Image.open(io.BytesIO(b)).convert("RGB")}
    return {name: _paired_ms(fns, paths) | {"images": len(paths)} for name, paths in sets.items() if paths}


def corruption() -> dict:
    from retinalens.data.decode import decode_image
    from retinalens.errors import ImageDecodeError

    out: dict = {}
    for path in sorted((ROOT / "src" / "retinalens" / "demo" / "data").rglob("*.jpeg")):
        data = path.read_bytes()
        sos = data.index(b"\xff\xda")
        start, end = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"), data.rindex(b"\xff\xd9")
        for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
            off = start + int((end - start) * frac)
            for kind, size in (("zero256", 256), ("zero16", 16), ("flip1", 0)):
                b = bytearray(data)
                if size:
                    b[off:min(off + size, end)] = bytes(min(size, end - off))
                else:
                    b[off] ^= 0x55
                try:
                    Image.open(io.BytesIO(bytes(b))).load()
                except Exception:  # noqa: BLE001 - Pillow noticed; not what this measures
                    continue
                row = out.setdefault(kind, {"pillow_decodes": 0, "refused": 0})
                row["pillow_decodes"] += 1
                try:
                    decode_image(bytes(b))
                except ImageDecodeError:
                    row["refused"] += 1
    for row in out.values():
        row["refused_share"] = round(row["refused"] / max(1, row["pillow_decodes"]), 3)
    return out


def run(shared_data: Path | None = None, src: Path = ROOT / "src") -> dict:
    with tempfile.TemporaryDirectory() as d:
        res = {"png16": png16(src, Path(d))}
    if shared_data is not None and shared_data.is_dir():
        res["decode_ms"] = decode_ms(shared_data)
    res["corruption"] = corruption()
    res["load_average_1min"] = round(os.getloadavg()[0], 2)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=ROOT / "src")
    ap.add_argument("--only-png16", action="store_true", help="just the 16-bit PNG figure (for --src checkouts)")
    args = ap.parse_args()
    data = Path(os.environ.get("RETINALENS_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    if args.only_png16:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(png16(args.src, Path(d)), indent=2))
    else:
        print(json.dumps(run(data, args.src), indent=2))
