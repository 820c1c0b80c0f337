"""On-the-fly augmentation and class balancing for training on images.

Every random choice is drawn from a generator seeded by (seed, epoch, position in the epoch), never
from global state: an epoch's pixels are the same in threads or worker processes, in any order, and a
run resumed from a checkpoint sees exactly the images the uninterrupted run saw.

Balancing follows the original fundus work: minority classes are shown again rotated by 90, 120, 180
or 270 degrees and mirrored, until each class is as frequent as the largest (at most 10 distinct
copies of a photo). It is a sampling plan over the images on disk, not 100k new files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..errors import RetinaLensError

# (rotation in degrees, mirrored): variant 0 is the photo as it is.
VARIANTS: tuple[tuple[int, bool], ...] = tuple((r, m) for r in (0, 90, 120, 180, 270) for m in (False, True))
BALANCE = ("none", "oversample", "weights")


@dataclass(frozen=True)
class Augmentation:
    """Random transforms suited to a modality. Ranges are +/- around the identity."""

    hflip: float = 0.0  # probability
    vflip: float = 0.0
    rotate: float = 0.0  # degrees
    translate: float = 0.0  # fraction of the size
    scale: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    crop_width: float = 0.0  # up to this share of the width cut away (a window along the scan), resized back
    speckle: float = 0.0  # sd of multiplicative per-pixel noise (OCT speckle), the same on every channel

    def __call__(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """uint8 (S, S, 3) -> uint8 (S, S, 3)."""
        x = img.permute(2, 0, 1)
        if rng.random() < self.hflip:
            x = F.horizontal_flip(x)
        if rng.random() < self.vflip:
            x = F.vertical_flip(x)
        if self.rotate or self.translate or self.scale:
            size = x.shape[-1]
            x = F.affine(x, angle=float(rng.uniform(-self.rotate, self.rotate)),
                         translate=[int(round(rng.uniform(-self.translate, self.translate) * size)) for _ in range(2)],
                         scale=float(rng.uniform(1 - self.scale, 1 + self.scale)), shear=[0.0, 0.0],
                         interpolation=InterpolationMode.BILINEAR)
        for amount, adjust in ((self.brightness, F.adjust_brightness), (self.contrast, F.adjust_contrast),
                               (self.saturation, F.adjust_saturation)):
            if amount:
                x = adjust(x, float(rng.uniform(1 - amount, 1 + amount)))
        if self.hue:
            x = F.adjust_hue(x, float(rng.uniform(-self.hue, self.hue)))
        # Drawn last and only when asked: the other augmentations' draws, and so their pixels, stay as they were.
        if self.crop_width:
            size = x.shape[-1]
            width = int(round(size * rng.uniform(1 - self.crop_width, 1)))
            left = int(rng.integers(0, size - width + 1))
            x = F.resize(x[:, :, left:left + width], [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.speckle:
            noise = torch.from_numpy(1 + self.speckle * rng.standard_normal(x.shape[-2:], dtype=np.float32))
            x = (x.float() * noise).round().clamp(0, 255).to(torch.uint8)
        return x.permute(1, 2, 0).contiguous()


AUGMENTATIONS = {
    # B-scans have a top and a bottom (vitreous above, choroid below) but no left or right, and their
    # brightness and contrast vary with the device: small shifts and tilts, horizontal flips only.
    "oct": Augmentation(hflip=0.5, rotate=5, translate=0.05, scale=0.05, brightness=0.2, contrast=0.2),
    # The same, plus what varies between OCT acquisitions: the scan's lateral extent (a window of 70-100%
    # of its width) and its speckle (multiplicative noise, sd 0.1). The adamw-ema recipe's (not adamw-ema-cpu's: README).
    "oct-scan": Augmentation(hflip=0.5, rotate=5, translate=0.05, scale=0.05, brightness=0.2, contrast=0.2,
                             crop_width=0.3, speckle=0.1),
    # A fundus photo has no up: any rotation, both flips, and the colour casts of different cameras.
    "fundus": Augmentation(hflip=0.5, vflip=0.5, rotate=180, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
    "none": Augmentation(),
}


def get_augmentation(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise RetinaLensError(f"unknown augmentation '{name}': use one of auto, {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]


def apply_variant(img: torch.Tensor, variant: int) -> torch.Tensor:
    """One of the balancing copies: uint8 (S, S, 3) rotated and/or mirrored."""
    angle, mirror = VARIANTS[variant]
    if not angle and not mirror:
        return img
    x = img.permute(2, 0, 1)
    if mirror:
        x = F.horizontal_flip(x)
    if angle % 90 == 0:
        x = torch.rot90(x, angle // 90, dims=(1, 2))  # exact, no interpolation
    else:
        x = F.rotate(x, float(angle), interpolation=InterpolationMode.BILINEAR)
    return x.permute(1, 2, 0).contiguous()


def epoch_plan(labels: Sequence[int], num_classes: int, *, seed: int, epoch: int,
               oversample: bool = False) -> list[tuple[int, int]]:
    """The epoch's (sample index, variant) pairs, shuffled. With `oversample`, each class is filled up
    to the largest class's count with rotated / mirrored copies (at most len(VARIANTS) per photo)."""
    y = np.asarray(labels)
    rng = np.random.default_rng([seed, epoch, 1])
    plan: list[tuple[int, int]] = []
    target = int(np.bincount(y, minlength=num_classes).max()) if len(y) else 0
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        if not len(members):
            continue
        n = min(target, len(members) * len(VARIANTS)) if oversample else len(members)
        # Copy k of a photo gets variant k: every photo is shown as it is first, then once per variant.
        order = rng.permutation(members)
        plan += [(int(order[j % len(members)]), j // len(members)) for j in range(n)]
    return [plan[i] for i in rng.permutation(len(plan))]


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator for one image of one epoch (independent of which thread or process loads it)."""
    return np.random.default_rng([seed, epoch, 2, position])
