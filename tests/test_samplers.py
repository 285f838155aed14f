"""Parity of pixart.samplers with diffusers (PyTorch) schedulers and with IDDPM's formulas in numpy.

The fake "model" is a fixed function of (x, t) computed in numpy, identically for both sides: it predicts
the ε that would turn x into the data d(x) = 0.8 tanh(x) + 0.1 sin(3x), so trajectories stay O(1) as with
a real denoiser, and its learned-variance half is v = 0.9 tanh(x + t/1000) in [-1, 1].

Schedule precision: diffusers builds ᾱ in float32 (torch.linspace + cumprod), ours is float64 (as IDDPM).
They differ by ~4e-7 relative, which DDIM/DDPM amplify through x0 = (x - sqrt(1-ᾱ)ε)/sqrt(ᾱ) (1/sqrt(ᾱ)
≈ 150 at t=999) to ~1e-5 on the final sample. Where that matters the reference scheduler is given the
float64 ᾱ (same algorithm, exact schedule) for the 1e-5 check, and the unpatched one is checked at 5e-5.
"""
import math

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SASolverScheduler
from mindspore import ops

from pixart.samplers import (DEFAULT_STEPS, DDIMSampler, DPMSolverSampler, IDDPMSampler, LCMSampler,
                             SASolverSampler, build_sampler, space_timesteps)

T = 1000
AC64 = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
SHAPE = (2, 4, 8, 8)


def fake_eps(x, t):
    """(N, C, H, W) float32 ε for x at original timestep t."""
    x = x.astype(np.float64)
    a = AC64[int(t)]
    data = 0.8 * np.tanh(x) + 0.1 * np.sin(3.0 * x)
    return ((x - math.sqrt(a) * data) / math.sqrt(1.0 - a)).astype(np.float32)


def fake_output(x, t):
    """(N, 2C, H, W) float32 [ε, v], as PixArt XL-2 (learned sigma) outputs."""
    v = 0.9 * np.tanh(x.astype(np.float64) + t / 1000.0)
    return np.concatenate([fake_eps(x, t), v.astype(np.float32)], axis=1)


def initial_latents(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def exact_schedule(scheduler):
    """Give a diffusers scheduler the float64 ᾱ (call before set_timesteps)."""
    scheduler.alphas_cumprod = torch.from_numpy(AC64.copy())
    return scheduler


def run_pair(ours, ref, ref_step, model=fake_eps, noises=None):
    """Run both samplers from the same latents; returns (ours, reference) final samples as numpy.

    ref_step(scheduler, model_out, t, x, z) -> next torch sample; z is the injected noise or None.
    """
    x0 = initial_latents()
    x_ms, x_pt = ms.Tensor(x0), torch.from_numpy(x0)
    for i, t in enumerate(ours.timesteps):
        z = None if noises is None else noises[i]
        x_ms = ours.step(ms.Tensor(model(x_ms.asnumpy(), t)), t, x_ms,
                         noise=None if z is None else ms.Tensor(z))
        x_pt = ref_step(ref, torch.from_numpy(model(x_pt.numpy(), t)), int(t), x_pt,
                        None if z is None else torch.from_numpy(z))
    return x_ms.asnumpy(), x_pt.numpy()


def assert_close(ours, ref, atol):
    err = float(np.abs(ours - ref).max())
    assert np.isfinite(ours).all()
    assert err < atol, f"max abs diff {err:.3g} >= {atol}"
    return err


# ---------------------------------------------------------------------------- DPM-Solver++
def dpm_step(s, out, t, x, z):
    return s.step(out, t, x).prev_sample


@pytest.mark.parametrize("steps", [20, 8])
def test_dpm_solver_matches_diffusers(steps):
    ours = DPMSolverSampler().set_timesteps(steps)
    ref = DPMSolverMultistepScheduler()
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=5e-6)  # float32 vs float64 ᾱ
    a, b = run_pair(ours, ref, dpm_step)
    assert_close(a, b, 1e-5)
    assert np.abs(a).max() > 0.1  # a real trajectory, not a collapse to 0


def test_dpm_solver_learned_sigma_output_uses_eps_half():
    """(N, 2C, H, W) output (PixArt XL-2) gives the same result as its ε half."""
    x0 = ms.Tensor(initial_latents())
    results = []
    for model in (fake_eps, fake_output):
        s = DPMSolverSampler().set_timesteps(5)
        x = x0
        for t in s.timesteps:
            x = s.step(ms.Tensor(model(x.asnumpy(), t)), t, x)
        results.append(x.asnumpy())
    np.testing.assert_array_equal(results[0], results[1])


