"""Device set-up: on CPU, eager ops run on the calling thread (no spinning waiter taking a core)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process each: MindSpore's launch setting is process-wide and cannot be unset.
SET_UP = {
    "set_device": "from pixart.utils.device import set_device; set_device('CPU')",
    "pipeline": "from pixart import PixArtSigmaPipeline; ms.set_device('CPU'); "
                "PixArtSigmaPipeline(transformer=lambda: None, vae=lambda: None, tokenizer=lambda: None)",
}
CHECK = """
import mindspore as ms
from mindspore._c_expression import RuntimeConf
before = RuntimeConf.get_instance().is_launch_blocking()
{set_up}
print("BLOCKING", before, RuntimeConf.get_instance().is_launch_blocking())
"""


@pytest.mark.parametrize("set_up", sorted(SET_UP))
def test_cpu_eager_ops_launch_synchronously(set_up):
    done = subprocess.run([sys.executable, "-c", CHECK.format(set_up=SET_UP[set_up])], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("BLOCKING", 1)[1].split() == ["False", "True"]
