"""Gaussian diffusion with a learned variance, after IDDPM (Nichol & Dhariwal 2021) as used by DiT/PixArt.

Two users:
  * training: `IDDPMSampler.q_sample` and `IDDPMSampler.training_losses` on the full 1000-step schedule
    (PixArt's loss: MSE on ε + the variational bound that trains the variance);
  * inference: `IDDPMSampler.set_timesteps(100)` respaces the schedule and `step` does one ancestral
    step p(x_{t-1} | x_t) with the learned variance.

Learned range: the model outputs (N, 2C, H, W) = [ε, v]; v in [-1, 1] interpolates the log variance
between the posterior variance β̃_t (min) and β_t (max):
    log σ²_t = frac · log β_t + (1 - frac) · log β̃_t,     frac = (v + 1) / 2.

Schedule tables are float64 numpy (as IDDPM) and enter the Tensor math as python floats (sampling, one
t) or gathered from float32 Tensors (training, a batch of t), so every op is differentiable MindSpore.
"""
import math
from typing import Dict, List, Optional, Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import ops

from .schedule import Sampler, _restore_dtype, _to_float32

_LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------- timestep respacing
def space_timesteps(num_timesteps: int, section_counts: Union[int, str, Sequence[int]]) -> List[int]:
    """Timesteps of the original process kept by a respaced one (IDDPM's `space_timesteps`), ascending.

    section_counts: an int or "100" (evenly spaced incl. 0 and T-1), "10,15,20" (the schedule cut into
    equal sections with that many steps each), or "ddim50" (a fixed stride as in the DDIM paper).
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {desired} steps with an integer stride")
    if isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index and use python's round() exactly as IDDPM does, so the kept
        # steps (and hence the sampler's trajectory) are identical to the original code's.
        idx = 0.0
        for _ in range(count):
            kept.append(start + round(idx))
            idx += stride
        start += size
    return sorted(set(kept))


def respace_betas(alphas_cumprod: np.ndarray, use_timesteps: Sequence[int]) -> np.ndarray:
    """β's of the process that only visits `use_timesteps`: 1 - ᾱ_t / ᾱ_prev, so ᾱ is kept at each."""
    betas, last = [], 1.0
    for t in sorted(use_timesteps):
        betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.array(betas, dtype=np.float64)


