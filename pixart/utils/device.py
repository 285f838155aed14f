"""Choosing the MindSpore device for the entry points."""
from pixart.utils.errors import ConfigError

TARGETS = ("Ascend", "GPU", "CPU")


def launch_cpu_ops_synchronously():
    """On CPU, run each eager (PyNative) op on the calling thread: ``mindspore.runtime.launch_blocking``.

    By default PyNative queues ops for a backend thread, and the Python thread that waits for a
    result (``asnumpy``, a sampler's branch) spins on the queue meanwhile: on a 2-core CPU the
    spinner takes one of the two cores from every GEMM, so T5, the VAE and eager DiT steps ran at
    about half speed (``benchmarks/bench_eager.py``). Compiled graphs are unaffected. Devices keep
    their asynchronous launch, which overlaps Python with the device. Idempotent; process-wide.
    """
    import mindspore as ms

    if ms.get_context("device_target") == "CPU":
        ms.runtime.launch_blocking()


def set_device(target=None):
    """Use ``target`` (default: Ascend if present, else GPU, else CPU) in PYNATIVE mode.

    Entry points compile their own hot paths (the pipeline's denoiser, the train step), so the
    global mode stays eager for everything run once (T5, the VAE, loading); on CPU those eager
    ops run on the calling thread (``launch_cpu_ops_synchronously``).
    """
    import mindspore as ms

    if target is None:
        target = next(t for t in TARGETS if t == "CPU" or ms.hal.is_available(t))
    elif target != "CPU" and not ms.hal.is_available(target):
        raise ConfigError(f"--device_target {target} is not available on this machine")
    try:
        ms.set_device(target)
    except RuntimeError:  # the runtime already ran kernels in this process (an entry point called from Python)
        current = ms.get_context("device_target")
        if current != target:
            raise ConfigError(f"--device_target {target}: this process already runs on {current}") from None
    ms.set_context(mode=ms.PYNATIVE_MODE)
    launch_cpu_ops_synchronously()
    return target
