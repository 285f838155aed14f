"""Shared test setup: CPU MindSpore, deterministic seeds (pytest.ini puts the repository root on sys.path)."""
import os
import tempfile

import numpy as np
import pytest

import mindspore as ms

from pixart.utils.device import launch_cpu_ops_synchronously

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
launch_cpu_ops_synchronously()  # as the entry points and pipelines run on CPU
# Graph-mode runs of sample.py / demo.py keep compiled graphs in a folder of this session, not the user's.
os.environ.setdefault("PIXART_COMPILE_CACHE", tempfile.mkdtemp(prefix="pixart-compile-"))


@pytest.fixture(autouse=True)
def _seed_and_mode():
    np.random.seed(0)
    ms.set_seed(0)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