# ---------------------------------------------------------------------------- DDIM
def ddim_step(eta):
    def _step(s, out, t, x, z):
        return s.step(out, t, x, eta=eta, variance_noise=z).prev_sample
    return _step


@pytest.mark.parametrize("eta,steps", [(0.0, 50), (0.0, 20), (0.5, 20)])
def test_ddim_matches_diffusers(eta, steps):
    ours = DDIMSampler(eta=eta).set_timesteps(steps)
    rng = np.random.default_rng(1)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps)] if eta > 0 else None

    exact = exact_schedule(DDIMScheduler(clip_sample=False))
    exact.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, exact.timesteps.numpy())
    a, b = run_pair(ours, exact, ddim_step(eta), noises=noises)
    assert_close(a, b, 1e-5)

    # diffusers exactly as shipped (float32 schedule): same up to the schedule's rounding.
    stock = DDIMScheduler(clip_sample=False)
    stock.set_timesteps(steps)
    ours.set_timesteps(steps)
    a2, b2 = run_pair(ours, stock, ddim_step(eta), noises=noises)
    np.testing.assert_array_equal(a, a2)  # DDIM is stateless: rerun is identical
    assert_close(a2, b2, 5e-5)
    if eta > 0:  # the injected noise matters
        det = DDIMSampler(eta=0.0).set_timesteps(steps)
        a3, _ = run_pair(det, exact, ddim_step(0.0))
        assert np.abs(a3 - a).max() > 1e-2


def test_ddim_clip_sample_matches_diffusers_default():
    ours = DDIMSampler(clip_sample=True).set_timesteps(10)
    ref = exact_schedule(DDIMScheduler())  # diffusers' default clip_sample=True
    ref.set_timesteps(10)
    a, b = run_pair(ours, ref, ddim_step(0.0))
    assert_close(a, b, 1e-5)


