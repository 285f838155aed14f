"""Few-step sampling: the LCM sampler and custom timesteps against diffusers (PyTorch).

Sampler level: the same fake model as tests/test_samplers.py (a fixed numpy function of (x, t)).
Pipeline level: the tiny PixArt-α 1024-MS folder (micro-conditions, as PixArt-LCM-XL-2-1024-MS) with
diffusers' LCMScheduler at 4 steps and guidance 0 (no CFG), and PixArt-α-DMD's one step at t=400.
"""
import numpy as np
import pytest
import torch
import mindspore as ms
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from pixart import PixArtAlphaPipeline
from pixart.samplers import DDIMSampler, DEFAULT_STEPS, DPMSolverSampler, IDDPMSampler, LCMSampler, build_sampler
from pixart.samplers.lcm import LCMSampler as _LCM
from pixart.utils.errors import ConfigError
from test_samplers import SHAPE, AC64, assert_close, exact_schedule, fake_eps, fake_output, initial_latents, run_pair
from tiny_models import make_pipeline_folder, seeded_latents

# PixArt-LCM-XL-2-1024-MS/scheduler/scheduler_config.json (the keys that differ from LCMScheduler's defaults)
PIXART_LCM_CONFIG = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", original_inference_steps=50,
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True)


def torch_noises(count, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen).numpy() for _ in range(count)]


def lcm_step(gen):
    """diffusers draws randn_tensor(model_output.shape, generator) on every step but the last."""
    def _step(s, out, t, x, z):
        return s.step(out, t, x, generator=gen).prev_sample
    return _step


# ---------------------------------------------------------------------------- LCM sampler
@pytest.mark.parametrize("steps", [4, 1, 8])
def test_lcm_matches_diffusers(steps):
    ours = LCMSampler().set_timesteps(steps)
    stock = LCMScheduler(**PIXART_LCM_CONFIG)
    stock.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, stock.timesteps.numpy())
    if steps == 4:
        np.testing.assert_array_equal(ours.timesteps, [999, 759, 499, 259])
    noises = torch_noises(steps)  # the last step draws none

    exact = exact_schedule(LCMScheduler(**PIXART_LCM_CONFIG))
    exact.set_timesteps(steps)
    a, b = run_pair(ours, exact, lcm_step(torch.Generator().manual_seed(1234)), noises=noises)
    assert_close(a, b, 1e-5)
    assert np.abs(a).max() > 0.1

    # diffusers as shipped (float32 ᾱ): the same up to the schedule's rounding.
    ours.set_timesteps(steps)
    a2, b2 = run_pair(ours, stock, lcm_step(torch.Generator().manual_seed(1234)), noises=noises)
    np.testing.assert_array_equal(a, a2)
    assert_close(a2, b2, 5e-5)


def test_lcm_custom_timesteps_match_diffusers():
    for ts in ([400], [999, 499], [879, 599, 259, 59]):
        ours = LCMSampler().set_timesteps(timesteps=ts)
        ref = exact_schedule(LCMScheduler(**PIXART_LCM_CONFIG))
        ref.set_timesteps(timesteps=ts)
        np.testing.assert_array_equal(ours.timesteps, ts)
        a, b = run_pair(ours, ref, lcm_step(torch.Generator().manual_seed(5)), noises=torch_noises(len(ts), 5))
        assert_close(a, b, 1e-5)


