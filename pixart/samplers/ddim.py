"""DDIM (Song et al. 2021) on the discrete VP schedule, deterministic (eta=0) or stochastic (eta>0).

Numerically equivalent to diffusers' `DDIMScheduler(clip_sample=False)` with its other defaults:
linear β 1e-4 → 0.02 over 1000 steps, timestep_spacing "leading" (t = 0, T/n, 2T/n, …), steps_offset 0,
set_alpha_to_one True (the last step lands on ᾱ = 1, i.e. a clean x0).
The one departure from diffusers' defaults is clip_sample: diffusers clips the x0 prediction to [-1, 1]
by default, which suits pixel-space models but would destroy VAE latents. With these settings the sampler
is also what PixArt's IDDPM code does for "ddim<n>" respacing with clip_denoised=False (when n divides T).

One step from t to the previous timestep p = t - T//n, with ε the model's noise prediction:
    x0   = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)
    σ_t  = eta · sqrt((1 - ᾱ_p) / (1 - ᾱ_t)) · sqrt(1 - ᾱ_t / ᾱ_p)
    x_p  = sqrt(ᾱ_p) x0 + sqrt(1 - ᾱ_p - σ_t²) ε + σ_t z,        z ~ N(0, I)
"""
import numpy as np
from mindspore import ops

from .schedule import Sampler, _restore_dtype, _to_float32


class DDIMSampler(Sampler):
    """DDIM sampler.

    Args:
        eta: 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
        timestep_spacing: "leading" (default), "linspace" or "trailing" (diffusers' meanings).
        set_alpha_to_one: ᾱ used after the last step (True: 1.0; False: ᾱ_0).
        clip_sample: clip the x0 prediction to [-clip_sample_range, clip_sample_range] (off for latents).
    """

    name = "ddim"

    def __init__(self, eta: float = 0.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 set_alpha_to_one: bool = True, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 **schedule_kwargs):
        super().__init__(**schedule_kwargs)
        self.eta = float(eta)
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range

    def set_timesteps(self, num_inference_steps=None, timesteps=None):
        T = self.num_train_timesteps
        custom = self._resolve_timesteps(num_inference_steps, timesteps)
        if custom is not None:
            self.timesteps = custom
            self.num_inference_steps = len(custom)
            # A custom schedule steps from each timestep to the next one listed (the last to ᾱ = final).
            prev_of = dict(zip(custom.tolist(), custom[1:].tolist() + [-1]))
        else:
            n = num_inference_steps
            if n > T:
                raise ValueError(f"num_inference_steps {n} > num_train_timesteps {T}")
            if self.timestep_spacing == "leading":
                t = np.arange(0, n) * (T // n) + self.steps_offset
            elif self.timestep_spacing == "linspace":
                t = np.linspace(0, T - 1, n).round()
            elif self.timestep_spacing == "trailing":
                t = np.round(np.arange(T, 0, -T / n)) - 1
            else:
                raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}")
            self.timesteps = np.ascontiguousarray(t[::-1]).astype(np.int64)
            self.num_inference_steps = n
            # Like diffusers, the previous timestep is always t - T//n (for "leading" spacing that is
            # exactly the next visited one).
            prev_of = {int(t): int(t) - T // n for t in self.timesteps}

        # Per visited timestep.
        self._coeffs = {}
        for t in self.timesteps:
            prev_t = prev_of[int(t)]
            a_t = float(self.alphas_cumprod[t])
            a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
            variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
            std = self.eta * variance**0.5
            self._coeffs[int(t)] = {
                "x0_x": 1.0 / a_t**0.5,
                "x0_eps": -((1.0 - a_t) ** 0.5) / a_t**0.5,
                "prev_x0": a_prev**0.5,
                "prev_eps": (1.0 - a_prev - std**2) ** 0.5,
                "std": std,
            }
        return self

    def step(self, model_output, timestep, sample, noise=None):
        """One DDIM step.

        Args:
            model_output: (N, C, H, W) ε, or (N, 2C, H, W) with the learned variance (ignored) second.
            timestep: the current entry of self.timesteps.
            sample: (N, C, H, W) x_t.
            noise: (N, C, H, W) z for eta > 0 (drawn from self.generator when None; unused for eta = 0).
        Returns:
            (N, C, H, W) x at the previous timestep, in `sample`'s dtype.
        """
        c = self._at(self._coeffs, timestep)
        eps, _ = self._split_output(model_output, sample)
        x = _to_float32(sample)
        x0 = c["x0_x"] * x + c["x0_eps"] * eps
        if self.clip_sample:
            x0 = ops.clamp(x0, -self.clip_sample_range, self.clip_sample_range)
            # ε stays the model's own prediction, as in diffusers (use_clipped_model_output=False).
        prev = c["prev_x0"] * x0 + c["prev_eps"] * eps
        if self.eta > 0:
            prev = prev + c["std"] * self._noise(x.shape, noise)
        return _restore_dtype(prev, sample)
