"""Training checkpoints: one atomic .ckpt per save, the last K kept, exact resume.

A checkpoint ``<output>/checkpoints/step-000500.ckpt`` holds, by name:

    <param name>              model weights that are trained (all of them for full fine-tuning;
                              the adapters for LoRA), plus always the null caption
                              ``y_embedder.y_embedding`` (class dropout trains it)
    ema.<param name>          EMA of the trained weights
    optimizer.<name>          every optimizer Parameter (moments, global_step, ...)
    train.loss_scale, train.good_steps
    step, epoch               optimizer steps done; the data epoch in progress
    data_state                JSON of ``BucketBatchSampler.state_dict()`` (the data position)
    pixart_config             JSON of the architecture (as ``save_pixart_ckpt`` writes it)
    run_config                JSON of the options that must not change across a resume

No RNG state is stored: every random number is a function of (seed, step, micro-batch).
Files are written by ``pixart.utils.checkpoint.save_ckpt`` (temporary file + rename), so a run
killed mid-save leaves the previous checkpoints intact and at most a hidden ``.step-*.tmp`` file,
which the next run removes (once it holds the folder's lock: never a live run's). The file and its
folder are fsynced around the rename, so a power loss cannot leave a renamed but empty checkpoint.
"""
import glob
import json
import logging
import os
import re

import numpy as np

from pixart.utils.checkpoint import read_state_dict, save_ckpt
from pixart.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.ckpt$")
FORMAT_VERSION = 1


def checkpoint_path(output_dir, step):
    return os.path.join(output_dir, CHECKPOINT_DIR, f"step-{step:06d}.ckpt")


def list_checkpoints(output_dir):
    """[(step, path)] of the complete checkpoints in ``output_dir``, oldest first."""
    folder = os.path.join(output_dir, CHECKPOINT_DIR)
    found = []
    for path in glob.glob(os.path.join(folder, "step-*.ckpt")):
        match = _NAME.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir):
    """Path of the newest checkpoint in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_stale_temporaries(output_dir):
    """Delete temporary files a killed save left behind (``.step-*.ckpt.*.tmp.ckpt``)."""
    for path in glob.glob(os.path.join(output_dir, CHECKPOINT_DIR, ".step-*.tmp*")):
        os.remove(path)
        logger.info("removed the unfinished checkpoint %s", path)


def set_aside_newer(output_dir, step):
    """Rename checkpoints newer than ``step`` to ``*.ckpt.superseded``: a run resumed from an older
    checkpoint rewrites those steps, and meanwhile they must neither be picked by a later
    ``--resume`` nor make ``keep_last`` delete the checkpoints this run writes."""
    moved = []
    for found_step, path in list_checkpoints(output_dir):
        if found_step > step:
            os.replace(path, path + ".superseded")
            moved.append(path + ".superseded")
            logger.warning("resumed from step %d: set aside the newer checkpoint %s as %s", step, path, moved[-1])
    return moved


def unreadable_hint(path):
    """For a checkpoint that does not read: the newest older checkpoint beside it that does, and
    how to continue from it (an empty string for a file outside a checkpoints folder)."""
    match = _NAME.match(os.path.basename(path))
    if not match:
        return ""
    output_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    for step, older in reversed(list_checkpoints(output_dir)):
        if step < int(match.group(1)):
            try:
                read_training_checkpoint(older)
            except CheckpointError:
                continue
            return f"; the newest readable checkpoint is {older} (step {step}): continue from it with --resume {older}"
    return "; no older checkpoint beside it is readable"


def keep_last(output_dir, keep):
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return []
    removed = [path for _, path in list_checkpoints(output_dir)[:-keep]]
    for path in removed:
        os.remove(path)
    return removed


def save_training_checkpoint(path, tensors, step, epoch, data_state, pixart_config, run_config):
    """Write one checkpoint atomically. ``tensors``: {name: Parameter/Tensor/array}."""
    extra = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "data_state": json.dumps(data_state),
        "pixart_config": json.dumps(pixart_config),
        "run_config": json.dumps(run_config, sort_keys=True),
    }
    save_ckpt(tensors, path, extra=extra)


def read_training_checkpoint(path):
    """-> (tensors {name: numpy array}, meta {step, epoch, data_state, pixart_config, run_config})."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    raw = read_state_dict(path)
    meta = {}
    for key in ("format_version", "step", "epoch", "data_state", "pixart_config", "run_config"):
        if key not in raw:
            raise CheckpointError(f"{path} is not a training checkpoint of this trainer ({key!r} is missing)")
        meta[key] = _scalar(raw.pop(key))
    for key in ("data_state", "pixart_config", "run_config"):
        meta[key] = json.loads(meta[key])
    meta["step"], meta["epoch"] = int(meta["step"]), int(meta["epoch"])
    return raw, meta


def _scalar(value):
    """A checkpoint's extra entry as a python value (.ckpt stores them as 0-d arrays or str)."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 or value.size == 1 else value
    return value