# ---------------------------------------------------------------------------- SA-Solver
@pytest.mark.parametrize("steps", [25, 6])
def test_sa_solver_matches_diffusers(steps):
    ours = SASolverSampler().set_timesteps(steps)
    ref = SASolverScheduler()
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    # The final σ̃(t=0) = sqrt((1-ᾱ_0)/ᾱ_0) loses ~1e-4 relative in diffusers' float32 (1 - 0.9999).
    np.testing.assert_allclose(ours.sigmas[:-1], ref.sigmas.numpy()[:-1], rtol=5e-6)
    np.testing.assert_allclose(ours.sigmas[-1], ref.sigmas.numpy()[-1], rtol=2e-4)

    # diffusers draws randn_tensor(model_output.shape, generator) once per step, before its predictor:
    # replay the same torch stream and inject it.
    gen = torch.Generator().manual_seed(1234)
    noises = [torch.randn(SHAPE, generator=gen).numpy() for _ in range(steps)]
    ref_gen = torch.Generator().manual_seed(1234)

    def sa_step(s, out, t, x, z):
        return s.step(out, t, x, generator=ref_gen).prev_sample

    a, b = run_pair(ours, ref, sa_step, noises=noises)
    assert_close(a, b, 1e-5)

    # The noise is really used (τ = 1 for 200 <= t <= 800), and seeding makes own draws reproducible.
    runs = []
    for seed in (0, 0, 1):
        s = SASolverSampler(seed=seed).set_timesteps(steps)
        x = ms.Tensor(initial_latents())
        for t in s.timesteps:
            x = s.step(ms.Tensor(fake_eps(x.asnumpy(), t)), t, x)
        runs.append(x.asnumpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-3
    assert np.abs(runs[0] - a).max() > 1e-3


# ---------------------------------------------------------------------------- IDDPM: sampling
def iddpm_reference_space_timesteps(num_timesteps, count):
    """IDDPM's original respacing rule for one section, written out independently."""
    frac_stride = (num_timesteps - 1) / (count - 1)
    cur, steps = 0.0, []
    for _ in range(count):
        steps.append(round(cur))
        cur += frac_stride
    return sorted(set(steps))


def test_iddpm_respacing():
    kept = space_timesteps(T, "100")
    assert kept == iddpm_reference_space_timesteps(T, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999 and kept[:4] == [0, 10, 20, 30]
    assert space_timesteps(T, 100) == kept
    assert space_timesteps(T, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(T, "10,20")) == 30
    s = IDDPMSampler().set_timesteps(100)
    np.testing.assert_array_equal(s.timesteps, np.array(kept[::-1]))
    # Respaced betas keep ᾱ at the kept steps.
    np.testing.assert_allclose(s._respaced.tables["alphas_cumprod"], AC64[kept], rtol=1e-12)


def test_iddpm_step_matches_diffusers_ddpm_learned_range():
    """100 respaced IDDPM steps vs diffusers DDPMScheduler(variance_type="learned_range") on the same steps."""
    ours = IDDPMSampler().set_timesteps(100)
    ts = [int(t) for t in ours.timesteps]
    gen = torch.Generator().manual_seed(7)
    noises = [torch.randn(SHAPE, generator=gen).numpy() if t > 0 else None for t in ts]

    def ddpm_step(s, out, t, x, z):
        return s.step(out, t, x, generator=ref_gen).prev_sample

    for patch, atol in ((True, 1e-5), (False, 5e-5)):
        ref = DDPMScheduler(variance_type="learned_range", clip_sample=False)
        if patch:
            exact_schedule(ref)
        ref.set_timesteps(timesteps=ts)
        ref_gen = torch.Generator().manual_seed(7)  # diffusers draws one randn per step with t > 0
        ours.set_timesteps(100)
        a, b = run_pair(ours, ref, ddpm_step, model=fake_output, noises=noises)
        assert_close(a, b, atol)


def test_iddpm_single_step_against_numpy_formulas():
    """One respaced step at a mid timestep against IDDPM's formulas in float64 numpy."""
    s = IDDPMSampler().set_timesteps(100)
    kept = space_timesteps(T, 100)
    i = 50
    t, t_prev = kept[i], kept[i - 1]
    x = initial_latents(3)
    out = fake_output(x, t)
    z = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    got = s.step(ms.Tensor(out), t, ms.Tensor(x), noise=ms.Tensor(z)).asnumpy()

    a_t, a_p = AC64[t], AC64[t_prev]
    beta = 1.0 - a_t / a_p
    eps, v = out[:, :4].astype(np.float64), out[:, 4:].astype(np.float64)
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    mean = (beta * math.sqrt(a_p) / (1 - a_t)) * x0 + ((1 - a_p) * math.sqrt(1 - beta) / (1 - a_t)) * x
    post_var = beta * (1 - a_p) / (1 - a_t)
    frac = (v + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * math.log(post_var)
    want = mean + np.exp(0.5 * log_var) * z
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)

    # The last step (t = 0) returns the posterior mean, without noise.
    last = s.step(ms.Tensor(out), 0, ms.Tensor(x), noise=ms.Tensor(z)).asnumpy()
    x0 = (x - math.sqrt(1.0 - AC64[0]) * eps) / math.sqrt(AC64[0])
    np.testing.assert_allclose(last, x0, atol=2e-6, rtol=1e-5)  # coef1 = 1, coef2 = 0 at t = 0


# ---------------------------------------------------------------------------- IDDPM: training loss
def np_training_losses(model_output, x_start, x_t, t, noise):
    """IDDPM's MSE + VB (learned range, LossType.MSE) in float64 numpy, from the paper's formulas."""
    betas = np.linspace(1e-4, 0.02, T)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    c1 = betas * np.sqrt(ac_prev) / (1 - ac)
    c2 = (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)
    f64 = lambda a: np.asarray(a, dtype=np.float64)
    mo, xs, xt, nz = f64(model_output), f64(x_start), f64(x_t), f64(noise)
    C = xs.shape[1]
    eps, v = mo[:, :C], mo[:, C:]
    col = lambda arr: arr[t][:, None, None, None]

    true_mean = col(c1) * xs + col(c2) * xt
    true_logvar = col(post_logvar)
    frac = (v + 1) / 2
    model_logvar = frac * col(np.log(betas)) + (1 - frac) * col(post_logvar)
    x0 = xt / np.sqrt(col(ac)) - np.sqrt(1 / col(ac) - 1) * eps
    model_mean = col(c1) * x0 + col(c2) * xt

    kl = 0.5 * (-1 + model_logvar - true_logvar + np.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * np.exp(-model_logvar))
    kl = kl.mean(axis=(1, 2, 3)) / math.log(2)

    def cdf(u):
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))

    inv_std = np.exp(-0.5 * model_logvar)
    cdf_plus = cdf(inv_std * (xs - model_mean + 1 / 255))
    cdf_min = cdf(inv_std * (xs - model_mean - 1 / 255))
    log_probs = np.where(xs < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                         np.where(xs > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                                  np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    nll = -log_probs.mean(axis=(1, 2, 3)) / math.log(2)
    vb = np.where(t == 0, nll, kl)
    mse = ((nz - eps) ** 2).mean(axis=(1, 2, 3))
    return {"mse": mse, "vb": vb, "loss": mse + vb}


def training_batch():
    rng = np.random.default_rng(11)
    t = np.array([0, 1, 37, 500, 999], dtype=np.int64)
    n = len(t)
    x_start = np.clip(rng.standard_normal((n, 4, 8, 8)) * 0.8, -1, 1).astype(np.float32)  # hits both edges
    noise = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    x_t = (np.sqrt(AC64[t])[:, None, None, None] * x_start
           + np.sqrt(1 - AC64[t])[:, None, None, None] * noise).astype(np.float32)
    # A plausible imperfect model: ε close to the truth, v spread over [-1, 1].
    eps = noise + 0.3 * rng.standard_normal(noise.shape)
    v = np.tanh(rng.standard_normal(noise.shape))
    model_output = np.concatenate([eps, v], axis=1).astype(np.float32)
    return model_output, x_start, noise, x_t, t


def test_q_sample_matches_formula():
    model_output, x_start, noise, x_t, t = training_batch()
    s = IDDPMSampler()
    got = s.q_sample(ms.Tensor(x_start), ms.Tensor(t), ms.Tensor(noise)).asnumpy()
    np.testing.assert_allclose(got, x_t, atol=1e-6)


def test_training_losses_match_numpy_reference():
    model_output, x_start, noise, x_t, t = training_batch()
    s = IDDPMSampler()
    terms = s.training_losses(ms.Tensor(model_output), ms.Tensor(x_start), ms.Tensor(x_t),
                              ms.Tensor(t.astype(np.int32)), ms.Tensor(noise))
    want = np_training_losses(model_output, x_start, x_t, t, noise)
    for key in ("mse", "vb", "loss"):
        got = terms[key].asnumpy()
        assert got.shape == (len(t),)
        np.testing.assert_allclose(got, want[key], rtol=2e-4, atol=1e-6, err_msg=key)
    assert (want["vb"] > 0).all() and want["vb"][0] > 1.0  # decoder NLL (t=0) is a real, large term


def test_training_losses_gradient():
    model_output, x_start, noise, x_t, t = training_batch()
    s = IDDPMSampler()
    args = (ms.Tensor(x_start), ms.Tensor(x_t), ms.Tensor(t), ms.Tensor(noise))

    def mean_loss(mo):
        return s.training_losses(mo, *args)["loss"].mean()

    value, grad = ms.value_and_grad(mean_loss)(ms.Tensor(model_output))
    grad = grad.asnumpy()
    want = np_training_losses(model_output, x_start, x_t, t, noise)["loss"].mean()
    np.testing.assert_allclose(float(value), want, rtol=2e-4)
    assert np.isfinite(grad).all()

    # ε half: only the MSE contributes (the VB sees a stop-gradiented ε): d/dε mean_n mean_chw (n-ε)².
    g_eps = grad[:, :4]
    analytic = 2.0 * (model_output[:, :4] - noise) / noise.size
    np.testing.assert_allclose(g_eps, analytic, rtol=1e-4, atol=1e-9)

    # v half: the VB gradient, checked by central differences on the float64 reference.
    g_v = grad[:, 4:]
    assert np.abs(g_v).max() > 0
    h = 1e-4
    for idx in [(0, 4, 1, 2), (2, 5, 3, 3), (3, 6, 0, 7), (4, 7, 5, 1)]:
        plus, minus = model_output.astype(np.float64), model_output.astype(np.float64)
        plus[idx] += h
        minus[idx] -= h
        fd = (np_training_losses(plus, x_start, x_t, t, noise)["loss"].mean()
              - np_training_losses(minus, x_start, x_t, t, noise)["loss"].mean()) / (2 * h)
        np.testing.assert_allclose(grad[idx], fd, rtol=2e-2, atol=1e-7)


def test_training_losses_rescaled_and_eps_only():
    model_output, x_start, noise, x_t, t = training_batch()
    args = (ms.Tensor(x_start), ms.Tensor(x_t), ms.Tensor(t), ms.Tensor(noise))
    plain = IDDPMSampler().training_losses(ms.Tensor(model_output), *args)
    # RESCALED_MSE multiplies vb by T/1000, i.e. 1 on PixArt's 1000-step schedule.
    rescaled = IDDPMSampler(rescale_learned_sigmas=True).training_losses(ms.Tensor(model_output), *args)
    np.testing.assert_allclose(rescaled["vb"].asnumpy(), plain["vb"].asnumpy(), rtol=1e-6)
    half = IDDPMSampler(num_train_timesteps=500, beta_end=0.04, rescale_learned_sigmas=True)
    half_plain = IDDPMSampler(num_train_timesteps=500, beta_end=0.04)
    args500 = (args[0], args[1], ms.Tensor(t // 2), args[3])
    r = half.training_losses(ms.Tensor(model_output), *args500)["vb"].asnumpy()
    p = half_plain.training_losses(ms.Tensor(model_output), *args500)["vb"].asnumpy()
    np.testing.assert_allclose(r, 0.5 * p, rtol=1e-6)
    # An ε-only output gives the MSE alone.
    eps_only = IDDPMSampler().training_losses(ms.Tensor(model_output[:, :4]), *args)
    assert set(eps_only) == {"mse", "loss"}
    np.testing.assert_allclose(eps_only["loss"].asnumpy(), plain["mse"].asnumpy(), rtol=1e-6)


# ---------------------------------------------------------------------------- factory / interface
def test_build_sampler_and_interface():
    assert DEFAULT_STEPS == {"dpm": 20, "sa-solver": 25, "ddim": 50, "iddpm": 100, "lcm": 4}
    for name, cls in (("dpm", DPMSolverSampler), ("sa-solver", SASolverSampler), ("ddim", DDIMSampler),
                      ("iddpm", IDDPMSampler), ("lcm", LCMSampler)):
        s = build_sampler(name)
        assert isinstance(s, cls)
        assert len(s.timesteps) == DEFAULT_STEPS[name] and s.timesteps.dtype == np.int64
        assert (np.diff(s.timesteps) < 0).all() and s.init_noise_sigma == 1.0
        # One step on an 8-channel output keeps shape and dtype.
        x = ms.Tensor(initial_latents())
        y = s.step(ms.Tensor(fake_output(x.asnumpy(), s.timesteps[0])), s.timesteps[0], x)
        assert y.shape == x.shape and y.dtype == ms.float32
    assert isinstance(build_sampler("DPM-Solver"), DPMSolverSampler)
    assert isinstance(build_sampler("sa_solver"), SASolverSampler)
    assert build_sampler("ddim", eta=0.3).eta == 0.3
    assert len(build_sampler("dpm", num_inference_steps=14).timesteps) == 14
    with pytest.raises(ValueError):
        build_sampler("euler")
    with pytest.raises(RuntimeError):
        DPMSolverSampler().step(ms.Tensor(initial_latents()), 999, ms.Tensor(initial_latents()))


def test_float16_sample_keeps_dtype():
    s = DPMSolverSampler().set_timesteps(4)
    x = ms.Tensor(initial_latents()).astype(ms.float16)
    out = ms.Tensor(fake_output(initial_latents(), s.timesteps[0])).astype(ms.float16)
    y = s.step(out, s.timesteps[0], x)
    assert y.dtype == ms.float16 and np.isfinite(y.asnumpy()).all()
    assert ops.isfinite(y).all()


def test_training_losses_under_jit():
    """The train step may compile its grad function: q_sample + training_losses work under ms.jit."""
    model_output, x_start, noise, x_t, t = training_batch()
    s = IDDPMSampler()

    def mean_loss(mo, xs, tt, nz):
        return s.training_losses(mo, xs, s.q_sample(xs, tt, nz), tt, nz)["loss"].mean()

    inputs = (ms.Tensor(model_output), ms.Tensor(x_start), ms.Tensor(t), ms.Tensor(noise))
    eager_value, eager_grad = ms.value_and_grad(mean_loss)(*inputs)
    jit_value, jit_grad = ms.jit(ms.value_and_grad(mean_loss))(*inputs)
    np.testing.assert_allclose(float(jit_value), float(eager_value), rtol=1e-5)
    np.testing.assert_allclose(jit_grad.asnumpy(), eager_grad.asnumpy(), rtol=1e-4, atol=1e-9)
