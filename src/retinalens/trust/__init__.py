"""The quality / out-of-distribution gate: "ungradable" with a reason instead of a class when an image
is not something the model can judge (too dark, overexposed, blurred, noisy, another modality, unlike
anything it was trained on); and `fit_trust`, which fits the gate, the calibration and the referral
operating point of a bundle on its validation split; `screen_files`, the gate's absolute floors applied
to training data before anything is fitted."""

from .gate import NO_GATE, Gate, summarize
from .fit import fit_trust
from .screen import screen_files

__all__ = ["NO_GATE", "Gate", "fit_trust", "screen_files", "summarize"]
