"""LCM (Luo et al. 2023): multistep latent-consistency sampling, for PixArt-LCM (PixArt-δ, 4 steps).

Numerically equivalent to diffusers' `LCMScheduler` with the config PixArt-LCM-XL-2-1024-MS ships
(linear β 1e-4 → 0.02 over 1000 steps, original_inference_steps 50, epsilon prediction, timestep_scaling
10, set_alpha_to_one, no clipping), given the same injected noise.

Timesteps. The distillation visited the "skipping-step" schedule τ_i = i·k - 1, i = 1 … N (k = T // N,
N = original_inference_steps, e.g. 19, 39, …, 999); n inference steps take n of them, evenly spaced in
index from the top: τ reversed at indices floor(j·N/n), j = 0 … n-1 (4 steps: 999, 759, 499, 259).
Custom timesteps (strictly descending) replace that schedule.

One step at t, with ε the model's noise prediction and p the next timestep of the schedule:
    x0       = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)
    c_skip   = σ_d² / ((s·t)² + σ_d²),   c_out = s·t / sqrt((s·t)² + σ_d²),   σ_d = 0.5, s = timestep_scaling
    denoised = c_out · x0 + c_skip · x_t                   (the consistency function's boundary condition)
    x_p      = sqrt(ᾱ_p) · denoised + sqrt(1 - ᾱ_p) · z,   z ~ N(0, I)      (not on the last step)
The last step returns `denoised` itself, so a one-step schedule draws no noise.
"""
import numpy as np

from .schedule import Sampler, _restore_dtype, _to_float32

SIGMA_DATA = 0.5


class LCMSampler(Sampler):
    """Latent consistency model sampler (multistep, noise re-injected between steps).

    Args:
        original_inference_steps: N of the distillation schedule (50 for PixArt-LCM).
        timestep_scaling: s in the boundary-condition scalings c_skip, c_out (10, as diffusers).
        + schedule kwargs (num_train_timesteps, beta_start, beta_end, beta_schedule) and seed/generator.
    """

    name = "lcm"

    def __init__(self, original_inference_steps: int = 50, timestep_scaling: float = 10.0, **schedule_kwargs):
        super().__init__(**schedule_kwargs)
        if not 1 <= original_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"original_inference_steps must be in [1, {self.num_train_timesteps}], "
                             f"got {original_inference_steps}")
        self.original_inference_steps = int(original_inference_steps)
        self.timestep_scaling = float(timestep_scaling)

    def origin_timesteps(self) -> np.ndarray:
        """The distillation schedule τ_i = i·(T // N) - 1, i = 1 … N, ascending (N,) int64."""
        k = self.num_train_timesteps // self.original_inference_steps
        return np.arange(1, self.original_inference_steps + 1, dtype=np.int64) * k - 1

    def boundary_scalings(self, timestep):
        """(c_skip, c_out) of the consistency parameterisation at an int timestep."""
        scaled = float(timestep) * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def set_timesteps(self, num_inference_steps=None, timesteps=None):
        custom = self._resolve_timesteps(num_inference_steps, timesteps)
        if custom is None:
            n, N = int(num_inference_steps), self.original_inference_steps
            if n > N:
                raise ValueError(f"num_inference_steps {n} > original_inference_steps {N}: LCM's steps are a "
                                 f"subset of its {N}-step distillation schedule")
            origin = self.origin_timesteps()[::-1]
            custom = origin[np.floor(np.linspace(0, N, num=n, endpoint=False)).astype(np.int64)]
        self.timesteps = np.ascontiguousarray(custom).astype(np.int64)
        self.num_inference_steps = n = len(self.timesteps)

        self._coeffs = {}
        for k, t in enumerate(self.timesteps.tolist()):
            a_t = float(self.alphas_cumprod[t])
            c_skip, c_out = self.boundary_scalings(t)
            last = k == n - 1
            a_next = 1.0 if last else float(self.alphas_cumprod[self.timesteps[k + 1]])
            self._coeffs[t] = {
                "sqrt_alpha": a_t**0.5,
                "sqrt_beta": (1.0 - a_t) ** 0.5,
                "c_skip": c_skip,
                "c_out": c_out,
                "next_denoised": a_next**0.5,
                "next_noise": (1.0 - a_next) ** 0.5,
                "last": last,
            }
        return self

    def step(self, model_output, timestep, sample, noise=None, return_denoised=False):
        """One LCM step.

        Args:
            model_output: (N, C, H, W) ε, or (N, 2C, H, W) with the learned variance (ignored) second.
            timestep: an entry of self.timesteps.
            sample: (N, C, H, W) x_t.
            noise: (N, C, H, W) z injected towards the next timestep (drawn from self.generator when None;
                unused on the last step).
            return_denoised: also return the step's clean estimate (diffusers' ``denoised``).
        Returns:
            (N, C, H, W) sample at the next timestep (the clean estimate after the last step), in `sample`'s
            dtype; with return_denoised, (that, denoised).
        """
        c = self._at(self._coeffs, timestep)
        eps, _ = self._split_output(model_output, sample)
        x = _to_float32(sample)
        # Near t = T the x0 prediction divides a small difference by sqrt(ᾱ) ≈ 0.006: it is formed in
        # diffusers' order so that the float32 rounding matches.
        x0 = (x - c["sqrt_beta"] * eps) / c["sqrt_alpha"]
        denoised = c["c_out"] * x0 + c["c_skip"] * x
        if c["last"]:
            prev = denoised
        else:
            prev = c["next_denoised"] * denoised + c["next_noise"] * self._noise(x.shape, noise)
        prev = _restore_dtype(prev, sample)
        return (prev, _restore_dtype(denoised, sample)) if return_denoised else prev
