"""Data-parallel training with msrun on CPU: 2 workers, each with its own shard of every step.

2 ranks × 1 micro-batch of 2 images and 1 process × 2 accumulated micro-batches of 2 images see the
same images and the same noise (it is drawn per global micro-batch index), so their weights must
agree; and the ranks' weights must be identical (one all-reduced gradient, one update). The
reference data has 3 batches per epoch, not a multiple of the 2 ranks: every other step takes its
two batches from two epochs, on two ranks or in two micro-batches alike.
"""
import shutil
import socket
import subprocess
import time

import numpy as np

from pixart.utils.checkpoint import read_state_dict
from test_train import ROOT, STEPS, reference_run, reference_setup, train_argv

# Runs train.main like train.py, then saves this rank's weights for the comparison.
WORKER = """
import os, sys
sys.path.insert(0, {root!r})
import numpy as np
import train
trainer = train.main(sys.argv[1:])
np.savez(os.path.join(trainer.config.output_path, f"rank{{trainer.rank}}.npz"),
         **{{name: p.asnumpy() for name, p in trainer.model.parameters_and_names()}})
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_match_single_process_and_each_other(tmp_path, tmp_path_factory):
    assert shutil.which("msrun"), "msrun (installed with mindspore) is not on PATH: pip install -r requirements.txt"
    _, ref_out = reference_run(tmp_path_factory)  # 1 process, 2 accumulated micro-batches per step
    pipe, data = reference_setup(tmp_path_factory)
    out = tmp_path / "dp"
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=ROOT))
    argv = train_argv(pipe, data, out, "--gradient_accumulation_steps", "1", "--use_parallel", "True")
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
               f"--log_dir={tmp_path / 'logs'}", str(worker), *argv]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    logs = {r: (tmp_path / "logs" / f"worker_{r}.log").read_text() for r in (0, 1)}
    assert result.returncode == 0, result.stdout[-3000:] + logs[0][-3000:] + logs[1][-3000:]

    # Every log line says which rank wrote it, MindSpore's own (DISTRIBUTED, at exit) too; both ranks
    # ran every step; rank 0 alone writes files.
    for r in (0, 1):
        deadline = time.time() + 10  # the tagging process may still be passing on the last lines
        while "DISTRIBUTED(" not in logs[r] and time.time() < deadline:
            time.sleep(0.2)
            logs[r] = (tmp_path / "logs" / f"worker_{r}.log").read_text()
        lines = [line for line in logs[r].splitlines() if line.strip()]
        untagged = [line for line in lines if not line.startswith(f"[rank {r}/2] ")]
        assert not untagged and any("DISTRIBUTED(" in line for line in lines), untagged[:5] or logs[r][-2000:]
    assert f"step {STEPS}/{STEPS}" in logs[0] and f"step {STEPS}/{STEPS}" in logs[1]
    assert "saved" not in logs[1] and "validation" not in logs[1]
    assert (out / "samples" / "step-000005" / "00.png").exists()

    rank0, rank1 = np.load(out / "rank0.npz"), np.load(out / "rank1.npz")
    reference = read_state_dict(str(ref_out / "final" / "model.ckpt"))
    assert sorted(rank0.files) == sorted(rank1.files) == sorted(k for k in reference if k in rank0.files)
    for name in rank0.files:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        np.testing.assert_allclose(rank0[name], reference[name], rtol=0, atol=1e-5, err_msg=name)
    ema = read_state_dict(str(out / "final" / "ema.ckpt"))
    ref_ema = read_state_dict(str(ref_out / "final" / "ema.ckpt"))
    for name in rank0.files:
        np.testing.assert_allclose(ema[name], ref_ema[name], rtol=0, atol=1e-5, err_msg=name)