# ---------------------------------------------------------------------------- elementwise math
def mean_flat(x):
    """Mean over all non-batch dimensions: (N, …) -> (N,)."""
    return ops.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2)
                  + ops.square(mean1 - mean2) * ops.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) via the tanh approximation used by IDDPM (keeps parity with its decoder likelihood)."""
    return 0.5 * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * ops.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x (in [-1, 1], 256 bins) under a Gaussian discretized to bins of width 2/255.

    Args: x, means, log_scales: (N, C, H, W) (log_scales may broadcast). Returns (N, C, H, W) in nats.
    The edge bins take the whole tail mass, as for 8-bit images.
    """
    centered = x - means
    inv_stdv = ops.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=1e-12))
    log_one_minus_cdf_min = ops.log(ops.clamp(1.0 - cdf_min, min=1e-12))
    log_cdf_delta = ops.log(ops.clamp(cdf_plus - cdf_min, min=1e-12))
    return ops.where(x < -0.999, log_cdf_plus,
                     ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ---------------------------------------------------------------------------- the diffusion process
class GaussianDiffusion:
    """Discrete Gaussian diffusion q(x_t | x_0) over `betas` (its own indices 0 … len(betas)-1).

    Timesteps `t` may be a python int (one step for the whole batch: coefficients are python floats)
    or an (N,) int Tensor (one per sample: coefficients are gathered to (N, 1, 1, 1)).
    """

    def __init__(self, betas: np.ndarray, rescale_learned_sigmas: bool = False):
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.rescale_learned_sigmas = rescale_learned_sigmas
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.tables = {
            "betas": betas,
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": posterior_variance,
            # β̃_0 = 0: use β̃_1 at t = 0 so the log stays finite (IDDPM's "clipped" log variance).
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:]))
            if len(betas) > 1 else np.log(betas),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            "log_betas": np.log(betas),
            # IDDPM's fixed-large variance for models without a learned variance.
            "fixed_large_log_variance": np.log(np.append(posterior_variance[1], betas[1:]))
            if len(betas) > 1 else np.log(betas),
        }
        self._tensor_tables = {k: ms.Tensor(v.astype(np.float32)) for k, v in self.tables.items()}

    def _coef(self, name: str, t, ndim: int):
        """Table `name` at t: a python float for an int t, else an (N, 1, …, 1) float32 Tensor."""
        if isinstance(t, (int, np.integer)):
            return float(self.tables[name][int(t)])
        values = ops.gather(self._tensor_tables[name], t, 0)
        return ops.reshape(values, (-1,) + (1,) * (ndim - 1))

    # -------------------------------------------------------------- forward process
    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.  x_start, noise: (N, C, H, W); t: (N,) int Tensor or int."""
        nd = x_start.ndim
        return (self._coef("sqrt_alphas_cumprod", t, nd) * x_start
                + self._coef("sqrt_one_minus_alphas_cumprod", t, nd) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0); variances broadcast."""
        nd = x_t.ndim
        mean = (self._coef("posterior_mean_coef1", t, nd) * x_start
                + self._coef("posterior_mean_coef2", t, nd) * x_t)
        return (mean, self._coef("posterior_variance", t, nd),
                self._coef("posterior_log_variance_clipped", t, nd))

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = sqrt(1/ᾱ_t) x_t - sqrt(1/ᾱ_t - 1) ε."""
        nd = x_t.ndim
        return (self._coef("sqrt_recip_alphas_cumprod", t, nd) * x_t
                - self._coef("sqrt_recipm1_alphas_cumprod", t, nd) * eps)

    # -------------------------------------------------------------- reverse process
    def p_mean_variance(self, eps, var_values, x_t, t, clip_denoised: bool = False) -> Dict:
        """Gaussian p(x_{t-1} | x_t) from the model's ε and learned-range values.

        Args:
            eps: (N, C, H, W) predicted noise.
            var_values: (N, C, H, W) learned-range values v (None: IDDPM's fixed-large variance).
            x_t: (N, C, H, W); t: int or (N,) int Tensor.
            clip_denoised: clip the x0 prediction to [-1, 1] (PixArt samples latents with False).
        Returns:
            dict with "mean" (N, C, H, W), "log_variance" (broadcastable), "pred_xstart" (N, C, H, W).
        """
        nd = x_t.ndim
        if var_values is None:
            log_variance = self._coef("fixed_large_log_variance", t, nd)
        else:
            min_log = self._coef("posterior_log_variance_clipped", t, nd)
            max_log = self._coef("log_betas", t, nd)
            frac = (var_values + 1.0) * 0.5
            log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = ops.clamp(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # -------------------------------------------------------------- training loss
    def vb_terms_bpd(self, eps, var_values, x_start, x_t, t):
        """Per-sample variational-bound term L_t in bits per dimension, (N,).

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0; the decoder NLL -log p(x_0 | x_1) at t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(eps, var_values, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / _LOG2
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"])) / _LOG2
        return ops.where(t == 0, decoder_nll, kl)

    def training_losses(self, model_output, x_start, x_t, t, noise) -> Dict:
        """IDDPM hybrid loss for an ε-predicting, learned-range model (PixArt/DiT's LossType.MSE).

        Args:
            model_output: (N, 2C, H, W) model(x_t, t) = [ε, v] (or (N, C, H, W): MSE only).
            x_start: (N, C, H, W) clean latents x_0.
            x_t: (N, C, H, W) q_sample(x_start, t, noise).
            t: (N,) int Tensor of timesteps in [0, num_timesteps).
            noise: (N, C, H, W) the ε used to make x_t.
        Returns:
            dict of (N,) float32 Tensors: "mse" = mean over C, H, W of (ε - ε̂)², "vb" (bits/dim, the ε̂ it
            sees is stop-gradiented so only v learns from it), "loss" = mse + vb. Average "loss" over the
            batch for the scalar to differentiate.
        """
        channels = x_t.shape[1]
        model_output = _to_float32(model_output)
        terms = {}
        if model_output.shape[1] == 2 * channels:
            eps, var_values = model_output[:, :channels], model_output[:, channels:]
            # The VB term trains the variance only; ε is trained by the MSE alone (IDDPM §3.1).
            vb = self.vb_terms_bpd(ops.stop_gradient(eps), var_values, x_start, x_t, t)
            if self.rescale_learned_sigmas:  # IDDPM's RESCALED_MSE; PixArt and DiT leave this off
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
        elif model_output.shape[1] == channels:
            eps = model_output
        else:
            raise ValueError(f"model_output has {model_output.shape[1]} channels for {channels}-channel latents")
        terms["mse"] = mean_flat(ops.square(noise - eps))
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


# ---------------------------------------------------------------------------- the sampler
class IDDPMSampler(Sampler):
    """IDDPM ancestral sampler with learned variance on a respaced schedule, plus the training loss.

    Args:
        clip_denoised: clip the x0 prediction to [-1, 1] while sampling (False, as PixArt does on latents).
        rescale_learned_sigmas: IDDPM's RESCALED_MSE (vb *= T/1000); False for PixArt.
        + schedule kwargs (num_train_timesteps, beta_start, beta_end, beta_schedule) and seed/generator.
    Training uses `q_sample` / `training_losses` on the full schedule; `set_timesteps(n)` only changes
    the sampling chain. `timesteps` are original-process timesteps: pass them to the model as they are.
    """

    name = "iddpm"

    def __init__(self, clip_denoised: bool = False, rescale_learned_sigmas: bool = False, **schedule_kwargs):
        super().__init__(**schedule_kwargs)
        self.clip_denoised = clip_denoised
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.diffusion = GaussianDiffusion(self.betas, rescale_learned_sigmas)
        self._respaced: Optional[GaussianDiffusion] = None

    # -------------------------------------------------------------- training side
    def q_sample(self, x_start, t, noise):
        """Noised latents x_t, (N, C, H, W), for (N,) int Tensor t on the full training schedule."""
        return self.diffusion.q_sample(x_start, t, noise)

    def training_losses(self, model_output, x_start, x_t, t, noise) -> Dict:
        """See `GaussianDiffusion.training_losses` (full training schedule)."""
        return self.diffusion.training_losses(model_output, x_start, x_t, t, noise)

    # -------------------------------------------------------------- sampling side
    def set_timesteps(self, num_inference_steps: Union[int, str, None] = None, timesteps=None):
        """Respace to `num_inference_steps` (int, or an IDDPM spec like "100", "10,20" or "ddim25"), or to
        the custom `timesteps` (descending; as diffusers' DDPMScheduler.set_timesteps(timesteps=...))."""
        if isinstance(num_inference_steps, str) and timesteps is None:
            kept = space_timesteps(self.num_train_timesteps, num_inference_steps)
        else:
            custom = self._resolve_timesteps(num_inference_steps, timesteps)
            kept = sorted(custom.tolist()) if custom is not None else \
                space_timesteps(self.num_train_timesteps, num_inference_steps)
        self._respaced = GaussianDiffusion(respace_betas(self.alphas_cumprod, kept), self.rescale_learned_sigmas)
        self.timesteps = np.array(kept[::-1], dtype=np.int64)
        self.num_inference_steps = len(kept)
        # Respaced index of each original timestep (the chain runs on respaced indices).
        self._respaced_index = {t: i for i, t in enumerate(kept)}
        return self

    def step(self, model_output, timestep, sample, noise=None):
        """One ancestral step x_t -> x_{t_prev} ~ N(mean, σ²) with the learned variance.

        Args:
            model_output: (N, 2C, H, W) [ε, v] (with CFG: guided ε, the conditional branch's v);
                (N, C, H, W) falls back to IDDPM's fixed-large variance.
            timestep: the current entry of self.timesteps (an original-process timestep).
            sample: (N, C, H, W) x_t.
            noise: (N, C, H, W) z (drawn from self.generator when None; unused on the last step).
        Returns:
            (N, C, H, W) x at the next timestep, in `sample`'s dtype.
        """
        index = self._at(self._respaced_index, timestep)
        eps, var_values = self._split_output(model_output, sample)
        x = _to_float32(sample)
        out = self._respaced.p_mean_variance(eps, var_values, x, index, self.clip_denoised)
        prev = out["mean"]
        if index > 0:  # no noise when producing x_0
            std = ops.exp(0.5 * out["log_variance"]) if var_values is not None \
                else math.exp(0.5 * out["log_variance"])
            prev = prev + std * self._noise(x.shape, noise)
        return _restore_dtype(prev, sample)
