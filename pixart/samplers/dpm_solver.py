"""DPM-Solver++ (multistep, data prediction) on the discrete VP schedule.

Numerically equivalent to diffusers' default `DPMSolverMultistepScheduler()` (what the PixArt-Σ diffusers
repos ship): solver_order 2, algorithm "dpmsolver++", solver_type "midpoint", lower_order_final,
timestep_spacing "linspace", final_sigmas_type "zero", epsilon prediction.

Notation (Lu et al. 2022): for a noise level σ̃ = sqrt((1-ᾱ)/ᾱ) the VP coefficients are
α = 1/sqrt(1+σ̃²), σ = σ̃·α and the log-SNR is λ = log α - log σ = -log σ̃. One step from s to t, with
h = λ_t - λ_s and x0-predictions m0 (at s) and m1 (at the step before):
    first order : x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) m0
    second order: ... - 0.5 α_t (e^{-h} - 1) (m0 - m1) / r0,      r0 = (λ_s - λ_{s-1}) / h
All of these scalars are precomputed per step in `set_timesteps`.
"""
from typing import List, Optional

import numpy as np

from .schedule import Sampler, _restore_dtype, _to_float32, solver_timesteps


class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep sampler (deterministic; `noise` is accepted and ignored).

    Args:
        solver_order: 1 (DDIM-equivalent) or 2 (default).
        lower_order_final: use first order on the last step when there are fewer than 15 steps
            (always true for the last step with final_sigmas_type "zero").
        final_sigmas_type: "zero" (denoise fully on the last step, default) or "sigma_min".
        timestep_spacing: "linspace" (default), "leading" or "trailing".
    """

    name = "dpm"

    def __init__(self, solver_order: int = 2, lower_order_final: bool = True, final_sigmas_type: str = "zero",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, **schedule_kwargs):
        super().__init__(**schedule_kwargs)
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self.solver_order = solver_order
        self.lower_order_final = lower_order_final
        self.final_sigmas_type = final_sigmas_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self._history: List = []
        self._step_index: Optional[int] = None

    def set_timesteps(self, num_inference_steps=None, timesteps=None):
        T = self.num_train_timesteps
        custom = self._resolve_timesteps(num_inference_steps, timesteps)
        self.timesteps = custom if custom is not None else \
            solver_timesteps(T, num_inference_steps, self.timestep_spacing, self.steps_offset)
        self.num_inference_steps = n = len(self.timesteps)

        # σ̃ at each visited timestep plus the end point; interpolation only matters for fractional t.
        train_sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        sigmas = np.interp(self.timesteps, np.arange(T), train_sigmas)
        sigma_last = 0.0 if self.final_sigmas_type == "zero" else train_sigmas[0]
        self.sigmas = np.append(sigmas, sigma_last)

        alpha = 1.0 / np.sqrt(self.sigmas**2 + 1.0)
        sigma = self.sigmas * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at σ̃ = 0

        # Per step: x0 = in_x·x + in_eps·ε, then x_next = c_x·x + c_m0·m0 + c_m1·m1 (second order) or
        # c_x·x + c_m0_first·m0 (first order).
        self._coeffs = []
        for k in range(n):
            is_last = k == n - 1
            # The first step has no history; the loop also checks that at run time (a loop may start
            # part-way, e.g. img2img).
            first_order = (self.solver_order == 1 or k == 0 or
                           (is_last and (self.final_sigmas_type == "zero" or
                                         (self.lower_order_final and n < 15))))
            # e^{-h} = σ̃_{k+1}/σ̃_k, written without logs so the final σ̃ = 0 step gives exactly 0.
            exp_neg_h = self.sigmas[k + 1] / self.sigmas[k]
            phi = alpha[k + 1] * (exp_neg_h - 1.0)
            c = {
                "in_x": 1.0 / alpha[k],
                "in_eps": -sigma[k] / alpha[k],
                "c_x": sigma[k + 1] / sigma[k],
                "c_m0_first": -phi,
                "order": 1,
            }
            if not first_order:
                r0 = (lam[k] - lam[k - 1]) / (lam[k + 1] - lam[k])
                c["c_m0"] = -phi * (1.0 + 0.5 / r0)
                c["c_m1"] = 0.5 * phi / r0
                c["order"] = 2
            self._coeffs.append({key: v if key == "order" else float(v) for key, v in c.items()})
        self._history = []
        self._step_index = None
        return self

    def step(self, model_output, timestep, sample, noise=None):
        """One solver step.

        Args:
            model_output: (N, C, H, W) ε, or (N, 2C, H, W) with the learned variance in the second half.
            timestep: the current entry of self.timesteps.
            sample: (N, C, H, W) x_t.
            noise: ignored (the solver is deterministic).
        Returns:
            (N, C, H, W) sample at the next (lower-noise) timestep, in `sample`'s dtype.
        """
        self._check_ready()
        if self._step_index is None:
            self._step_index = self._index_of(timestep)
        k = self._step_index
        if k >= self.num_inference_steps:
            raise RuntimeError("DPMSolverSampler: all steps done; call set_timesteps() to start again")
        c = self._coeffs[k]

        eps, _ = self._split_output(model_output, sample)
        x = _to_float32(sample)
        x0 = c["in_x"] * x + c["in_eps"] * eps  # data prediction m0
        if c["order"] == 2 and self._history:
            prev = c["c_x"] * x + c["c_m0"] * x0 + c["c_m1"] * self._history[-1]
        else:
            prev = c["c_x"] * x + c["c_m0_first"] * x0

        # Only the previous x0 is needed by a second-order multistep update.
        self._history = [x0]
        self._step_index = k + 1
        return _restore_dtype(prev, sample)
