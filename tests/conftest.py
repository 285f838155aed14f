"""Shared test setup: CPU MindSpore, deterministic seeds (pytest.ini puts the repository root on sys.path)."""

import numpy as np
import pytest

import mindspore as ms

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


@pytest.fixture(autouse=True)
def _seed_and_mode():
    np.random.seed(0)
    ms.set_seed(0)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