def test_lcm_noise_boundary_scalings_and_seeding():
    s = LCMSampler()
    c_skip, c_out = s.boundary_scalings(999)
    assert c_skip == pytest.approx(0.25 / (9990.0**2 + 0.25), rel=1e-12)
    assert c_out == pytest.approx(9990.0 / (9990.0**2 + 0.25) ** 0.5, rel=1e-12)
    # A one-step schedule draws no noise: the result is the clean estimate, whatever the generator.
    x = ms.Tensor(initial_latents())
    one = [LCMSampler(seed=seed).set_timesteps(timesteps=[499]) for seed in (0, 1)]
    outs = [o.step(ms.Tensor(fake_output(x.asnumpy(), 499)), 499, x).asnumpy() for o in one]
    np.testing.assert_array_equal(outs[0], outs[1])
    eps = fake_eps(x.asnumpy(), 499).astype(np.float64)
    x0 = (x.asnumpy() - np.sqrt(1 - AC64[499]) * eps) / np.sqrt(AC64[499])
    c_skip, c_out = s.boundary_scalings(499)
    np.testing.assert_allclose(outs[0], c_out * x0 + c_skip * x.asnumpy(), atol=2e-6)
    # Multistep: the noise is injected, drawn from the seeded generator.
    runs = []
    for seed in (0, 0, 1):
        s = LCMSampler(seed=seed).set_timesteps(4)
        y = x
        for t in s.timesteps:
            y = s.step(ms.Tensor(fake_eps(y.asnumpy(), t)), t, y)
        runs.append(y.asnumpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-3
    assert build_sampler("lcm").num_inference_steps == DEFAULT_STEPS["lcm"] == 4


# ---------------------------------------------------------------------------- custom timesteps
def test_dpm_custom_timesteps_match_diffusers():
    ts = [999, 850, 600, 400, 250, 100, 30]
    ours = DPMSolverSampler().set_timesteps(timesteps=ts)
    ref = DPMSolverMultistepScheduler()
    ref.set_timesteps(timesteps=ts)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    a, b = run_pair(ours, ref, lambda s, out, t, x, z: s.step(out, t, x).prev_sample)
    assert_close(a, b, 1e-5)


def test_iddpm_custom_timesteps_match_diffusers_ddpm():
    # Ending at t=0: diffusers' DDPM would add learned-range noise after a last step at t > 0 (its variance
    # floor is 1e-20, not 0), IDDPM's respaced chain never noises its last step.
    ts = [999, 700, 400, 0]
    ours = IDDPMSampler().set_timesteps(timesteps=ts)
    np.testing.assert_array_equal(ours.timesteps, ts)
    gen = torch.Generator().manual_seed(3)
    noises = [torch.randn(SHAPE, generator=gen).numpy() for _ in ts]  # DDPM draws one per step (t > 0)
    ref = exact_schedule(DDPMScheduler(variance_type="learned_range", clip_sample=False))
    ref.set_timesteps(timesteps=ts)
    ref_gen = torch.Generator().manual_seed(3)
    a, b = run_pair(ours, ref, lambda s, out, t, x, z: s.step(out, t, x, generator=ref_gen).prev_sample,
                    model=fake_output, noises=noises)
    assert_close(a, b, 1e-5)


def test_one_step_at_400_is_the_x0_prediction_for_every_sampler():
    """PixArt-α-DMD: one step at t=400 returns x0 = (x - sqrt(1-ᾱ) ε) / sqrt(ᾱ) (what its demo takes:
    DDPMScheduler's pred_original_sample). DPM-Solver++, DDIM and IDDPM land there (SA-Solver ends at σ(t=0))."""
    x = initial_latents(2)
    eps = fake_eps(x, 400)
    want = (x - np.sqrt(1 - AC64[400]) * eps.astype(np.float64)) / np.sqrt(AC64[400])
    for name in ("dpm", "ddim", "iddpm"):
        s = build_sampler(name, timesteps=[400])
        np.testing.assert_array_equal(s.timesteps, [400])
        got = s.step(ms.Tensor(eps), 400, ms.Tensor(x), noise=ms.Tensor(np.zeros(SHAPE, np.float32))).asnumpy()
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=name)


def test_ddim_custom_timesteps_equal_its_own_schedule():
    standard = DDIMSampler().set_timesteps(20)
    custom = DDIMSampler().set_timesteps(timesteps=standard.timesteps.tolist())
    ref = DDIMSampler().set_timesteps(20)
    a, _ = run_pair(custom, ref, lambda s, out, t, x, z: x)
    b, _ = run_pair(standard, ref, lambda s, out, t, x, z: x)
    np.testing.assert_array_equal(a, b)
    # A non-uniform custom schedule really is different.
    c, _ = run_pair(DDIMSampler().set_timesteps(timesteps=[999, 900, 500, 20]), ref, lambda s, out, t, x, z: x)
    assert np.abs(c - a).max() > 1e-3


@pytest.mark.parametrize("bad,match", [([400, 400], "strictly descending"), ([100, 400], "strictly descending"),
                                       ([1000], r"\[0, 999\]"), ([-1], r"\[0, 999\]"), ([], "non-empty"),
                                       ([400.5], "integers")])
def test_bad_custom_timesteps(bad, match):
    for cls in (DPMSolverSampler, DDIMSampler, LCMSampler, IDDPMSampler):
        with pytest.raises(ValueError, match=match):
            cls().set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="exactly one"):
        LCMSampler().set_timesteps(4, timesteps=[400])
    with pytest.raises(ValueError, match="original_inference_steps"):
        LCMSampler().set_timesteps(51)


# ---------------------------------------------------------------------------- pipelines vs diffusers
@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """A tiny PixArt-LCM-XL-2-1024-MS: α 1024-MS layout, LCMScheduler in scheduler/."""
    folder = make_pipeline_folder(tmp_path_factory.mktemp("lcm"), "alpha", sample_size=128)
    LCMScheduler(**PIXART_LCM_CONFIG).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def dmd_folder(tmp_path_factory):
    """A tiny PixArt-α 512x512 layout (no micro-conditions), as PixArt-Alpha-DMD-XL-2-512x512."""
    folder = make_pipeline_folder(tmp_path_factory.mktemp("dmd"), "alpha", sample_size=64)
    DDPMScheduler(clip_sample=False).save_pretrained(folder / "scheduler")
    return folder


