"""The report's OCT-volume section: volume-level metrics and, for a few volumes (misclassified first),
a strip of their B-scans with the one that decided marked, and the heat maps of the most suspicious."""

from __future__ import annotations

import html
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from retinalens.data.decode import decode_image
from retinalens.data.volumes import Slice, Volume, multi_frame_volume
from retinalens.errors import ImageDecodeError, RetinaLensError
from retinalens.evaluate.markup import data_uri, fmt, table
from retinalens.explain.gallery import jpeg_bytes

if TYPE_CHECKING:
    from retinalens.bundle.store import Bundle
    from retinalens.evaluate.volumes import EvaluatedVolume
    from retinalens.predict.model import Model

STRIP_VOLUMES = 4  # volumes shown as strips
STRIP_SLICES = 64  # B-scans per strip (an OCT volume holds up to 128; the rest are counted, not drawn)
STRIP_SIDE = 96  # thumbnail pixels a side


def volumes_section(summary: dict[str, Any] | None, volumes: Sequence[EvaluatedVolume],
                    bundle: Bundle | Model | None) -> str:
    if not summary or summary.get("metrics") is None:
        return '<p class="note">No gradable volume was evaluated.</p>'
    m = summary["metrics"]
    urgent = m.get("urgent_referral") or {}
    rows = [("Volumes (gradable / all)", f"{summary['n_volumes'] - summary['n_ungradable']} / {summary['n_volumes']}"),
            ("Grouping", summary["grouping_note"]),
            ("Truth", f"{summary['truth']} ({summary['n_mixed_labels']} volume(s) with several)"),
            ("Rule", str(summary["rule"])),
            ("Accuracy", fmt(m["accuracy"], m.get("accuracy_ci")))]
    if urgent:
        rows += [(f"Referral ({' + '.join(urgent['positive_classes'])}, P ≥ {urgent['threshold']:.3g}): sensitivity",
                  fmt(urgent["sensitivity"], urgent.get("sensitivity_ci"))),
                 ("Referral: specificity", fmt(urgent["specificity"], urgent.get("specificity_ci")))]
    out = table(("Per volume", "Value (CI)"), [(html.escape(k), html.escape(v)) for k, v in rows])
    out += (f'<p class="note">{html.escape(m["ci"]["method"])}, {m["ci"]["n_boot"]} resamples; the B-scan metrics '
            'above count every B-scan on its own.</p>')
    return out + _strips(volumes, bundle)


def _wrong(v: EvaluatedVolume) -> bool:
    return v.result["label"] is not None and v.result["label"] != v.true_class


def _strips(volumes: Sequence[EvaluatedVolume], bundle: Bundle | Model | None) -> str:
    shown = sorted((v for v in volumes if v.result["gate"]["ok"]),
                   key=lambda v: (not _wrong(v), -(v.result["p_referral"] or 0), v.id))[:STRIP_VOLUMES]
    parts = [f'<p class="note">{len(shown)} volume(s), misclassified first: each B-scan in order, the one whose '
             "answer the volume took outlined in red; below, Grad-CAM heat maps of the most suspicious B-scans "
             "for the volume's class.</p>"]
    with ExitStack() as stack:
        if bundle is not None and shown:
            from retinalens.explain import Explainer
            from retinalens.explain.volume import suspicious_heatmaps

            ex = stack.enter_context(Explainer(bundle))
        for v in shown:  # one volume's B-scans at a time: a multi-frame file's frames are decoded again here
            volume = _volume(v)
            maps = suspicious_heatmaps(ex, volume, v.result, max_side=STRIP_SIDE * 2) \
                if bundle is not None and volume.slices else {}
            parts.append(_strip(v, volume, maps))
    return "".join(parts)


def _volume(v: EvaluatedVolume) -> Volume:
    """The B-scans of an evaluated volume: its files, or the frames of its multi-frame file (none, when
    the file can no longer be read: the strip says so)."""
    if v.result["grouping"] != "file":
        return Volume(v.id, v.result["grouping"], tuple(Slice(str(p), p) for p in v.paths))
    try:
        return multi_frame_volume(v.paths[0]) or Volume(v.id, "file", ())
    except RetinaLensError:
        return Volume(v.id, "file", ())


def _strip(v: EvaluatedVolume, volume: Volume, maps: dict[int, Any]) -> str:
    r = v.result
    head = (f"{v.id}: true {v.true_class}, answered {r['label']} ({r['referral'] or 'no level'}), "
            f"B-scan {r['index_slice'] + 1} of {r['n_slices']} decided; {r['n_ungradable']} ungradable")
    cells = []
    for i, s in enumerate(volume.slices[:STRIP_SLICES]):
        worst = i == r["index_slice"]
        mark, caption = (' class="worst"', f"{i + 1} worst") if worst else ("", str(i + 1))
        cells.append(f'<figure{mark}>{_thumb(s.item, f"B-scan {i + 1}")}<figcaption>{caption}</figcaption></figure>')
    extra = r["n_slices"] - min(len(volume.slices), STRIP_SLICES)
    more = f'<p class="note">{extra} more B-scans not drawn.</p>' if extra > 0 else ""
    heat = "".join(f'<figure><img alt="Heat map, B-scan {i + 1}" '
                   f'src="{data_uri(jpeg_bytes(e.overlay), "image/jpeg")}"><figcaption>{i + 1}</figcaption></figure>'
                   for i, e in maps.items() if not isinstance(e, dict))
    return (f"<h3>{html.escape(head)}</h3><div class=\"strip\">{''.join(cells)}</div>{more}"
            + (f'<div class="strip">{heat}</div>' if heat else ""))


def _thumb(item: Any, alt: str) -> str:
    try:
        image = decode_image(item)
    except ImageDecodeError:
        return f"<span>{html.escape(alt)}: unreadable</span>"
    image.thumbnail((STRIP_SIDE * 2, STRIP_SIDE * 2))  # twice the drawn size: sharp on dense screens
    return f'<img alt="{html.escape(alt)}" src="{data_uri(jpeg_bytes(image), "image/jpeg")}">'
