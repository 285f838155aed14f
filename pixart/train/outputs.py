"""A run's output folder: every check before anything is written, a lock, the log file.

train.py's order, so that a refused run leaves every byte of the folder as it was:

    check_output_folder(output_path, resume)     # read-only, before MindSpore loads: refuse early
    setup_logging(rank, world_size)              # stdout; rank 0 keeps the lines for train.log in memory
    trainer = Trainer(args, ...)                 # every other refusal (data, weights, resume settings)
    with claim_output_folder(args, rank, ...):   # rank 0: lock, train.log, clean-up, args.json
        trainer.train()

The lock ``<output>/train.lock`` holds the PID and host of the run that writes the folder; a second
run refuses the folder while that process is alive, and takes over the lock of a dead one (a run
killed by SIGKILL cannot remove it).
"""
import json
import logging
import logging.handlers
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

from pixart.train import checkpointing as ckpt
from pixart.utils.errors import CheckpointError, ConfigError

logger = logging.getLogger("train")

LOCK_NAME = "train.lock"
LOG_NAME = "train.log"
ARGS_NAME = "args.json"


# ----------------------------------------------------------------------------- the lock


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def lock_holder(output_path):
    """Who holds the folder: "PID 123 on host h" while that run lives, else None (no lock, or a
    dead run's). A lock written on another host cannot be checked and counts as held."""
    path = os.path.join(output_path, LOCK_NAME)
    try:
        with open(path) as f:
            owner = json.load(f)
        pid, host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return f"an unreadable lock {path}"
    if host == socket.gethostname() and not _pid_alive(pid):
        return None
    return f"PID {pid} on host {host}"


def _held_error(output_path, holder):
    return ConfigError(f"{output_path} is in use by another training run ({holder}, see "
                       f"{os.path.join(output_path, LOCK_NAME)}): wait for it, or choose another --output_path "
                       "(delete the lock file only if no run uses this folder)")


def acquire_lock(output_path):
    """Create ``<output>/train.lock`` for this process, or raise ConfigError if a live run holds it."""
    path = os.path.join(output_path, LOCK_NAME)
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(output_path)
            if holder is not None:
                raise _held_error(output_path, holder) from None
            os.remove(path)  # a dead run's: take over (a racing run's O_EXCL decides who gets it)
            logger.warning("removed the stale lock %s of a run that is no longer running", path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        return path
    raise _held_error(output_path, lock_holder(output_path) or "a run that started just now")


def release_lock(output_path):
    """Remove the lock if this process holds it."""
    path = os.path.join(output_path, LOCK_NAME)
    try:
        with open(path) as f:
            owner = json.load(f)
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            os.remove(path)
    except (OSError, ValueError):
        pass


# ----------------------------------------------------------------------------- checks and claim


def refuse_existing_run(output_path, resume):
    """ConfigError if ``output_path`` holds checkpoints and ``resume`` is not set."""
    latest = ckpt.latest_checkpoint(output_path)
    if latest and not resume:
        raise ConfigError(f"{output_path} already holds the checkpoints of a run ({latest}): pass --resume to "
                          "continue it, or choose another --output_path")


def check_output_folder(output_path, resume):
    """The checks that need only the file system, done before anything loads or is written: the
    folder is not held by a live run; it holds no checkpoints unless resuming; a --resume PATH
    exists. (The resume settings are checked by the Trainer, still before any write.)"""
    holder = lock_holder(output_path)
    if holder is not None:
        raise _held_error(output_path, holder)
    refuse_existing_run(output_path, resume)
    if resume and resume != "latest" and not os.path.isfile(resume):
        raise CheckpointError(f"--resume {resume}: no such checkpoint file (give --resume alone for the latest one "
                              f"in {output_path})")


@contextmanager
def claim_output_folder(args, rank, resumed_step=None):
    """Rank 0: lock the folder, then write train.log (with the lines logged so far), remove the
    temporaries of killed saves, set aside checkpoints newer than ``resumed_step`` (a run resumed
    from an older checkpoint rewrites that future) and write args.json. The lock is released on
    exit. Other ranks write nothing."""
    if rank != 0:
        yield
        return
    output_path = args.output_path
    os.makedirs(output_path, exist_ok=True)
    acquire_lock(output_path)
    try:
        attach_log_file(os.path.join(output_path, LOG_NAME))
        ckpt.remove_stale_temporaries(output_path)
        if resumed_step is not None:
            ckpt.set_aside_newer(output_path, resumed_step)
        with open(os.path.join(output_path, ARGS_NAME), "w") as f:
            json.dump(vars(args), f, indent=1)
        yield
    finally:
        release_lock(output_path)


# ----------------------------------------------------------------------------- logging


def setup_logging(rank, world_size):
    """Every line says which rank wrote it and goes to stdout; rank 0 keeps the lines in memory
    until ``attach_log_file`` (so a refused run writes no train.log)."""
    fmt = logging.Formatter(f"[rank {rank}/{world_size}] %(asctime)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if getattr(h, "pixart_train", False)]:  # a previous main() call's
        root.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.pixart_train = True
        root.addHandler(handler)


def attach_log_file(path):
    """Replace the in-memory handler by ``path`` (appended to), writing the kept lines first."""
    root = logging.getLogger()
    for memory in [h for h in root.handlers if getattr(h, "pixart_train", False) and
                   isinstance(h, logging.handlers.MemoryHandler)]:
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(memory.formatter)
        file_handler.pixart_train = True
        memory.setTarget(file_handler)
        memory.flush()
        root.removeHandler(memory)
        memory.close()
        root.addHandler(file_handler)


# Copies stdin to stdout, putting the prefix before every line that does not already carry one.
_TAGGER = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive a Ctrl-C long enough to pass on the last lines
prefix, out = sys.argv[1].encode(), sys.stdout.buffer
for line in sys.stdin.buffer:
    out.write(line if line.startswith(b"[rank ") else prefix + line)
    out.flush()
"""


def tag_process_output(rank, world_size):
    """Make every line this process writes to stdout and stderr start with ``[rank r/W]``, also
    MindSpore's own C++ log lines (``[INFO] DISTRIBUTED(...)``, written straight to the file
    descriptors, past Python's logging). Each descriptor is routed through a small tagging
    process, not a thread: C++ code writing while it holds the GIL cannot block it, and what was
    written before a crash or SIGKILL still comes out. Lines already tagged pass unchanged."""
    prefix = f"[rank {rank}/{world_size}] "
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        fd = stream.fileno()
        target = os.dup(fd)
        tagger = subprocess.Popen([sys.executable, "-S", "-c", _TAGGER, prefix], stdin=subprocess.PIPE,
                                  stdout=target, close_fds=True)
        os.dup2(tagger.stdin.fileno(), fd)
        tagger.stdin.close()  # ``fd`` is now the pipe's only write end here: closed at exit, the tagger ends
        os.close(target)