def diffusers_images(folder, latents, scheduler, **kwargs):
    import diffusers

    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(str(folder), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(latents=torch.from_numpy(latents), use_resolution_binning=False, output_type="np",
                    **kwargs).images


def test_pixart_lcm_pipeline_matches_diffusers(lcm_folder, monkeypatch):
    """4 LCM steps, guidance 0: the folder's LCMScheduler selects our LCM sampler; the noise our sampler
    injects between steps is replayed into diffusers' LCMScheduler."""
    height, width = 64, 96
    latents = seeded_latents((2, 4, height // 8, width // 8), seed=4)
    pipe = PixArtAlphaPipeline.from_pretrained(str(lcm_folder))
    assert pipe.sampler_name == "lcm"
    assert pipe.sampler_kwargs == {"original_inference_steps": 50, "timestep_scaling": 10.0}

    used = []
    original = _LCM._noise

    def recording_noise(self, shape, noise=None):
        z = original(self, shape, noise)
        used.append(z.asnumpy())
        return z

    monkeypatch.setattr(_LCM, "_noise", recording_noise)
    kwargs = dict(prompt=["a small cactus with a happy face", "a red boat"], num_inference_steps=4,
                  guidance_scale=0.0, height=height, width=width)
    out = np.stack(pipe(latents=latents, seed=3, use_resolution_binning=False, output_type="np", progress=False,
                        **kwargs).images)
    assert len(used) == 3 and np.abs(used[0]).std() > 0.5

    import diffusers.schedulers.scheduling_lcm as lcm_module
    replay = iter(used)
    monkeypatch.setattr(lcm_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(replay)))
    ref = diffusers_images(lcm_folder, latents, LCMScheduler(**PIXART_LCM_CONFIG), **kwargs)
    assert ref.std() > 0.05 and out.shape == ref.shape == (2, height, width, 3)
    assert np.abs(out - ref).max() <= 2 / 255
    # Same seed, same images; another seed injects other noise.
    again = np.stack(pipe(latents=latents, seed=3, use_resolution_binning=False, output_type="np", progress=False,
                          **kwargs).images)
    np.testing.assert_array_equal(out, again)
    other = np.stack(pipe(latents=latents, seed=4, use_resolution_binning=False, output_type="np", progress=False,
                          **kwargs).images)
    assert np.abs(other - out).max() > 1e-2


def test_dmd_one_step_pipeline_matches_diffusers(dmd_folder):
    """PixArt-α-DMD: timesteps=[400], guidance 1 (no CFG); diffusers' DDPMScheduler (clip_sample off: latents
    are not in [-1, 1]) with timesteps=[400], whose last step is the x0 prediction up to a 1e-10 variance
    term, against our DPM-Solver++, DDIM and LCM."""
    latents = seeded_latents((1, 4, 8, 8), seed=6)
    kwargs = dict(prompt="a small cactus with a happy face", guidance_scale=1.0, height=64, width=64)
    ref = diffusers_images(dmd_folder, latents, DDPMScheduler(clip_sample=False), timesteps=[400], **kwargs)
    for sampler in ("dpm", "ddim", "lcm"):
        pipe = PixArtAlphaPipeline.from_pretrained(str(dmd_folder), sampler=sampler)
        steps = []
        out = np.stack(pipe(latents=latents, timesteps=[400], use_resolution_binning=False, output_type="np",
                            progress=False, callback=lambda i, t, x: steps.append(t), **kwargs).images)
        assert steps == [400]
        # LCM's boundary condition keeps c_skip = 1.6e-8 of x_t: still the same picture.
        assert np.abs(out - ref).max() <= 2 / 255, sampler
    assert ref.std() > 0.05


def test_pipeline_bad_timesteps(lcm_folder):
    pipe = PixArtAlphaPipeline.from_pretrained(str(lcm_folder))
    size = dict(height=64, width=64, use_resolution_binning=False, progress=False)
    with pytest.raises(ConfigError, match="strictly descending"):
        pipe("a cat", timesteps=[100, 400], **size)
    with pytest.raises(ConfigError, match="original_inference_steps"):
        pipe("a cat", num_inference_steps=60, **size)


def test_sample_cli_timesteps(dmd_folder, tmp_path):
    from PIL import Image
    from test_sample_cli import assert_one_line_error, run_sample

    common = ["--pretrained_path", dmd_folder, "--version", "alpha", "--prompt", "a cat", "--image_width", 64,
              "--image_height", 64, "--use_resolution_binning", "False", "--mode", "pynative"]
    result = run_sample(*common, "--timesteps", 400, "--guidance_scale", 1, "--output_path", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    png = Image.open(tmp_path / "out" / "00000.png")
    assert png.text["timesteps"] == "400" and png.text["steps"] == "1"
    pipe = PixArtAlphaPipeline.from_pretrained(str(dmd_folder))
    want = pipe("a cat", timesteps=[400], guidance_scale=1.0, seed=42, height=64, width=64,
                use_resolution_binning=False, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(png), np.asarray(want))
    assert_one_line_error(run_sample(*common, "--timesteps", 100, 400), "strictly descending")
