"""SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector on the discrete VP schedule.

Numerically equivalent to diffusers' default `SASolverScheduler()` (data prediction, predictor and
corrector order 2, lower_order_final, timestep_spacing "linspace", tau = 1 for 200 <= t <= 800 else 0,
epsilon prediction), given the same noise.

Notation as in DPM-Solver: σ̃ = sqrt((1-ᾱ)/ᾱ), α = 1/sqrt(1+σ̃²), σ = σ̃α, λ = -log σ̃; m_k is the x0
prediction at step k. A step from s to t with stochasticity τ (c = 1 + τ²):
    x_t = e^{-τ² h} (σ_t/σ_s) x_s + c σ_t e^{-τ² λ_t} Σ_i b_i m_{k-i} + σ_t sqrt(1 - e^{-2τ² h}) z
where b_i = ∫_{λ_s}^{λ_t} e^{cλ} ℓ_i(λ) dλ and ℓ_i are the Lagrange basis polynomials through the λ's
of the x0 predictions used. The predictor (explicit, Adams-Bashforth) uses m_k, m_{k-1}, …; the
corrector (implicit, Adams-Moulton) redoes the previous step with the fresh m_k included and the same
noise z. Everything but the tensor combination is precomputed in `set_timesteps`.

Noise consumption: step k uses one z_k of the sample's shape for its predictor and re-uses it in the
corrector at step k+1 (diffusers draws it at every step with `randn_tensor(model_output.shape)`). Here z_k
is only drawn when τ_k > 0 (otherwise it multiplies zero), unless `noise` is passed.
"""
import math
from typing import Callable, List, Optional

import numpy as np

from .schedule import Sampler, _restore_dtype, _to_float32, solver_timesteps


def default_tau(t) -> float:
    """SA-Solver's default stochasticity: SDE-like (τ=1) in the middle of the schedule, ODE at the ends."""
    return 1.0 if 200 <= t <= 800 else 0.0


def _exp_poly_integral(power: int, start: float, end: float, c: float) -> float:
    """∫_start^end e^{cλ} λ^power dλ in closed form.

    With u = cλ the antiderivative of e^u u^n is e^u P_n(u), P_n(u) = Σ_k (-1)^k n!/(n-k)! u^{n-k};
    factoring out e^{u_end} keeps the exponent of the other term ≤ 0.
    """
    u0, u1 = c * start, c * end

    def poly(u):
        return sum((-1) ** k * math.factorial(power) / math.factorial(power - k) * u ** (power - k)
                   for k in range(power + 1))

    return math.exp(u1) * (poly(u1) - poly(u0) * math.exp(-(u1 - u0))) / c ** (power + 1)


def _adams_coefficients(lam_s: float, lam_t: float, nodes: List[float], tau: float) -> List[float]:
    """b_i = ∫_{λ_s}^{λ_t} e^{(1+τ²)λ} ℓ_i(λ) dλ for the Lagrange basis ℓ_i through `nodes`."""
    c = 1.0 + tau**2
    order = len(nodes)
    integrals = [_exp_poly_integral(p, lam_s, lam_t, c) for p in range(order)]
    coeffs = []
    for i, node in enumerate(nodes):
        others = [x for j, x in enumerate(nodes) if j != i]
        # Monomial coefficients of Π_{j≠i}(λ - λ_j) / Π_{j≠i}(λ_i - λ_j), highest power first.
        monomials = np.poly(others) / np.prod([node - x for x in others]) if others else np.ones(1)
        coeffs.append(float(sum(m * integrals[order - 1 - j] for j, m in enumerate(monomials))))
    return coeffs


