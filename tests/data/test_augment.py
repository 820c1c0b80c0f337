"""Augmentation and the balancing plan: deterministic, shape-preserving, balanced."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from retinalens.data.augment import AUGMENTATIONS, VARIANTS, apply_variant, epoch_plan, get_augmentation, sample_rng
from retinalens.errors import RetinaLensError


def _img(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_keeps_shape_and_dtype_and_is_a_function_of_its_generator(name):
    aug = get_augmentation(name)
    img = _img()
    a, b = aug(img, sample_rng(0, 1, 5)), aug(img, sample_rng(0, 1, 5))
    assert a.shape == img.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    if name != "none":  # another position in the epoch draws other parameters
        assert any(not torch.equal(a, aug(img, sample_rng(0, 1, p))) for p in range(6, 12))
    else:
        assert torch.equal(a, img)


def test_unknown_augmentation_is_a_clear_error():
    with pytest.raises(RetinaLensError, match="unknown augmentation"):
        get_augmentation("rainbow")


def test_variants_rotate_and_mirror_exactly():
    img = _img(1)
    assert torch.equal(apply_variant(img, 0), img)
    r90 = VARIANTS.index((90, False))
    assert torch.equal(apply_variant(img, r90), torch.rot90(img, 1, dims=(0, 1)))
    mirrored = VARIANTS.index((0, True))
    assert torch.equal(apply_variant(img, mirrored), img.flip(1))
    outs = [apply_variant(img, v) for v in range(len(VARIANTS))]
    assert len({o.numpy().tobytes() for o in outs}) == len(VARIANTS)  # ten distinct copies


def test_plan_without_oversampling_is_a_permutation():
    y = [0] * 7 + [1] * 3
    plan = epoch_plan(y, 2, seed=0, epoch=1)
    assert sorted(i for i, _ in plan) == list(range(10)) and {v for _, v in plan} == {0}


def test_oversampling_balances_classes_with_distinct_copies():
    y = [0] * 40 + [1] * 8 + [2] * 3
    plan = epoch_plan(y, 3, seed=0, epoch=1, oversample=True)
    per_class = Counter(y[i] for i, _ in plan)
    assert per_class[0] == 40 and per_class[1] == 40
    assert per_class[2] == 30  # 3 photos x 10 variants: no copy is shown twice the same way
    assert len(set(plan)) == len(plan)
    assert all(Counter(i for i, _ in plan if y[i] == 1).values())  # every minority photo is used
    assert {v for i, v in plan if y[i] == 0} == {0}  # the largest class is shown as it is


def test_plan_depends_on_seed_and_epoch_only():
    y = list(np.random.default_rng(0).integers(0, 3, 50))
    assert epoch_plan(y, 3, seed=4, epoch=2, oversample=True) == epoch_plan(y, 3, seed=4, epoch=2, oversample=True)
    assert epoch_plan(y, 3, seed=4, epoch=2) != epoch_plan(y, 3, seed=4, epoch=3)
