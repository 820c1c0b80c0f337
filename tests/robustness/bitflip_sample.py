"""Random bit flips in real scans' entropy data, each copy classified as the toolkit treats it.

`python tests/robustness/bitflip_sample.py [--held-out] [--seed WORD] [--save DIR]` regenerates a deterministic sample
(every flip drawn from a generator seeded by the copy's own name and the sample's seed) and prints how
many copies are refused (by the strict decoder, or by which absolute floor of the quality gate), how
many decode as near-copies of their source (within `checks.benign_damage`'s bound: harmless), and how
many are damaged yet pass every floor (the class a model would label).

Two samples: the design sample (the demo's 44 test scans and every third of the 129 `oct-kermany/test`
scans, 1 / 4 / 16 flips in the first half of the entropy data, 2 copies each: 522), and `--held-out`
(200 `oct-kermany/train` scans, 1 / 4 / 16 flips, one copy each under another seed: 600), other scans
than the design's; `--seed WORD` draws the flips of either anew. `--save DIR` writes each damaged-but-passing
copy beside its source as a PNG. `--bundle B` runs what a user gets on every damaged-but-passing copy
(the model with its fitted gate) beside the same on its source: how many the gate refuses, how many
keep the source's label, and how many move from a referred (urgent) label to a non-referred one, the
dangerous case.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent / "src")]

from retinalens.data.decode import decode_image  # noqa: E402 - after the path above
from retinalens.data.transforms import Preprocessing  # noqa: E402
from retinalens.demo import DEMO_DATA  # noqa: E402
from retinalens.errors import ImageDecodeError  # noqa: E402
from retinalens.trust.gate import FLOORS  # noqa: E402
from retinalens.trust.statistics import all_statistics, source_statistics  # noqa: E402
from robustness.checks import BENIGN_CHANGED, benign_damage  # noqa: E402
from robustness.corpus import Spec, entropy_span  # noqa: E402

FLIPS = (1, 4, 16)
REFUSED_DECODER, NEAR_COPY, DAMAGED_LABELLED = "refused: decoder", "near-copy", "damaged, passes the floors"


@dataclass(frozen=True)
class Copy:
    name: str
    source: Path
    data: bytes


def flip_bits(jpeg: bytes, flips: int, name: str) -> bytes:
    """`jpeg` with `flips` random bits flipped in the first half of its entropy data (seeded by `name`)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big"))
    start, end = entropy_span(jpeg)
    data = bytearray(jpeg)
    for pos, bit in zip(rng.integers(start, start + (end - start) // 2, flips), rng.integers(0, 8, flips)):
        data[pos] ^= 1 << int(bit)
    return bytes(data)


def copies(scans: Iterable[Path], n_copies: int, seed: str) -> Iterator[Copy]:
    for path in scans:
        jpeg = path.read_bytes()
        for flips in FLIPS:
            for k in range(n_copies):
                name = f"{seed}-{path.stem}-{flips}-{k}"
                yield Copy(name, path, flip_bits(jpeg, flips, name))


def design_scans(demo: Path, shared_oct: Path) -> list[Path]:
    return sorted(demo.glob("test/*/*.jpeg")) + sorted(shared_oct.glob("test/*/*.jpeg"))[::3]


def held_out_scans(shared_oct: Path, n: int = 200) -> list[Path]:
    train = sorted(shared_oct.glob("train/*/*.jpeg"))
    return train[::max(1, len(train) // n)][:n]


def classify(copy: Copy) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """(outcome, the copy's grey pixels, its source's) where both decode; the floors as the gate applies them."""
    try:
        img = decode_image(copy.data, keep_grey=True)
    except ImageDecodeError:
        return REFUSED_DECODER, None, None
    pp = Preprocessing(size=224, mean=(0.5,) * 3, std=(0.5,) * 3)  # the default backbone's input size
    stats = all_statistics(pp.pixels(img)[None].numpy(), np.array([source_statistics(img)]))
    failed = next((c for c in FLOORS if c.fails(stats[c.score])[0]), None)  # the first, as the gate reports
    a = np.asarray(img, dtype=np.int16)
    b = np.asarray(decode_image(copy.source, keep_grey=True), dtype=np.int16)
    if failed is not None:
        return f"refused: {failed.reason} ({failed.score})", a, b
    spec = Spec(copy.name, "jpeg-bitflip", "ungradable", data=copy.data, source_data=copy.source.read_bytes())
    return (NEAR_COPY if benign_damage(spec) else DAMAGED_LABELLED), a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("RETINALENS_SHARED_DATA", TESTS.parents[1] / "shared" / "data"))  # as tests/conftest.py
    parser.add_argument("--shared", type=Path, default=shared / "oct-kermany", help="the Kermany set (default: %(default)s)")
    parser.add_argument("--held-out", action="store_true", help="the held-out sample (oct-kermany/train)")
    parser.add_argument("--seed", help="another sample of the same scans: flips seeded by this word instead")
    parser.add_argument("--save", type=Path, help="write each damaged-but-passing copy beside its source (PNG)")
    parser.add_argument("--bundle", type=Path, help="predict each damaged-but-passing copy and its source with it")
    args = parser.parse_args(argv)
    model = None
    if args.bundle:
        from retinalens import load

        model = load(args.bundle)
    answers: Counter[str] = Counter()

    if args.held_out:
        sample = list(copies(held_out_scans(args.shared), 1, args.seed or "held-out"))
    else:
        sample = list(copies(design_scans(DEMO_DATA, args.shared), 2, args.seed or "design"))
    counts: Counter[str] = Counter()
    start = time.perf_counter()
    for copy in sample:
        outcome, a, b = classify(copy)
        counts[outcome] += 1
        if outcome == DAMAGED_LABELLED:
            diff = np.abs(a - b)
            print(f"{copy.name}: mean |diff| {diff.mean():.1f}, {100 * (diff > BENIGN_CHANGED).mean():.1f}% changed")
            if model is not None:
                answers[compare(model, copy)] += 1
            if args.save:
                from PIL import Image

                args.save.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.hstack([b, a]).astype(np.uint8)).save(args.save / f"{copy.name}.png")
    print(f"{len(sample)} copies in {time.perf_counter() - start:.0f} s:")
    for outcome, n in sorted(counts.items()):
        print(f"  {outcome}: {n} ({100 * n / len(sample):.1f}%)")
    if model is not None:
        print(f"damaged but passing the floors, through {args.bundle} (its fitted gate included):")
        for answer, n in sorted(answers.items()):
            print(f"  {answer}: {n}")
    return 0


def compare(model, copy: Copy) -> str:
    """What the model answers on a copy, against its answer on the source."""
    got, source = model.predict(copy.data), model.predict(copy.source)
    if not got["gate"]["ok"]:
        return f"refused by the fitted gate ({got['gate']['reason']})"
    if got["label"] == source["label"]:
        return "labelled, the source's label"
    if source.get("refer") and not got.get("refer"):
        return f"labelled, referred source not referred ({source['label']} -> {got['label']})"
    return f"labelled, another label ({source['label']} -> {got['label']})"


if __name__ == "__main__":
    sys.exit(main())
