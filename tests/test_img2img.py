"""img2img and inpainting (Σ and α) on tiny random pipelines.

img2img is checked against diffusers' PixArtSigmaPipeline run on the same truncated schedule from the
same noised latents (diffusers has no PixArt img2img pipeline; its img2img pipelines do exactly this);
inpainting by its guarantees, with a perfect stand-in denoiser: the kept latents end exactly at the
image latents, the masked ones at the denoiser's picture, and the kept pixels stay within the VAE
round-trip error.
"""
import numpy as np
import pytest
import torch

from pixart import PixArtAlphaPipeline, PixArtSigmaPipeline
from pixart.pipelines.img2img import strength_timesteps
from pixart.utils.errors import ConfigError
from tiny_models import make_pipeline_folder, seeded_latents

PROMPT = "a small cactus with a happy face"
FAST = dict(num_inference_steps=4, use_resolution_binning=False, progress=False, output_type="np")


def make_image(height, width):
    """A smooth (H, W, 3) float32 picture in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width] / 64.0
    return np.stack([0.5 + 0.4 * np.sin(3 * xx), 0.5 + 0.4 * np.cos(2 * yy + xx), 0.3 + 0.3 * yy],
                    axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def sigma_folder(tmp_path_factory):
    return make_pipeline_folder(tmp_path_factory.mktemp("sigma"), "sigma", sample_size=32)


def vae_round_trip(pipe, image):
    import mindspore as ms

    x = ms.Tensor(image.transpose(2, 0, 1)[None] * 2.0 - 1.0)
    decoded = pipe.vae.decode(pipe.vae.encode(x).mode()).asnumpy()[0].transpose(1, 2, 0)
    return np.clip(decoded / 2 + 0.5, 0.0, 1.0)


def test_strength_schedule_rule():
    ts = np.arange(19, -1, -1) * 50  # 20 descending timesteps
    assert len(strength_timesteps(ts, 0.5)) == 10 and strength_timesteps(ts, 0.5)[0] == ts[10]
    assert len(strength_timesteps(ts, 1.0)) == 20 and len(strength_timesteps(ts, 0.0)) == 0
    assert len(strength_timesteps(ts, 0.33)) == 6  # int(20 · 0.33), as diffusers' get_timesteps


def test_strength_zero_is_the_vae_round_trip(sigma_folder):
    import diffusers

    image = make_image(64, 96)
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    steps = []
    out = pipe(PROMPT, image=image, strength=0.0, seed=0, callback=lambda *a: steps.append(a), **FAST).images[0]
    assert steps == [] and out.shape == (64, 96, 3)  # no denoising step, size taken from the image
    np.testing.assert_allclose(out, vae_round_trip(pipe, image), atol=1e-5)  # x·sf/sf: float rounding
    ref_vae = diffusers.AutoencoderKL.from_pretrained(str(sigma_folder / "vae"))
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1)[None] * 2.0 - 1.0)
        ref = ref_vae.decode(ref_vae.encode(x).latent_dist.mean).sample[0].numpy().transpose(1, 2, 0)
    ref = np.clip(ref / 2 + 0.5, 0.0, 1.0)
    assert np.abs(out - ref).max() <= 2 / 255 and np.abs(out - image).max() > 0.05  # a real (lossy) round trip


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers_on_the_truncated_schedule(sigma_folder, strength):
    import diffusers

    height, width, steps = 64, 96, 10
    image = make_image(height, width)
    noise = seeded_latents((1, 4, height // 8, width // 8), seed=2)
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", height=height, width=width)
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    visited = []
    out = pipe(image=image, strength=strength, latents=noise, num_inference_steps=steps, use_resolution_binning=False,
               output_type="np", progress=False, callback=lambda i, t, x: visited.append(t), **kwargs).images[0]

    ref_pipe = diffusers.PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    ref_pipe.set_progress_bar_config(disable=True)
    full = diffusers.DPMSolverMultistepScheduler()
    full.set_timesteps(steps)
    run = full.timesteps.numpy()[steps - int(steps * strength):]
    assert visited == run.tolist()
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1)[None] * 2.0 - 1.0)
        latents = ref_pipe.vae.encode(x).latent_dist.mean * ref_pipe.vae.config.scaling_factor
        start = full.add_noise(latents, torch.from_numpy(noise), torch.tensor([int(run[0])]))
        ref = ref_pipe(latents=start, timesteps=run.tolist(), use_resolution_binning=False, output_type="np",
                       **kwargs).images[0]
    assert np.abs(out - ref).max() <= 2 / 255
    assert np.abs(out - vae_round_trip(pipe, image)).max() > 0.05  # the steps did change the picture


class OracleDenoiser:
    """A stand-in DiT that predicts the ε taking x_t to fixed target latents (a perfect denoiser for
    one picture), so the inpainted result is known: target inside the mask, the image outside."""

    base_size, patch_size, in_channels, micro_condition = 4, 2, 4, False

    def __init__(self, target):
        self.target = target
        self.alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))

    def text_context(self, y):  # the pipeline's per-prompt precompute; this denoiser ignores the text
        return y

    def __call__(self, x, t, y, y_mask):
        import mindspore as ms

        a = self.alphas_cumprod[int(t.asnumpy()[0])]
        return ms.Tensor(((x.asnumpy() - np.sqrt(a) * self.target) / np.sqrt(1.0 - a)).astype(np.float32))


def test_inpainting_keeps_the_unmasked_area(sigma_folder):
    import mindspore as ms

    height, width = 64, 128
    image = make_image(height, width)
    other = 1.0 - image  # the picture the denoiser knows: the negative
    mask = np.zeros((height, width), np.float32)
    mask[8:40, 8:40] = 1.0  # white = repaint: latent cells [1:5, 1:5]
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder), low_memory=False)
    encode = lambda im: (pipe.vae.encode(ms.Tensor(im.transpose(2, 0, 1)[None] * 2.0 - 1.0)).mode()  # noqa: E731
                         * pipe.vae.scaling_factor).asnumpy()
    image_latents, target = encode(image), encode(other)
    pipe._loaded["transformer"] = OracleDenoiser(target)
    common = dict(prompt=PROMPT, image=image, mask_image=mask, seed=3, num_inference_steps=10, guidance_scale=1.0,
                  use_resolution_binning=False, progress=False)

    lat = pipe(output_type="latent", **common).images.asnumpy()
    keep = np.ones((height // 8, width // 8), bool)
    keep[1:5, 1:5] = False
    np.testing.assert_array_equal(lat[0][:, keep], image_latents[0][:, keep])  # exactly the image latents
    np.testing.assert_allclose(lat[0][:, ~keep], target[0][:, ~keep], atol=1e-5)  # the denoiser's picture
    assert np.abs(target - image_latents)[0][:, ~keep].max() > 0.03  # (random-VAE latents are small)

    # Pixels outside the mask stay within the VAE round-trip error of the image.
    out = pipe(output_type="np", **common).images[0]
    kept = mask < 0.5
    round_trip_error = np.abs(vae_round_trip(pipe, image) - image)[kept]
    error = np.abs(out - image)[kept]
    assert error.max() <= round_trip_error.max() + 1e-3
    assert error.mean() <= 1.1 * round_trip_error.mean()
    assert np.abs(out - vae_round_trip(pipe, image))[~kept].max() > 0.05  # the masked area was repainted
    # A PIL mask (L, 0/255) of the same area gives the same image.
    from PIL import Image
    pil = pipe(output_type="np", **dict(common, mask_image=Image.fromarray((mask * 255).astype(np.uint8)))).images[0]
    np.testing.assert_array_equal(pil, out)


def test_seeds_reproduce_and_batches_do_not_change_an_image(sigma_folder):
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    image = make_image(64, 64)
    mask = np.zeros((64, 64), np.float32)
    mask[:, 32:] = 1.0
    run = lambda prompts, seed, **kw: np.stack(pipe(prompts, image=image, seed=seed, strength=0.6,  # noqa: E731
                                                    **FAST, **kw).images)
    pair = run([PROMPT, "a red boat"], 5)
    assert np.abs(run(["a red boat"], 6)[0] - pair[1]).max() <= 1e-5  # image k uses seed + k
    assert np.abs(run([PROMPT], 7)[0] - pair[0]).max() > 1e-3  # another seed, another noise
    inpainted = run([PROMPT], 5, mask_image=mask)  # the same seed, twice: the same pixels
    np.testing.assert_array_equal(inpainted, run([PROMPT], 5, mask_image=mask))


def test_alpha_img2img_runs_with_micro_conditions(tmp_path):
    folder = make_pipeline_folder(tmp_path / "alpha", "alpha", sample_size=128)
    pipe = PixArtAlphaPipeline.from_pretrained(str(folder))
    out = pipe(PROMPT, image=make_image(64, 96), mask_image=np.ones((64, 96), np.float32), strength=0.75,
               seed=1, **FAST).images[0]
    assert out.shape == (64, 96, 3) and np.isfinite(out).all()


def test_bad_image_input(sigma_folder, tmp_path):
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    image = make_image(64, 64)
    for strength in (1.5, -0.1, "strong"):
        with pytest.raises(ConfigError, match="strength must be"):
            pipe(PROMPT, image=image, strength=strength, **FAST)
    with pytest.raises(ConfigError, match="mask_image is 32x64 but the init image is 64x64"):
        pipe(PROMPT, image=image, mask_image=np.zeros((64, 32), np.float32), **FAST)
    with pytest.raises(ConfigError, match="mask_image needs an init image"):
        pipe(PROMPT, mask_image=np.zeros((64, 64), np.float32), **FAST)
    with pytest.raises(ConfigError, match=r"\(H, W, 3\) RGB array"):
        pipe(PROMPT, image=np.zeros((64, 64), np.float32), **FAST)
    with pytest.raises(ConfigError, match=r"values must lie in \[0, 1\]"):
        pipe(PROMPT, image=image * 255.0, **FAST)
    with pytest.raises(ConfigError, match="does not exist"):
        pipe(PROMPT, image=str(tmp_path / "missing.png"), **FAST)
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ConfigError, match="not a readable image"):
        pipe(PROMPT, image=str(tmp_path / "bad.png"), **FAST)


# ---------------------------------------------------------------------------- sample.py
def test_sample_cli_img2img_and_inpainting(sigma_folder, tmp_path):
    from PIL import Image
    from test_sample_cli import assert_one_line_error, run_sample

    image = (make_image(64, 96) * 255).round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "init.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--pretrained_path", sigma_folder, "--prompt", "a cat", "--init_image", tmp_path / "init.png",
              "--use_resolution_binning", "False", "--sampling_steps", 4, "--mode", "pynative"]
    result = run_sample(*common, "--mask_image", tmp_path / "mask.png", "--output_path", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    png = Image.open(tmp_path / "out" / "00000.png")
    assert png.size == (96, 64)  # the init image's size
    assert png.text["init_image"] == "init.png" and png.text["mask_image"] == "mask.png"
    assert png.text["strength"] == "1.0"
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    want = pipe("a cat", image=str(tmp_path / "init.png"), mask_image=str(tmp_path / "mask.png"), seed=42,
                num_inference_steps=4, use_resolution_binning=False, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(png), np.asarray(want))  # the same pixels as the Python API

    assert_one_line_error(run_sample(*common, "--strength", "1.5"), "strength must be in [0, 1]")
    Image.fromarray(mask[:32]).save(tmp_path / "small.png")
    assert_one_line_error(run_sample(*common, "--mask_image", tmp_path / "small.png"),
                          "mask_image is 96x32 but the init image is 96x64")
    assert_one_line_error(run_sample("--pretrained_path", sigma_folder, "--strength", "0.5"), "need --init_image")


def test_demo_form_checks_image_inputs(tmp_path):
    from PIL import Image
    from demo import parse_request

    Image.fromarray((make_image(64, 96) * 255).astype(np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(np.zeros((32, 96), np.uint8)).save(tmp_path / "small.png")
    form = dict(prompt="a cat", negative_prompt="", size="custom", width=96, height=64, sampler="lcm", steps=4,
                guidance_scale=1.0, seed=3, randomize_seed=False, init_image=str(tmp_path / "init.png"),
                mask_image=None, strength=0.5)
    check = lambda **change: parse_request(dict(form, **change), set(), ["dpm", "lcm"], 50)  # noqa: E731
    req = check()
    assert (req.init_image, req.mask_image, req.strength, req.sampler) == (form["init_image"], None, 0.5, "lcm")
    assert check(init_image=None).strength is None  # text-to-image
    with pytest.raises(ConfigError, match="strength must be in"):
        check(strength=1.5)
    with pytest.raises(ConfigError, match="mask_image is 96x32 but the init image is 96x64"):
        check(mask_image=str(tmp_path / "small.png"))
    with pytest.raises(ConfigError, match="A mask needs an init image"):
        check(init_image=None, mask_image=str(tmp_path / "small.png"))
