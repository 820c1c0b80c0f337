"""Session fixtures for the pipeline-level tests (train, evaluate, predict, cli)."""

from __future__ import annotations

import pytest

from helpers import small_oct_dataset, train_small_bundle


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    return small_oct_dataset(tmp_path_factory.mktemp("oct"))


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory, small_dataset, feature_cache):
    return train_small_bundle(small_dataset, tmp_path_factory.mktemp("bundle") / "model", feature_cache)
