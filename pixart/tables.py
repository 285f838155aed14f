"""The project's lookup tables, each in one place: dtypes by name, text tokens by model version,
samplers and their step counts, base resolutions and the position-embedding interpolation that goes with them.

Plain Python (no MindSpore import), so command-line parsing stays fast.
"""
import numpy as np

DTYPE_NAMES = ("fp32", "fp16", "bf16")
# Text tokens T5 encodes (and the length of the learned null caption): Σ 300, α 120.
TEXT_TOKENS = {"sigma": 300, "alpha": 120}
VERSIONS = tuple(TEXT_TOKENS)
# Samplers by name, with their default step counts (pixart/samplers/ implements them).
DEFAULT_STEPS = {"dpm": 20, "sa-solver": 25, "ddim": 50, "iddpm": 100, "lcm": 4}
SAMPLER_NAMES = tuple(DEFAULT_STEPS)
# Base resolutions with aspect-ratio bins (pixart/data/aspect_ratios.py) and published models.
BASE_SIZES = (256, 512, 1024, 2048, 4096)
# Σ pe_interpolation by base resolution (the released configs); PixArt-α 256/512 use 1.0 (see the configs).
PE_INTERPOLATION = {256: 0.5, 512: 1.0, 1024: 2.0, 2048: 4.0, 4096: 8.0}


def ms_dtype(name):
    """'fp32' | 'fp16' | 'bf16' -> the MindSpore dtype."""
    import mindspore as ms

    return {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[name]


def np_dtype(name):
    """'fp32' | 'fp16' | 'bf16' -> the numpy dtype (bf16 from ml_dtypes)."""
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"fp32": np.float32, "fp16": np.float16}[name])
