"""Heat maps of a volume's most suspicious B-scans: the explainer's one path (explain_many), on the
slices predict/volume.py ranked highest, each for the class of the volume's answer."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..data.volumes import Volume
from .explainer import BaseExplainer, Explanation


def suspicious_heatmaps(explainer: BaseExplainer, volume: Volume, result: dict[str, Any], *,
                        max_side: int | None = None) -> dict[int, Explanation | dict[str, Any]]:
    """{slice index: Explanation (or {input, error})} for `result["suspicious"]` (predict_volumes' result
    for `volume`); empty for an ungradable volume, which has no answer to explain."""
    picked = list(result["suspicious"])
    if not picked or result["label"] is None:
        return {}
    made = explainer.explain_many([volume.slices[i].item for i in picked], result["label"], max_side=max_side)
    # Named as the volume names its slices ("scan.tif#frame 3"), not as the bytes they were read from.
    return {i: replace(m, input=volume.slices[i].name) if isinstance(m, Explanation)
            else m | {"input": volume.slices[i].name} for i, m in zip(picked, made)}