class SASolverSampler(Sampler):
    """SA-Solver (data prediction) sampler.

    Args:
        predictor_order, corrector_order: Adams orders (diffusers default 2 and 2; at most 4).
        tau_func: t -> τ ≥ 0, the amount of SDE noise per timestep (default `default_tau`).
        lower_order_final: lower the orders on the last steps.
        timestep_spacing: "linspace" (default), "leading" or "trailing".
    """

    name = "sa-solver"

    def __init__(self, predictor_order: int = 2, corrector_order: int = 2, tau_func: Optional[Callable] = None,
                 lower_order_final: bool = True, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 **schedule_kwargs):
        super().__init__(**schedule_kwargs)
        if not (1 <= predictor_order <= 4 and 1 <= corrector_order <= 4):
            raise ValueError("predictor_order and corrector_order must be in 1..4")
        self.predictor_order = predictor_order
        self.corrector_order = corrector_order
        self.tau_func = tau_func or default_tau
        self.lower_order_final = lower_order_final
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset

    # ------------------------------------------------------------------ precomputation
    def _update_coeffs(self, k_from: int, k_to: int, order: int, tau: float, corrector: bool) -> dict:
        """Scalars for one SA update from sigma index k_from to k_to = k_from + 1.

        The x0 predictions used are those at indices k_to, k_from, k_from-1, … (corrector) or
        k_from, k_from-1, … (predictor), `order` of them, most recent first.
        """
        lam, sigma = self._lambda, self._sigma
        lam_s, lam_t = lam[k_from], lam[k_to]
        h = lam_t - lam_s
        newest = k_to if corrector else k_from
        b = _adams_coefficients(lam_s, lam_t, [lam[newest - i] for i in range(order)], tau)
        if order == 2:
            # SA-Solver's second-order tweak (as in UniPC), kept for parity with the reference solver.
            c = 1.0 + tau**2
            core = h * c - 1.0 + math.exp(-c * h)
            if corrector:
                delta = math.exp(c * lam_t) * (h / 2 - core / (c**2 * h))
            else:
                delta = math.exp(c * lam_t) * (h**2 / 2 - core / c**2) / (lam_s - lam[k_from - 1])
            b[0] += delta
            b[1] -= delta
        scale = (1.0 + tau**2) * sigma[k_to] * math.exp(-(tau**2) * lam_t)
        # Plain python floats: a numpy scalar on the left of `*` would pull the Tensor into numpy.
        return {
            "x": float(math.exp(-(tau**2) * h) * sigma[k_to] / sigma[k_from]),
            "m": [float(scale * bi) for bi in b],
            "z": float(sigma[k_to] * math.sqrt(max(0.0, 1.0 - math.exp(-2.0 * tau**2 * h)))),
        }

    def set_timesteps(self, num_inference_steps=None, timesteps=None):
        T = self.num_train_timesteps
        custom = self._resolve_timesteps(num_inference_steps, timesteps)
        self.timesteps = custom if custom is not None else \
            solver_timesteps(T, num_inference_steps, self.timestep_spacing, self.steps_offset)
        self.num_inference_steps = n = len(self.timesteps)

        # σ̃ per visited timestep; unlike DPM-Solver++ the last step ends at σ̃(t=0), not at 0.
        train_sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self.sigmas = np.append(np.interp(self.timesteps, np.arange(T), train_sigmas), train_sigmas[0])
        self._alpha = 1.0 / np.sqrt(self.sigmas**2 + 1.0)
        self._sigma = self.sigmas * self._alpha
        self._lambda = np.log(self._alpha) - np.log(self._sigma)
        self._taus = [float(self.tau_func(int(t))) for t in self.timesteps]

        # Orders ramp up while the history fills (warm-up) and ramp down at the end (lower_order_final).
        history = max(self.predictor_order, self.corrector_order - 1)
        self._predictor, self._corrector = [], [None]
        for k in range(n):
            filled = min(k, history)
            p_order = min(self.predictor_order, filled + 1)
            c_order = min(self.corrector_order, filled + 2)
            if self.lower_order_final:
                p_order = min(p_order, n - k)
                c_order = min(c_order, n - k + 1)
            self._predictor.append(self._update_coeffs(k, k + 1, p_order, self._taus[k], corrector=False))
            if k + 1 < n:  # the corrector run at step k+1 redoes this step's update
                self._corrector.append(self._update_coeffs(k, k + 1, c_order, self._taus[k], corrector=True))
        self._history_len = history
        self._reset_state()
        return self

    def _reset_state(self):
        self._x0_history = []  # most recent last
        self._last_sample = None
        self._last_noise = None
        self._step_index = None

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _combine(coeffs, x, x0_recent_first, z):
        out = coeffs["x"] * x
        for b, m in zip(coeffs["m"], x0_recent_first):
            out = out + b * m
        if z is not None and coeffs["z"] != 0.0:
            out = out + coeffs["z"] * z
        return out

    def step(self, model_output, timestep, sample, noise=None):
        """One SA-Solver step: correct the previous update with the new model output, then predict.

        Args:
            model_output: (N, C, H, W) ε, or (N, 2C, H, W) with the learned variance (ignored) second.
            timestep: the current entry of self.timesteps.
            sample: (N, C, H, W) x_t (the previous step's output).
            noise: (N, C, H, W) z for this step's predictor (and the next step's corrector); drawn from
                self.generator when None and this step is stochastic (τ > 0).
        Returns:
            (N, C, H, W) sample at the next timestep, in `sample`'s dtype.
        """
        self._check_ready()
        if self._step_index is None:
            self._step_index = self._index_of(timestep)
        k = self._step_index
        if k >= self.num_inference_steps:
            raise RuntimeError("SASolverSampler: all steps done; call set_timesteps() to start again")

        eps, _ = self._split_output(model_output, sample)
        x = _to_float32(sample)
        alpha, sigma = float(self._alpha[k]), float(self._sigma[k])
        x0 = (x - sigma * eps) * (1.0 / alpha)

        if self._last_sample is not None and k > 0:
            # Adams-Moulton corrector: redo step k-1 -> k including the fresh prediction m_k.
            recent = [x0] + self._x0_history[::-1]
            x = self._combine(self._corrector[k], self._last_sample, recent, self._last_noise)

        self._x0_history = (self._x0_history + [x0])[-self._history_len:]
        z = None
        if noise is not None or self._taus[k] > 0:
            z = self._noise(x.shape, noise)
        self._last_sample, self._last_noise = x, z

        prev = self._combine(self._predictor[k], x, self._x0_history[::-1], z)
        self._step_index = k + 1
        return _restore_dtype(prev, sample)
