"""No false refusal: every real scan at hand (the demo sample, and the shared Kermany train and test
splits when present: 992 scans) decodes through the strict damage checks and passes every absolute floor
of the quality gate (damaged, blank, noisy, too small, wrong shape). The damage checks exist to refuse
corrupt files; refusing a sound scan instead would lose a patient's result, so the bound is zero."""

from __future__ import annotations

from pathlib import Path

from retinalens.demo import DEMO_DATA
from retinalens.trust.gate import FLOORS, Gate
from retinalens.trust.statistics import file_statistics


def test_every_real_scan_decodes_and_passes_the_floors(small_bundle, oct_sample_root: Path) -> None:
    scans = sorted(DEMO_DATA.glob("*/*/*.jpeg"))
    if oct_sample_root != DEMO_DATA:
        scans += sorted(oct_sample_root.glob("*/*/*.jpeg"))
    stats, read = file_statistics(scans, small_bundle.preprocessing)
    unread = [str(p) for p, ok in zip(scans, read) if not ok]
    assert not unread, f"{len(unread)} of {len(scans)} real scans refused by the decoder, e.g. {unread[:3]}"
    verdicts = Gate(list(FLOORS)).verdicts(stats)
    refused = [(p.name, v["reason"]) for p, v in zip(scans, verdicts) if not v["ok"]]
    assert not refused, f"{len(refused)} of {len(scans)} real scans refused by the floors, e.g. {refused[:5]}"
    assert len(scans) >= 244
