"""One answer per OCT volume: every B-scan classified (batched, with the quality gate), then combined.

The rule (VolumeConfig's min_positive_slices k, min_gradable_fraction f, n_suspicious m):

- Gradable slices are those the quality gate passed. A volume with no gradable slice, or fewer than
  f of its slices gradable (unreadable ones count as not gradable), is ungradable: like an ungradable
  image it keeps its probabilities but gets no label, referral level or decision.
- Slices are ranked by their calibrated referral probability P(positive classes). The volume's answer
  is that of its k-th most suspicious gradable slice (k = 1: the worst one): its probabilities, label,
  referral level, P(referral) and decision. So the volume refers exactly when at least k gradable
  slices pass the bundle's referral threshold (all of them, when fewer than k are gradable).
- Why not the mean: a CNV lesion shows on a few B-scans of a 49-scan volume; averaging over the
  slices would dilute it below any threshold and send an urgent eye home. The price is that one false
  positive slice refers a volume (k > 1 trades that back); `mean_probabilities` is reported beside
  the answer, for information only.
- The m most suspicious gradable slices (by the same ranking) are listed by index, for heat maps.

A bundle without positive classes ranks slices by their top class probability instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import VolumeConfig
from ..data.patients import PatientParser
from ..data.volumes import Slice, Volume, group_slices, multi_frame_volume
from ..errors import RetinaLensError
from .inputs import expand_inputs

if TYPE_CHECKING:
    from .model import Model

RULE = ("the answer of the k-th most suspicious gradable B-scan (ranked by P(referral)), k = {k}: the volume "
        "refers when at least {k} gradable B-scan(s) pass the referral threshold; ungradable when fewer than "
        "{f:.0%} of its B-scans are gradable")


def volume_inputs(sources: Sequence[str | Path | bytes], group_by: str, parser: PatientParser | None = None,
                  ) -> tuple[list[Volume], list[dict[str, Any]]]:
    """Files, folders, URLs -> (volumes, failures): each multi-frame file a volume of its own, the other
    images grouped by `group_by` (patient | folder). Inputs that cannot be read are {input, error}."""
    volumes: list[Volume] = []
    singles: list[Slice] = []
    failures: list[dict[str, Any]] = []
    for inp in expand_inputs(list(sources)):
        if inp.error:
            failures.append({"input": inp.name, "error": inp.error})
            continue
        try:
            volume = multi_frame_volume(inp.item) if isinstance(inp.item, Path) else None
        except RetinaLensError as exc:
            failures.append({"input": inp.name, "error": str(exc)})
            continue
        if volume is not None:
            volumes.append(volume)
        else:
            singles.append(Slice(inp.name, inp.item))
    return volumes + group_slices(singles, group_by, parser), failures


def predict_volumes(model: Model, volumes: Sequence[Volume], rule: VolumeConfig = VolumeConfig(), *,
                    batch_size: int = 16, workers: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """Each volume's result (see `aggregate`): the slices of all volumes go through the model in shared
    batches, `Model.predict_many`'s path and gate."""
    flat = [s for v in volumes for s in v.slices]
    results = model.predict_many([s.item for s in flat], batch_size=batch_size, workers=workers, progress=progress)
    if len(results) != len(flat):  # every slice is one file or one buffer: one result each
        raise RuntimeError(f"{len(flat)} slices gave {len(results)} results")
    out, start = [], 0
    for v in volumes:
        mine = [r | {"input": s.name} for r, s in zip(results[start:start + len(v.slices)], v.slices)]
        start += len(v.slices)
        out.append(aggregate(v.id, v.grouping, mine, rule))
    return out


def slice_score(result: dict[str, Any]) -> float:
    """How suspicious a slice is: its P(referral), or its top probability for a bundle without positives."""
    if result.get("p_referral") is not None:
        return float(result["p_referral"])
    return max(result["probabilities"].values())


def aggregate(volume_id: str, grouping: str, slices: Sequence[dict[str, Any]], rule: VolumeConfig = VolumeConfig(),
              ) -> dict[str, Any]:
    """Slice results (Model.predict_many's, in slice order) -> the volume's result by the module's rule:
    {volume, grouping, n_slices, n_gradable, n_ungradable, n_unreadable, gate, label, probabilities,
    mean_probabilities, referral, p_referral, refer, index_slice, suspicious, rule, slices}."""
    if rule.min_positive_slices < 1 or not 0 <= rule.min_gradable_fraction <= 1 or rule.n_suspicious < 0:
        raise RetinaLensError(f"invalid volume rule {rule}")
    readable = [i for i, r in enumerate(slices) if "error" not in r]
    gradable = [i for i in readable if is_gradable(slices[i])]
    n = len(slices)
    base: dict[str, Any] = {"volume": volume_id, "grouping": grouping, "n_slices": n, "n_gradable": len(gradable),
                            "n_ungradable": len(readable) - len(gradable), "n_unreadable": n - len(readable),
                            "rule": RULE.format(k=rule.min_positive_slices, f=rule.min_gradable_fraction)}
    empty = {"label": None, "probabilities": {}, "mean_probabilities": {}, "referral": None, "p_referral": None,
             "refer": None, "index_slice": None, "suspicious": []}
    if not readable:
        return base | empty | {"gate": {"ok": False, "reason": "no readable B-scan"}, "slices": list(slices)}
    ok = bool(gradable) and len(gradable) >= rule.min_gradable_fraction * n
    pool = gradable if gradable else readable  # an ungradable volume still shows what its slices suggest
    ranked = sorted(pool, key=lambda i: (-slice_score(slices[i]), i))
    index = ranked[min(rule.min_positive_slices, len(ranked)) - 1]
    chosen = slices[index]
    classes = list(chosen["probabilities"])
    mean = np.mean([[slices[i]["probabilities"][c] for c in classes] for i in pool], axis=0)
    reason = None if ok else (f"{len(gradable)} of {n} B-scans gradable (at least {rule.min_gradable_fraction:.0%} "
                              "needed)")
    return base | {
        "gate": {"ok": ok, "reason": reason},
        "label": chosen["label"] if ok else None,
        "probabilities": dict(chosen["probabilities"]),
        "mean_probabilities": {c: float(p) for c, p in zip(classes, mean)},
        "referral": chosen["referral"] if ok else None,
        "p_referral": chosen.get("p_referral"),
        "refer": chosen.get("refer") if ok else None,
        "index_slice": index,
        "suspicious": ranked[:rule.n_suspicious] if ok else [],
        "slices": list(slices),
    }


def is_gradable(result: dict[str, Any]) -> bool:
    return bool(result.get("gate", {"ok": True})["ok"])
