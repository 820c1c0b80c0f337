"""The gate: ordered checks on image statistics and on the distance of the backbone's pooled features
to the training set, with thresholds fitted on validation and stored in the bundle.

First come the absolute floors (FLOORS): images that are never gradable whatever the training data
held (too small, a strip, one flat colour, structurally damaged, pure noise). No fitting moves them,
and a bundle fitted before a floor existed gets it when loaded. Then the fitted checks, whose
thresholds come from a robust spread of the validation statistics (median +- k MAD, never wider than
the validation extremes), so that a few broken files among the validation images cannot open the gate.

Feature check: the Mahalanobis distance to the training features' mean under a Ledoit-Wolf shrinkage
covariance (a full covariance of 1280 features from a few hundred images is singular; shrinkage makes
it invertible and stable). Its mean and precision matrix are `gate.safetensors` in the bundle, hashed
in the manifest like every weights file. Measured on the real OCT and fundus sets (README, Quality
gate): fundus photos lie several times further from OCT training features than any OCT scan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import RetinaLensError
from .statistics import all_statistics

if TYPE_CHECKING:
    from ..bundle.store import Bundle

GATE_FILE = "gate.safetensors"
GATE_VERSION = 2  # 2: absolute floors and robust fitting
# What a bundle without a gate (trained before it existed) answers for every image.
NO_GATE: dict[str, Any] = {"ok": True, "reason": None, "scores": {}}
MIN_VALIDATION = 5  # fewer validation images cannot place a threshold
QUANTILES = (0.005, 0.995)  # of validation statistics, widened by the margins below
DISTANCE_QUANTILE, DISTANCE_Z = 0.99, 2.576  # empirical 99th percentile, or 99.5th of a log-normal fit
MAX_TRAIN_ROWS = 20_000  # enough for a stable covariance; bounds fitting time on large sets
ROBUST_K = 5.0  # fitted bounds: median +- 5 robust standard deviations (1.4826 MAD), inside the quantiles

# (statistic, side, reason, bound from the validation quantiles (lo, hi)), checked in this order: the
# first failing check is the reason given. Margins are wide on purpose: these checks are for images no
# one could grade (the feature distance catches subtler strangers). Sharpness is a log10 variance:
# -0.6 is 4x less Laplacian variance than the blurriest validation image, +0.3 twice the noisiest's.
_RULES: tuple[tuple[str, str, str, Callable[[float, float], float]], ...] = (
    ("brightness", "below", "too_dark", lambda lo, hi: lo / 2),
    ("brightness", "above", "overexposed", lambda lo, hi: hi + (1 - hi) / 2),
    ("clipped", "above", "overexposed", lambda lo, hi: hi + (1 - hi) / 2),
    # Colour tells the modality (grey OCT, red/orange fundus), not the quality: a colour model rejects
    # only (nearly) grey images (dull fundus photos reach 0.04), a grey model any but a tint.
    ("saturation", "below", "wrong_modality", lambda lo, hi: min(lo / 2, 0.02)),  # grey OCT to a fundus model
    ("saturation", "above", "wrong_modality", lambda lo, hi: 0.1 + 1.5 * hi),  # a colour photo to an OCT model
    ("sharpness", "below", "blurred", lambda lo, hi: lo - 0.6),
    ("sharpness", "above", "noisy", lambda lo, hi: hi + 0.3),
)


@dataclass(frozen=True)
class Check:
    score: str
    side: str  # "below" | "above": the side that is rejected
    threshold: float
    reason: str

    def fails(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):  # NaN (no value) fails nothing
            return values < self.threshold if self.side == "below" else values > self.threshold


# The absolute floors, checked first and in this order (statistics: trust/statistics.py). The file's
# geometry comes before its pixels: a 1x1 PNG resized to the model input is also one flat colour, but
# "too_small" is what is wrong with it. Measured on the 992 real OCT scans of the shared data set and
# the demo sample (README, Quality gate): flat_band 0 and block_run <= 1 on every one, contrast >= 19
# grey levels, correlation >= 0.85; scans blurred (Gaussian radius 4-16) or dimmed to 5%: 0 and 0.
FLOORS: tuple[Check, ...] = (
    Check("aspect", "above", 8, "wrong_shape"),  # a strip, not a scan or a photograph
    Check("min_side", "below", 32, "too_small"),  # pixels, of the decoded file
    Check("contrast", "below", 0.5, "blank"),  # std of the grey image: one flat colour
    Check("block_run", "above", 4, "damaged"),  # 5+ identical flat 8x8 blocks in a row: corrupt JPEG data
    Check("flat_band", "above", 0.015, "damaged"),  # 4+ of 224 rows of one flat grey: a truncated tail
    Check("black_band", "above", 0.4, "damaged"),  # a black band of 40%: more than any letterbox
    Check("correlation", "below", 0.3, "noisy"),  # neighbouring pixels unrelated: pure noise
    # A JPEG block decoded from the wrong symbols (a flipped bit libjpeg resynchronised after): a
    # high-frequency DCT coefficient of 270 grey levels or more. The real scans reach 219 at most (992
    # of them; fundus photos 90, every fourth of 535), the corpus's label-changing bit flips 332 and 335. After "noisy": pure
    # noise has such coefficients too, and is better called noise.
    Check("block_peak", "above", 270, "damaged"),
    # A brightness shift from one block to the end of the image in block order (a flipped bit that
    # changed one DC difference; trust/block_order.py): 80% of its staircase's boundaries stepping by
    # 12 grey levels or more (the real scans reach 6 at most, 992 of them), or clipped-black blocks
    # after it (0.6 of the rest of the image; the real scans reach 0.18). Measured: README, Quality gate.
    Check("block_step", "above", 11, "damaged"),
    Check("black_tail", "above", 0.6, "damaged"),
)


def with_floors(checks: list[Check]) -> list[Check]:
    """The floors first, then `checks` less any floor they repeat (a bundle's manifest lists them too)."""
    floors = {(c.score, c.side) for c in FLOORS}
    return [*FLOORS, *(c for c in checks if (c.score, c.side) not in floors)]


@dataclass
class Gate:
    checks: list[Check]
    mean: np.ndarray | None = None  # (C,) float32: the training features' mean
    precision: np.ndarray | None = None  # (C, C) float32: inverse shrinkage covariance

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Gate | None:
        """The bundle's gate, or None for a bundle without one."""
        spec = bundle.manifest.gate
        if spec is None:
            return None
        try:
            checks = with_floors([Check(**c) for c in spec.checks])
            arrays: dict[str, np.ndarray] = {}
            if spec.features_file:
                from safetensors.numpy import load_file

                arrays = load_file(str(bundle.path / spec.features_file))
            return cls(checks, *(arrays[k].astype(np.float32) if k in arrays else None for k in ("mean", "precision")))
        except (KeyError, TypeError, OSError, ValueError) as exc:
            raise RetinaLensError(f"{bundle.path}: unreadable quality gate ({type(exc).__name__}: {exc})") from None

    def distance(self, pooled: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mahalanobis distance of pooled features (N, C) to the training features (float32: 4x faster than
        float64, and distances near a threshold of ~100 need nowhere near 7 digits)."""
        x = np.asarray(pooled, dtype=np.float32)
        if self.mean is None or self.precision is None:
            return np.full(len(x), np.nan)
        z = x - self.mean
        # torch's product runs on the call's own intra-op threads (models/machine.runtime_settings);
        # numpy's would wake OpenBLAS's pool, whose spinning threads then stall the backbone's on a
        # 2-core machine (a single-image gate check: 12 ms against 2.8 ms, measured under load).
        zp = (torch.from_numpy(z) @ torch.from_numpy(self.precision)).numpy()
        return np.sqrt(np.clip(np.einsum("ij,ij->i", zp, z, dtype=np.float64), 0, None))

    def verdicts(self, scores: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """One {"ok", "reason", "scores"} per row of `scores`."""
        n = len(next(iter(scores.values()))) if scores else 0
        reasons: list[str | None] = [None] * n
        for check in self.checks:
            if check.score in scores:
                for i in np.flatnonzero(check.fails(scores[check.score])):
                    reasons[i] = reasons[i] or check.reason
        return [{"ok": r is None, "reason": r,
                 "scores": {k: float(v[i]) for k, v in scores.items() if not np.isnan(v[i])}}
                for i, r in enumerate(reasons)]

    def check(self, pixels: torch.Tensor | np.ndarray, pooled: np.ndarray | torch.Tensor,
              source: torch.Tensor | np.ndarray | None = None,
              statistics: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
        """uint8 pixels (N, S, S, 3), their pooled features (N, C) and the full-resolution statistics
        of their files (N, 3: statistics.source_statistics; None: not measured, those floors pass)
        -> one verdict per image. `statistics`: all_statistics(pixels, source) when the caller has
        them already (prediction computes them while the network runs)."""
        stats = all_statistics(pixels, source) if statistics is None else statistics
        return self.verdicts(stats | {"distance": self.distance(pooled)})


def summarize(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """{"n_checked", "n_rejected", "rejection_rate", "reasons": {reason: count}} of some verdicts."""
    reasons: dict[str, int] = {}
    for v in verdicts:
        if not v["ok"]:
            reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
    return summary_of(len(verdicts), reasons)


def summary_of(n_checked: int, reasons: dict[str, int]) -> dict[str, Any]:
    """summarize's answer from counts (a stream of verdicts counted as it passes)."""
    rejected = sum(reasons.values())
    return {"n_checked": n_checked, "n_rejected": rejected, "rejection_rate": rejected / n_checked if n_checked else None,
            "reasons": dict(sorted(reasons.items()))}


def fit_gate(stats: dict[str, np.ndarray], train_pooled: np.ndarray,
             val_pooled: np.ndarray, seed: int = 0) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """The manifest's `gate` section and its file, from validation image statistics (one row per
    validation image; NaN: not read), training features (the distribution) and validation features
    (the distance threshold). None when there is too little data to place thresholds."""
    from safetensors.numpy import save

    read = ~np.isnan(stats["brightness"])
    if len(read) != len(val_pooled):
        raise ValueError(f"{len(read)} rows of statistics for {len(val_pooled)} validation images")
    if read.sum() < MIN_VALIDATION or len(val_pooled) < MIN_VALIDATION or len(train_pooled) < 2:
        return None
    checks = list(FLOORS)
    for name, side, reason, bound in _RULES:
        lo, hi = robust_range(stats[name][read])
        checks.append(Check(name, side, round(float(bound(lo, hi)), 6), reason))
    mean, precision, shrinkage = _fit_features(train_pooled, seed)
    # Thresholds come from what will be stored (float32), so validation sees exactly what prediction will.
    gate = Gate(checks, mean.astype(np.float32), precision.astype(np.float32))
    d_val = gate.distance(val_pooled)
    # Robust too: the log-normal fit from the median and MAD of log distances, the empirical quantile
    # from the validation images inside that fit's wide bounds (a broken file lies far outside).
    log_d = np.log(np.clip(d_val, 1e-12, None))
    centre, spread = _median_spread(log_d)
    inside = d_val[log_d <= centre + ROBUST_K * spread] if spread > 0 else d_val
    threshold = max(float(np.quantile(inside, DISTANCE_QUANTILE)), float(np.exp(centre + DISTANCE_Z * spread)))
    gate.checks.append(Check("distance", "above", round(threshold, 4), "out_of_distribution"))
    val_scores = {k: v[read] for k, v in (stats | {"distance": d_val}).items()}
    section = {
        "version": GATE_VERSION,
        "checks": [asdict(c) for c in gate.checks],
        "features": {"file": GATE_FILE, "kind": "mahalanobis", "covariance": "Ledoit-Wolf shrinkage",
                     "shrinkage": round(shrinkage, 6), "n_train": int(min(len(train_pooled), MAX_TRAIN_ROWS)),
                     "dim": int(mean.shape[0])},
        "fitted_on": {"statistics": f"validation median +- {ROBUST_K} x 1.4826 MAD within quantiles "
                                    f"{QUANTILES[0]}/{QUANTILES[1]}, with margins; absolute floors first",
                      "distance": f"max(validation {DISTANCE_QUANTILE:.0%} quantile of inliers, "
                                  f"log-normal z={DISTANCE_Z} from median and MAD)",
                      "n_validation": int(read.sum())},
        "validation": summarize(gate.verdicts(val_scores)),
    }
    files = {GATE_FILE: save({"mean": mean.astype(np.float32), "precision": precision.astype(np.float32)})}
    return section, files


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """(lo, hi) of validation statistics: the QUANTILES, narrowed to median +- ROBUST_K robust standard
    deviations. On clean data the quantiles are the narrower (thresholds as before); a few broken
    files among hundreds move a quantile to their own values, but not the median or the MAD."""
    q_lo, q_hi = (float(q) for q in np.quantile(values, QUANTILES))
    centre, spread = _median_spread(values)
    return max(q_lo, centre - ROBUST_K * spread), min(q_hi, centre + ROBUST_K * spread)


def _median_spread(values: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x the median absolute deviation) of `values`."""
    centre = float(np.median(values))
    return centre, 1.4826 * float(np.median(np.abs(values - centre)))


def _fit_features(train_pooled: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.covariance import LedoitWolf

    x = np.asarray(train_pooled, dtype=np.float64)
    if len(x) > MAX_TRAIN_ROWS:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), MAX_TRAIN_ROWS, replace=False))]
    lw = LedoitWolf(store_precision=False).fit(x)
    # Shrinkage keeps the covariance well conditioned, so a plain inverse is exact enough (and several
    # times faster than the pseudo-inverse by eigendecomposition that sklearn would use).
    return lw.location_, np.linalg.inv(lw.covariance_), float(lw.shrinkage_)
