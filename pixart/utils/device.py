"""Choosing the MindSpore device for the entry points."""
from pixart.utils.errors import ConfigError

TARGETS = ("Ascend", "GPU", "CPU")


def set_device(target=None):
    """Use ``target`` (default: Ascend if present, else GPU, else CPU) in PYNATIVE mode.

    Entry points compile their own hot paths (the pipeline's denoiser, the train step), so the
    global mode stays eager for everything run once (T5, the VAE, loading).
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
    return target
