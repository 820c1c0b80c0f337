"""The backbone's input size: who gets which by default, and bad sizes refused in one line (exit 2)."""

from __future__ import annotations

import pytest

from helpers import assert_clean_error, run_cli
from retinalens.config import FUNDUS_INPUT_SIZE, MAX_INPUT_SIZE, MIN_INPUT_SIZE
from retinalens.train.pipeline import build_run_config, run_config_from_dict


def test_fundus_tasks_default_to_the_fundus_size_and_oct_keeps_the_backbones_own():
    assert build_run_config("d", task="referable").extract.input_size == FUNDUS_INPUT_SIZE
    assert build_run_config("d", task="grade").extract.input_size == FUNDUS_INPUT_SIZE
    assert build_run_config("d").extract.input_size is None  # OCT: the backbone's own (Lite0 224)
    assert build_run_config("d", task="referable", mode="frozen").extract.input_size is None  # not measured there
    assert build_run_config("d", task="referable", input_size=260).extract.input_size == 260
    assert build_run_config("d", input_size=320).extract.input_size == 320
    # A bundle from before the option kept its backbone's own size: its config reads back as None, not 384.
    assert run_config_from_dict({"data": "d", "task": "referable", "extract": {}}).extract.input_size is None


@pytest.mark.parametrize("size", [MIN_INPUT_SIZE - 1, MAX_INPUT_SIZE + 1])
def test_a_size_out_of_range_is_one_clear_error(size, tmp_path, small_dataset):
    r = run_cli("train", small_dataset, "--out", tmp_path / "b", f"--input-size={size}", "-q")
    assert_clean_error(r, "--input-size", str(size), f"{MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}")
    assert not (tmp_path / "b").exists()
