"""The backbone's input size: who gets which by default, and bad sizes refused in one line (exit 2)."""

from __future__ import annotations

import pytest

from helpers import assert_clean_error, run_cli
from retinalens.config import MAX_INPUT_SIZE, MIN_INPUT_SIZE
from retinalens.train.pipeline import build_run_config, run_config_from_dict


def test_the_default_is_the_backbones_own_size_for_oct_and_fundus():
    assert build_run_config("d").extract.input_size is None  # OCT: the backbone's own (Lite0 224)
    assert build_run_config("d", task="referable").extract.input_size is None  # 384 did not win on CV
    assert build_run_config("d", task="referable", input_size=320).extract.input_size == 320
    # A bundle from before the option reads back with its backbone's own size.
    assert run_config_from_dict({"data": "d", "task": "referable", "extract": {}}).extract.input_size is None


@pytest.mark.parametrize("size", [MIN_INPUT_SIZE - 1, MAX_INPUT_SIZE + 1])
def test_a_size_out_of_range_is_one_clear_error(size, tmp_path, small_dataset):
    r = run_cli("train", small_dataset, "--out", tmp_path / "b", f"--input-size={size}", "-q")
    assert_clean_error(r, "--input-size", str(size), f"{MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}")
    assert not (tmp_path / "b").exists()
