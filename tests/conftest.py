"""Shared test setup: CPU MindSpore, deterministic seeds, repository root on sys.path."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mindspore as ms  # noqa: E402

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


@pytest.fixture(autouse=True)
def _seed_and_mode():
    np.random.seed(0)
    ms.set_seed(0)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
