"""End to end: our pipelines give diffusers' images on the same tiny weights and latents."""
import numpy as np
import pytest
import torch
import mindspore as ms

from pixart import PixArtAlphaPipeline, PixArtSigmaPipeline
from pixart.utils.errors import CheckpointError, ConfigError
from tiny_models import make_pipeline_folder, seeded_latents

PROMPTS = ["a small cactus with a happy face", "a red boat on the river at night"]
TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def sigma_folder(tmp_path_factory):
    return make_pipeline_folder(tmp_path_factory.mktemp("sigma"), "sigma", sample_size=32)


@pytest.fixture(scope="module")
def alpha_folder(tmp_path_factory):
    return make_pipeline_folder(tmp_path_factory.mktemp("alpha"), "alpha", sample_size=128)


def reference_images(cls_name, folder, latents, **kwargs):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(latents=torch.from_numpy(latents), use_resolution_binning=False, output_type="np", **kwargs)
    return out.images


@pytest.mark.parametrize("steps", [20])
def test_sigma_matches_diffusers_non_square_batch_negative_prompt(sigma_folder, steps):
    height, width = 64, 96
    latents = seeded_latents((2, 4, height // 8, width // 8))
    kwargs = dict(prompt=PROMPTS, negative_prompt="blurry, low quality", num_inference_steps=steps,
                  height=height, width=width)
    ref = reference_images("PixArtSigmaPipeline", sigma_folder, latents, **kwargs)
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    out = np.stack(pipe(latents=latents, use_resolution_binning=False, output_type="np", progress=False,
                        **kwargs).images)
    assert out.shape == ref.shape == (2, height, width, 3)
    assert ref.std() > 0.05  # a real picture, not a constant
    assert np.abs(out - ref).max() <= TOLERANCE


def test_alpha_1024ms_micro_conditions_match_diffusers(alpha_folder):
    height, width = 96, 64
    latents = seeded_latents((1, 4, height // 8, width // 8), seed=1)
    kwargs = dict(prompt=PROMPTS[:1], negative_prompt="", num_inference_steps=10, height=height, width=width)
    ref = reference_images("PixArtAlphaPipeline", alpha_folder, latents, **kwargs)
    pipe = PixArtAlphaPipeline.from_pretrained(str(alpha_folder))
    assert pipe.transformer.micro_condition and pipe.default_max_length == 120
    out = np.stack(pipe(latents=latents, use_resolution_binning=False, output_type="np", progress=False,
                        **kwargs).images)
    assert np.abs(out - ref).max() <= TOLERANCE


def test_precomputed_embeddings_and_low_memory(sigma_folder):
    """T5 is released after encoding and the DiT before T5 loads; embeddings can be passed in."""
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS[0], "", num_images_per_prompt=2)
    assert embeds.shape == (2, 16, 32) and mask.shape == (2, 16)  # trimmed to the 16-token bucket
    assert "text_encoder" not in pipe._loaded
    latents = seeded_latents((2, 4, 8, 8), seed=3)
    size = dict(height=64, width=64, use_resolution_binning=False, num_inference_steps=4, output_type="np",
                progress=False)
    a = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
             negative_prompt_attention_mask=neg_mask, latents=latents, **size).images
    assert "transformer" in pipe._loaded
    b = pipe(PROMPTS[0], num_images_per_prompt=2, latents=latents, **size).images
    assert "transformer" in pipe._loaded and "text_encoder" not in pipe._loaded
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_trimmed_text_tokens_match_diffusers_padded_to_300(sigma_folder):
    """Short and long prompts with an empty negative prompt: we encode and cross-attend to the
    bucketed longest real length, diffusers to all 300 padded tokens; same images, and the same
    embeddings at the real positions."""
    long_prompt = " ".join(["a large red house with a green tree on the river under the night sky"] * 3)
    prompts = ["a cat", long_prompt]
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, "")
    real = int(mask.asnumpy().sum(axis=1).max())
    assert 32 < real <= 64 and embeds.shape[1] == 64 and neg.shape[1] == 64
    assert neg_mask.asnumpy().sum() == 2  # "" is one token (</s>) per row
    pipe.trim_text_tokens = False
    full, full_mask, _, _ = pipe.encode_prompt(prompts, "")
    assert full.shape[1] == 300
    keep = mask.asnumpy().astype(bool)
    np.testing.assert_allclose(embeds.asnumpy()[keep], full.asnumpy()[:, :64][keep], atol=1e-5)
    pipe.trim_text_tokens = True

    latents = seeded_latents((2, 4, 8, 8), seed=4)
    kwargs = dict(prompt=prompts, negative_prompt="", num_inference_steps=6, height=64, width=64)
    ref = reference_images("PixArtSigmaPipeline", sigma_folder, latents, **kwargs)
    out = np.stack(pipe(latents=latents, use_resolution_binning=False, output_type="np", progress=False,
                        **kwargs).images)
    assert ref.std() > 0.05 and np.abs(out - ref).max() <= TOLERANCE


def test_caption_kv_projected_once_per_generation_not_per_step(sigma_folder, monkeypatch):
    """The blocks' caption K/V are the same at every step: the pipeline projects them once per call
    of the denoiser's row groups (here 2 images, one group each on CPU), whatever the step count."""
    from pixart.models.pixart import CrossAttention

    calls = []
    text_kv = CrossAttention.text_kv
    monkeypatch.setattr(CrossAttention, "text_kv", lambda self, y: calls.append(y.shape) or text_kv(self, y))
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    depth = len(pipe.transformer.blocks)
    for steps in (2, 5):
        calls.clear()
        pipe(PROMPTS, num_inference_steps=steps, height=64, width=64, output_type="latent", progress=False,
             use_resolution_binning=False)
        assert len(calls) == 2 * depth  # 2 rows each (unconditional, conditional)
        assert {shape[0] for shape in calls} == {2}


def test_a_new_prompt_reuses_the_compiled_denoiser(sigma_folder):
    """Graph mode: the caption K/V go into the graph as inputs (mutable), not as constants that a new
    prompt would change, so a second image of the same size runs the graph the first one compiled."""
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder), mode="graph")
    embeds = pipe.encode_prompt(PROMPTS, "")  # first: encoding releases the denoiser (low_memory)
    for k in range(2):
        pipe(prompt_embeds=embeds[0][k:k + 1], prompt_attention_mask=embeds[1][k:k + 1],
             negative_prompt_embeds=embeds[2][k:k + 1], negative_prompt_attention_mask=embeds[3][k:k + 1],
             num_inference_steps=2, height=64, width=64, output_type="latent", progress=False,
             use_resolution_binning=False)
        assert len(pipe.transformer.compile_cache) == 1


