"""ControlNet sampling end to end: the pipeline's images match a PyTorch reference (diffusers'
PixArt-Σ pipeline around the research ControlNet forward) on tiny weights; sample.py
--controlnet/--control_image; one-line errors for bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pixart import PixArtSigmaPipeline
from pixart.utils.errors import CheckpointError, ConfigError
from test_controlnet import RefControlNet, ref_forward, save_research_layout
from tiny_models import make_pipeline_folder, seeded_latents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 2 / 255
PROMPTS = ["a red house in the forest", "a boat on the river at night"]


def edge_image(height, width, seed=0):
    """A uint8 (H, W, 3) black-and-white picture of lines, like an edge map."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width), np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            image[rng.integers(height), :] = 255
        else:
            image[:, rng.integers(width)] = 255
    return np.repeat(image[..., None], 3, axis=-1)


class RefControlTransformer(torch.nn.Module):
    """What diffusers' PixArt pipeline calls as its transformer: the research ControlNet forward
    with fixed hint latents (2B rows: the same for the unguided and guided halves)."""

    def __init__(self, transformer, controlnet, control):
        super().__init__()
        self.transformer, self.controlnet, self.control = transformer, controlnet, control
        self.config = transformer.config

    @property
    def dtype(self):
        return torch.float32

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_attention_mask=None, timestep=None,
                added_cond_kwargs=None, return_dict=False, **_):
        out = ref_forward(self.transformer, self.controlnet, hidden_states.numpy(), timestep.numpy(),
                          encoder_hidden_states.numpy(), encoder_attention_mask.numpy(), self.control)
        return (torch.from_numpy(out),)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnpipe")
    folder = make_pipeline_folder(root / "sigma", "sigma", sample_size=32)
    control_ref = RefControlNet(layers=1, heads=2, seed=3)  # the tiny DiT has 2 blocks
    return folder, save_research_layout(control_ref, root / "controlnet"), control_ref


