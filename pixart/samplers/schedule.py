"""Shared pieces of every sampler: the discrete β schedule, timestep spacing and a small base class.

All schedule arithmetic is done once, in float64 numpy, when a sampler is built or `set_timesteps` is
called. The per-step work on latents (in the subclasses' `step`) is MindSpore Tensor ops with python-float
coefficients, so nothing is copied between host and tensors inside the sampling loop.
"""
from abc import ABC, abstractmethod
from typing import Optional, Union

import mindspore as ms
import numpy as np
from mindspore import ops


def make_beta_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
) -> np.ndarray:
    """The training noise schedule β_t, t = 0 … T-1, as a (T,) float64 array.

    "linear" (PixArt, DiT, diffusers default) spaces β evenly from beta_start to beta_end;
    "scaled_linear" spaces √β evenly (Stable Diffusion).
    """
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected 'linear' or 'scaled_linear'")


def solver_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "linspace",
                     steps_offset: int = 0) -> np.ndarray:
    """Timesteps visited by the multistep solvers (DPM-Solver++, SA-Solver), high to low.

    Same rule as diffusers' DPMSolverMultistepScheduler / SASolverScheduler: "linspace" takes n+1 evenly
    spaced points on [0, T-1], rounds them and drops t=0 (the solver's last step lands on t=0 itself).
    Returns (n,) int64.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / n).round() - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}")
    return np.ascontiguousarray(t).astype(np.int64)


class PerImageNoise:
    """A noise source for a batch whose row k comes from its own stream ``default_rng([seeds[k], stream])``.

    Passed as a sampler's ``generator``, it makes every stochastic step of image k independent of
    the other images in the batch, so an image depends only on its seed, not on the batch size.
    """

    def __init__(self, seeds, stream=1):
        self.rngs = [np.random.default_rng([int(s), stream]) for s in seeds]

    def standard_normal(self, shape, dtype=np.float32):
        """(N, ...) noise, N = the number of seeds."""
        if shape[0] != len(self.rngs):
            raise ValueError(f"noise for {shape[0]} images from {len(self.rngs)} per-image streams")
        return np.stack([rng.standard_normal(tuple(shape[1:]), dtype=dtype) for rng in self.rngs])


class Sampler(ABC):
    """Base class: holds the training schedule, the timesteps and a numpy noise generator.

    Interface shared by all samplers (diffusers-like, so the pipeline can swap them):
        set_timesteps(num_inference_steps) or set_timesteps(timesteps=[t0, t1, ...])
        timesteps            (n,) int64 numpy array, in the order they are visited
        add_noise(x0, noise, t)   x0 noised to timestep t on the training schedule (img2img)
        init_noise_sigma     float, std of the initial latent noise
        step(model_output, timestep, sample, noise=None) -> prev_sample
    `model_output` is (N, C, H, W) ε or (N, 2C, H, W) [ε, learned-variance]; `sample` is (N, C, H, W).
    """

    name = "base"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        seed: Optional[int] = None,
        generator: Optional[np.random.Generator] = None,
    ):
        self.num_train_timesteps = num_train_timesteps
        self.betas = make_beta_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.generator = generator if generator is not None else np.random.default_rng(seed)

    def manual_seed(self, seed: Union[int, np.random.Generator, None]):
        """Re-seed the noise generator (an int) or replace it (a numpy Generator)."""
        self.generator = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return self

    def scale_model_input(self, sample, timestep=None):
        """No input scaling is needed on the discrete VP schedule (kept for diffusers-style loops)."""
        return sample

    @abstractmethod
    def set_timesteps(self, num_inference_steps: Optional[int] = None, timesteps=None):
        """Choose the timesteps of a sampling run (``self.timesteps``, visiting order): n evenly spaced
        ones by the sampler's own rule, or the given custom ``timesteps`` (strictly descending ints in
        [0, T), e.g. [400] for PixArt-α-DMD's one step)."""

    @abstractmethod
    def step(self, model_output, timestep, sample, noise=None):
        """One denoising step: the sample at ``timestep`` -> the sample at the next timestep."""

    def add_noise(self, original_samples, noise, timestep):
        """q(x_t | x_0): sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) z, (N, C, H, W), for one int timestep t.

        Same as diffusers' ``scheduler.add_noise``; img2img starts from the image latents noised to the
        first timestep it runs, and inpainting re-noises the kept area to each following timestep.
        """
        a = float(self.alphas_cumprod[int(timestep)])
        return _restore_dtype(a**0.5 * _to_float32(original_samples) + (1.0 - a) ** 0.5 * _to_float32(noise),
                              original_samples)

    # ------------------------------------------------------------------ helpers for subclasses
    def _resolve_timesteps(self, num_inference_steps, timesteps):
        """Check the set_timesteps arguments: exactly one of them; custom timesteps must be strictly
        descending ints in [0, T). Returns the custom timesteps as (n,) int64, or None."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("give exactly one of num_inference_steps and timesteps")
        if timesteps is None:
            if int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
            return None
        values = np.asarray(timesteps).reshape(-1)
        if values.size == 0 or not np.all(np.equal(np.mod(values, 1), 0)):
            raise ValueError(f"timesteps must be a non-empty list of integers, got {list(values)}")
        values = values.astype(np.int64)
        if values.min() < 0 or values.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {values.tolist()}")
        if np.any(np.diff(values) >= 0):
            raise ValueError(f"timesteps must be strictly descending, got {values.tolist()}")
        return values

    def _check_ready(self):
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before step()")

    def _index_of(self, timestep) -> int:
        """Position of `timestep` (int, numpy int or 0-d/1-element Tensor) in self.timesteps."""
        t = int(timestep)
        hits = np.nonzero(self.timesteps == t)[0]
        if len(hits) == 0:
            raise ValueError(f"timestep {t} is not in this sampler's timesteps")
        return int(hits[0])

    @staticmethod
    def _split_output(model_output, sample):
        """(N, C or 2C, H, W) model output -> (ε, learned-variance values or None), both float32.

        PixArt XL-2 predicts 2C channels (ε then variance interpolation); samplers that use ε only drop the
        second half.
        """
        channels = sample.shape[1]
        if model_output.shape[1] == channels:
            eps, var_values = model_output, None
        elif model_output.shape[1] == 2 * channels:
            eps, var_values = model_output[:, :channels], model_output[:, channels:]
        else:
            raise ValueError(f"model_output has {model_output.shape[1]} channels; expected {channels} or "
                             f"{2 * channels} for a sample with {channels}")
        eps = _to_float32(eps)
        var_values = None if var_values is None else _to_float32(var_values)
        return eps, var_values

    def _at(self, table, timestep):
        """``table[int(timestep)]`` (a step's coefficients), or a ValueError for a timestep this sampler
        does not visit (checks set_timesteps was called first)."""
        self._check_ready()
        value = table.get(int(timestep))
        if value is None:
            raise ValueError(f"timestep {int(timestep)} is not in this sampler's timesteps")
        return value

    def _noise(self, shape, noise=None):
        """The step's Gaussian noise: `noise` if given (tests inject it), else drawn from self.generator."""
        if noise is None:
            noise = self.generator.standard_normal(tuple(shape), dtype=np.float32)
        if isinstance(noise, np.ndarray):
            noise = ms.Tensor(noise.astype(np.float32, copy=False))
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(shape)}")
        return _to_float32(noise)


def _to_float32(x):
    return x if x.dtype == ms.float32 else ops.cast(x, ms.float32)


def _restore_dtype(x, like):
    """Cast the float32 result back to the dtype the caller's sample had."""
    return x if like.dtype == x.dtype else ops.cast(x, like.dtype)