@pytest.mark.parametrize("sampler", ["dpm", "sa-solver", "ddim", "iddpm"])
def test_every_sampler_runs_and_is_deterministic(sigma_folder, sampler):
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder), sampler=sampler)
    run = lambda: pipe(PROMPTS[1], seed=7, num_inference_steps=3, height=64, width=64, output_type="np",  # noqa: E731
                       progress=False, use_resolution_binning=False).images[0]
    first, second = run(), run()
    assert first.shape == (64, 64, 3)
    np.testing.assert_array_equal(first, second)


def test_resolution_binning_returns_the_requested_size(sigma_folder):
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    steps = []
    image = pipe(PROMPTS[0], seed=1, num_inference_steps=2, height=200, width=120, progress=False,
                 callback=lambda i, t, x: steps.append((i, t, tuple(x.shape)))).images[0]
    assert image.size == (120, 200)  # generated at the nearest 256-base bin, resized and cropped back
    assert len(steps) == 2 and steps[0][2][2:] != (25, 15)  # latents were at the bin size


def test_bad_input(sigma_folder, tmp_path):
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder))
    with pytest.raises(ConfigError, match="at least 1"):
        pipe(PROMPTS[0], num_inference_steps=0, height=64, width=64, use_resolution_binning=False)
    with pytest.raises(ConfigError, match="multiples of 8"):
        pipe(PROMPTS[0], height=70, width=64, use_resolution_binning=False, num_inference_steps=1)
    with pytest.raises(ConfigError, match="latents must have shape"):
        pipe(PROMPTS[0], latents=np.zeros((1, 4, 3, 3), np.float32), height=64, width=64,
             use_resolution_binning=False, num_inference_steps=1)
    with pytest.raises(CheckpointError, match="transformer is missing"):
        PixArtSigmaPipeline.from_pretrained(str(tmp_path))
    assert ms.get_context("mode") == ms.PYNATIVE_MODE


@pytest.mark.parametrize("base", [256, 512, 1024, 2048, 4096])
def test_every_resolution_bins_non_square_requests(base):
    """Each base maps tall and wide requests to a bin the DiT can run: image sides multiples of 16
    (8 VAE × 2 patch); at the KV-compression bases (2K, 4K) the token grid is even on both axes so
    K/V halve exactly."""
    from pixart.data.aspect_ratios import classify_height_width_bin, get_bins

    bins = get_bins(base)
    assert len(bins) == (40 if base >= 2048 else 33)
    for h, w in [(base, base // 2), (base // 3 * 2, base), (base * 4, base), (base, base * 4)]:
        bh, bw = classify_height_width_bin(h, w, bins)
        assert (bh > bw) == (h > w)
    multiple = 32 if base >= 2048 else 16
    assert all(bh % multiple == 0 and bw % multiple == 0 for bh, bw in bins.values())


def test_kv_compression_pipeline_non_square(sigma_folder):
    """The KV configs on weights without KV layers: they start as an average pool, and a tall
    request runs end to end at its bin."""
    kv = {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1]}
    pipe = PixArtSigmaPipeline.from_pretrained(str(sigma_folder), kv_compress_config=kv)
    attn = pipe.transformer.blocks[1].attn
    assert attn.kv_compress == "conv" and pipe.transformer.blocks[0].attn.kv_compress is None
    np.testing.assert_array_equal(attn.sr.weight.asnumpy(), np.full((16, 1, 2, 2), 0.25, np.float32))
    image = pipe(PROMPTS[0], seed=2, num_inference_steps=2, height=256, width=128, progress=False).images[0]
    assert image.size == (128, 256)