def reference_images(folder, control_ref, control_image, latents, **kwargs):
    import diffusers

    pipe = diffusers.PixArtSigmaPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = torch.from_numpy(control_image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        hint = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
        hint = hint.repeat(2 * latents.shape[0], 1, 1, 1).numpy()
        transformer = RefControlTransformer(pipe.transformer, control_ref, hint)
        pipe.transformer = transformer
        out = pipe(latents=torch.from_numpy(latents), use_resolution_binning=False, output_type="np", **kwargs)
    return out.images


def test_sigma_controlnet_images_match_the_reference(folders):
    folder, controlnet, control_ref = folders
    height, width = 64, 96
    control = edge_image(height, width)
    latents = seeded_latents((2, 4, height // 8, width // 8), seed=2)
    kwargs = dict(prompt=PROMPTS, negative_prompt="blurry", num_inference_steps=8, height=height, width=width)
    ref = reference_images(folder, control_ref, control, latents, **kwargs)
    pipe = PixArtSigmaPipeline.from_pretrained(str(folder), controlnet=controlnet)
    out = np.stack(pipe(latents=latents, use_resolution_binning=False, output_type="np", progress=False,
                        control_image=control, **kwargs).images)
    assert out.shape == ref.shape == (2, height, width, 3)
    assert ref.std() > 0.05
    assert np.abs(out - ref).max() <= TOLERANCE
    plain = np.stack(pipe(latents=latents, use_resolution_binning=False, output_type="np", progress=False,
                          **kwargs).images)
    assert np.abs(plain - out).max() > 10 * TOLERANCE  # the control changes the picture
    # [0, 1] floats and PIL give the same hint as uint8
    again = pipe(latents=latents[:1], use_resolution_binning=False, output_type="np", progress=False,
                 control_image=Image.fromarray(control), **{**kwargs, "prompt": PROMPTS[:1]}).images[0]
    assert np.abs(again - out[0]).max() <= 1e-5


def test_default_size_is_the_control_images_and_binning_resizes_it(folders):
    folder, controlnet, _ = folders
    pipe = PixArtSigmaPipeline.from_pretrained(str(folder), controlnet=controlnet, mode="pynative")
    sizes = []
    image = pipe(PROMPTS[0], seed=0, num_inference_steps=2, control_image=edge_image(200, 120), progress=False,
                 callback=lambda i, t, x: sizes.append(tuple(x.shape[2:]))).images[0]
    assert image.size == (120, 200)  # the control image's size, generated at the nearest bin
    assert sizes[0] != (25, 15)


def test_bad_input_is_one_line(folders, tmp_path):
    folder, controlnet, _ = folders
    pipe = PixArtSigmaPipeline.from_pretrained(str(folder), controlnet=controlnet)
    call = dict(num_inference_steps=1, progress=False, use_resolution_binning=False)
    with pytest.raises(ConfigError, match=r"control image is 96x64 .* requested size is 64x64"):
        pipe(PROMPTS[0], control_image=edge_image(64, 96), height=64, width=64, **call)
    for scale in (1.5, -0.1):
        with pytest.raises(ConfigError, match=r"controlnet_conditioning_scale must be in \[0, 1\]"):
            pipe(PROMPTS[0], control_image=edge_image(64, 64), controlnet_conditioning_scale=scale, **call)
    with pytest.raises(ConfigError, match="float control image must be in"):
        pipe(PROMPTS[0], control_image=np.full((64, 64, 3), 2.0, np.float32), **call)
    with pytest.raises(ConfigError, match="needs a ControlNet"):
        PixArtSigmaPipeline.from_pretrained(str(folder))(PROMPTS[0], control_image=edge_image(64, 64), **call)
    wide = RefControlNet(layers=1, heads=3)  # hidden 24: made for another base model
    wrong = PixArtSigmaPipeline.from_pretrained(str(folder), controlnet=save_research_layout(wide, tmp_path / "w"))
    with pytest.raises(CheckpointError, match="made for a .* base model, not this"):
        wrong(PROMPTS[0], control_image=edge_image(64, 64), **call)


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def test_sample_cli_controlnet(folders, tmp_path):
    folder, controlnet, _ = folders
    control = tmp_path / "edges.png"
    Image.fromarray(edge_image(64, 96)).save(control)
    out = tmp_path / "out"
    result = run_sample("--pretrained_path", folder, "--prompt", "a red car", "--controlnet", controlnet,
                        "--control_image", control, "--controlnet_conditioning_scale", 0.8, "--sampling_steps", 2,
                        "--output_path", out)
    assert result.returncode == 0, result.stderr
    image = Image.open(out / "00000.png")
    assert image.size == (96, 64)
    assert image.text["controlnet"] == "controlnet" and image.text["control_image"] == control.name
    assert image.text["controlnet_conditioning_scale"] == "0.8"
    for args, message in [(("--controlnet_conditioning_scale", 2), "must be in [0, 1]"),
                          (("--image_width", 64, "--image_height", 64), "requested size is 64x64"),
                          (("--control_image", tmp_path / "missing.png"), "not found")]:
        bad = run_sample("--pretrained_path", folder, "--controlnet", controlnet, "--control_image", control,
                         "--sampling_steps", 1, "--output_path", out, *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and lines[-1].startswith("error:") and message in lines[-1], bad.stderr


def test_demo_generator_takes_an_uploaded_control_image(folders):
    from demo import Generator, build_parser, parse_request

    folder, controlnet, _ = folders
    args = build_parser().parse_args(["--pretrained_path", str(folder), "--controlnet", controlnet,
                                      "--mode", "pynative"])
    gen = Generator(args)
    form = dict(prompt="a cat", negative_prompt="", size="custom", width=64, height=64, sampler="dpm", steps=2,
                guidance_scale=4.5, seed=1, randomize_seed=False, control_image=edge_image(64, 96), control_scale=0.5)
    req = parse_request(form, gen.allowed_sizes(), gen.samplers, 50)
    image, fields = gen(req)
    assert image.size == (96, 64)  # the control image's size, not the form's
    assert fields["controlnet_conditioning_scale"] == 0.5 and fields["controlnet"] == "controlnet"
    with pytest.raises(ConfigError, match="Upload a control image"):
        parse_request(dict(form, control_image=None), gen.allowed_sizes(), gen.samplers, 50)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        parse_request(dict(form, control_scale=1.5), gen.allowed_sizes(), gen.samplers, 50)
