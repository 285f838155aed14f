"""train.py under bad data and refused runs: no hang, no flood, nothing of an earlier run touched.

Reuses test_train's tiny setup and its reference run (6 images, 10 steps, checkpoints 9 and 10 kept).
"""
import json
import logging
import os
import shutil
import socket
import stat
import subprocess

import numpy as np
import pytest

import train
from pixart.train.config import parse_train_config
from pixart.utils.checkpoint import read_state_dict
from pixart.utils.errors import ConfigError, run_cli
from test_train import STEPS, assert_same_arrays, make_images, reference_run, reference_setup, run_train, train_argv


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


@pytest.fixture(autouse=True)
def drop_train_log_handlers():
    """train.main's log handlers point at this test's captured stdout: remove them afterwards."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "pixart_train", False)]:
        root.removeHandler(handler)
        handler.close()


def snapshot(folder):
    """{relative path: bytes} of every file, and None for every folder, under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def refuse(argv, message, capsys):
    """Run train.py's main as the command line does: exit 2 with one line holding ``message``."""
    with pytest.raises(SystemExit) as info:
        run_cli(train.main, argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    return err, captured.out


def copy_of_reference(reference, tmp_path):
    _, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    return out


# ----------------------------------------------------------------------------- bad data


def test_files_that_are_not_images_are_refused_before_the_model_loads(tmp_path, tmp_path_factory, capsys):
    pipe, _ = reference_setup(tmp_path_factory)
    data = make_images(tmp_path / "data", count=4)
    for i in range(4):  # random bytes named .png: they exist, so only a header read finds them
        (data / f"img{i}.png").write_bytes(np.random.default_rng(i).bytes(3000))
    out = tmp_path / "out"
    err, stdout = refuse(train_argv(pipe, data, out), "error: 4 of 4 records in", capsys)
    assert "#0: not a readable image: img0.png (UnidentifiedImageError" in err and "skip_bad_records" in err
    assert "model:" not in stdout  # found while validating the records, before the model loaded
    assert not out.exists()


def test_images_damaged_past_the_header_stop_after_one_epoch_without_flooding(tmp_path, tmp_path_factory):
    pipe, _ = reference_setup(tmp_path_factory)
    data = make_images(tmp_path / "data", count=6)
    for i in range(6):  # valid headers (validation passes), pixel data cut off: found only when decoded
        path = data / f"img{i}.png"
        path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "out"
    proc = run_train(*train_argv(pipe, data, out, "--visualize", "False"))
    log, _ = proc.communicate(timeout=300)  # before the fix: an endless loop of 'skipping record' lines
    lines = log.strip().splitlines()
    assert proc.returncode == 2, log[-3000:]
    assert lines[-1].startswith("error: none of the last 6 records (3 batches in a row, a whole epoch's worth) "
                                "could be read"), lines[-1]
    skips = [line for line in lines if line.startswith("[rank 0/1]") and "skipping record" in line]
    assert len(skips) == 5 and "cannot read image" in skips[0] and "OSError: image file is truncated" in skips[0]
    assert sum("not listed one by one" in line for line in lines) == 1
    assert len(log) < 20000
    assert not (out / "train.lock").exists() and not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------- refused runs


def test_refused_runs_leave_every_byte_of_the_folder_unchanged(reference, tmp_path, tmp_path_factory, capsys):
    pipe, data = reference_setup(tmp_path_factory)
    out = copy_of_reference(reference, tmp_path)
    # What a run still training here would have: its checkpoint being written. No refused run may delete it.
    (out / "checkpoints" / ".step-000011.ckpt.abc123.tmp.ckpt").write_bytes(b"being written")
    before = snapshot(out)
    assert {"args.json", "train.log", "checkpoints/step-000010.ckpt"} <= set(before)
    for extra, message in (((), "already holds the checkpoints of a run"),
                           (("--resume", "--seed", "7"), "seed 42 -> 7 changed since it was written"),
                           (("--resume", "--batch_size", "1"), "batch_size 2 -> 1 changed since it was written")):
        refuse(train_argv(pipe, data, out, *extra), message, capsys)
        assert snapshot(out) == before, extra  # args.json, train.log, the temporary: all as they were

    live = subprocess.Popen(["sleep", "120"])  # a live process holding the folder
    try:
        (out / "train.lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        before = snapshot(out)
        refuse(train_argv(pipe, data, out, "--resume"), f"in use by another training run (PID {live.pid} on host",
               capsys)
        assert snapshot(out) == before
    finally:
        live.kill()
        live.wait()


def test_truncated_latest_checkpoint_names_the_newest_readable_one(reference, tmp_path, tmp_path_factory, capsys):
    _, ref_out = reference
    pipe, data = reference_setup(tmp_path_factory)
    out = copy_of_reference(reference, tmp_path)
    shutil.rmtree(out / "final")
    latest, older = out / "checkpoints" / "step-000010.ckpt", out / "checkpoints" / "step-000009.ckpt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    before = snapshot(out)
    err, _ = refuse(train_argv(pipe, data, out, "--resume"), f"error: cannot resume: {latest}", capsys)
    assert err.endswith(f"; the newest readable checkpoint is {older} (step 9): continue from it with "
                        f"--resume {older}"), err
    assert snapshot(out) == before

    # The advice works: resumed from step 9 the run ends exactly as the uninterrupted one, and the
    # broken step 10 is set aside (a later plain --resume would otherwise pick it again).
    trainer = train.main(train_argv(pipe, data, out, "--resume", str(older)))
    assert trainer.step == STEPS
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000009.ckpt", "step-000010.ckpt",
                                                       "step-000010.ckpt.superseded"]
    for name in ("model.ckpt", "ema.ckpt"):
        assert_same_arrays(read_state_dict(str(ref_out / "final" / name)), read_state_dict(str(out / "final" / name)))
    assert not (out / "train.lock").exists()


# ----------------------------------------------------------------------------- durability and config


def test_checkpoint_is_fsynced_before_and_its_folder_after_the_rename(tmp_path, monkeypatch):
    from pixart.train import checkpointing

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.abspath(dst), os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = checkpointing.checkpoint_path(str(tmp_path), 5)
    checkpointing.save_training_checkpoint(path, {"w": np.ones(3, np.float32)}, 5, 0, {}, {}, {})
    inode, folder_inode = os.stat(path).st_ino, os.stat(os.path.dirname(path)).st_ino
    rename = events.index(("replace", os.path.abspath(path), inode))
    assert ("fsync", "file", inode) in events[:rename], events  # the data is on disk before the name points to it
    assert events[rename + 1:] == [("fsync", "folder", folder_inode)], events  # and the rename is on disk too
    tensors, meta = checkpointing.read_training_checkpoint(path)
    assert meta["step"] == 5 and np.array_equal(tensors["w"], np.ones(3))


def test_unknown_yaml_key_suggests_the_closest_option(tmp_path):
    config = tmp_path / "typo.yaml"
    for typo, meant in (("learning_rat", "start_learning_rate"), ("lerning_rate", "start_learning_rate"),
                        ("min_learning_rat", "min_learning_rate"), ("seeed", "seed")):
        config.write_text(f"{typo}: 1\n")
        with pytest.raises(ConfigError, match=rf"unknown key '{typo}' in .* \(did you mean {meant}\?\)$"):
            parse_train_config(["-c", str(config)])
