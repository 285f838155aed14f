"""AutoencoderKL: parity with diffusers (encode, decode, tiled), loading, sampling, dtype, errors.

Reference models are tiny random ``diffusers.AutoencoderKL``s saved with ``save_pretrained``; their
GroupNorm affines (initialised to exactly 1 and 0) are perturbed so every parameter matters.
"""
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from pixart.models.autoencoder_kl import SD_VAE_CONFIG, SDXL_VAE_CONFIG, AutoencoderKL, VAEConfig
from pixart.utils.errors import CheckpointError, ConfigError
from tiny_models import VAE_CONFIGS, tiny_vae_variant

TOL = 1e-4  # fp32 parity bound (max abs)

SMALL = VAE_CONFIGS["small"]
CONFIGS = VAE_CONFIGS


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (diffusers model, folder saved as safetensors)} plus SMALL saved as .bin."""
    root = tmp_path_factory.mktemp("vae")
    out = {}
    for name, cfg in CONFIGS.items():
        ref = tiny_vae_variant(cfg)
        ref.save_pretrained(str(root / name), safe_serialization=True)
        out[name] = (ref, str(root / name))
    out["small_bin"] = (out["small"][0], str(root / "small_bin"))
    out["small"][0].save_pretrained(out["small_bin"][1], safe_serialization=False)
    return out


@pytest.fixture(scope="module")
def small(saved):
    return saved["small"][0], AutoencoderKL.from_pretrained(saved["small"][1])


def _np(t):
    return t.asnumpy() if isinstance(t, ms.Tensor) else t.detach().numpy()


def _maxdiff(a, b):
    return float(np.abs(_np(a).astype(np.float64) - _np(b).astype(np.float64)).max())


def _image(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name,shape", [("small", (2, 3, 24, 32)), ("sd_like", (2, 3, 32, 40)),
                                        ("plain", (1, 3, 20, 16))])
def test_encode_decode_match_diffusers(saved, name, shape):
    ref, folder = saved[name]
    model = AutoencoderKL.from_pretrained(folder)
    x = _image(shape)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        dec = ref.decode(post.mean).sample
    ours = model.encode(x)
    f = model.config.downscale
    assert tuple(ours.mean.shape) == (shape[0], ref.config.latent_channels, shape[2] // f, shape[3] // f)
    assert _maxdiff(ours.mean, post.mean) <= TOL
    assert _maxdiff(ours.logvar, post.logvar) <= TOL
    assert _maxdiff(ours.std, post.std) <= TOL
    out = model.decode(post.mean.numpy())
    assert tuple(out.shape) == tuple(dec.shape)
    assert _maxdiff(out, dec) <= TOL
    assert float(np.abs(_np(dec)).max()) > 0.1  # the comparison is not between near-zeros


def test_bin_loads_same_as_safetensors(saved, small):
    ref, model = small
    from_bin = AutoencoderKL.from_pretrained(saved["small_bin"][1])
    assert os.path.exists(os.path.join(saved["small_bin"][1], "diffusion_pytorch_model.bin"))
    a = dict(model.parameters_and_names())
    for name, p in from_bin.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), a[name].asnumpy(), err_msg=name)
    z = np.random.default_rng(1).standard_normal((1, 4, 6, 5)).astype(np.float32)
    with torch.no_grad():
        assert _maxdiff(from_bin.decode(z), ref.decode(torch.from_numpy(z)).sample) <= TOL


def test_full_size_names_and_shapes_are_diffusers_keys():
    """The SDXL config builds exactly diffusers' state-dict keys and shapes (83,653,863 params).
    SD's VAE has the same architecture; only sample_size and scaling_factor differ."""
    with torch.device("meta"):
        ref = TorchAutoencoderKL(**SDXL_VAE_CONFIG.to_dict())
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {k: tuple(p.shape) for k, p in AutoencoderKL.from_config(SDXL_VAE_CONFIG).parameters_and_names()}
    assert ours == expected
    assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863
    sd, sdxl = SD_VAE_CONFIG.to_dict(), SDXL_VAE_CONFIG.to_dict()
    assert {k for k in sd if sd[k] != sdxl[k]} == {"sample_size", "scaling_factor"}
    assert SDXL_VAE_CONFIG.scaling_factor == 0.13025 and SD_VAE_CONFIG.scaling_factor == 0.18215


def test_pipeline_folder_with_vae_subfolder(saved, tmp_path):
    shutil.copytree(saved["small"][1], tmp_path / "vae")
    model = AutoencoderKL.from_pretrained(str(tmp_path))
    assert model.config.block_out_channels == (8, 16)


def test_config_values_are_read(saved):
    model = AutoencoderKL.from_pretrained(saved["sd_like"][1])
    assert model.scaling_factor == 0.13025 and model.config.force_upcast
    assert model.config.downscale == 8 and model.tile_latent_min_size == 8
    plain = AutoencoderKL.from_pretrained(saved["plain"][1])
    assert plain.quant_conv is None and plain.post_quant_conv is None
    assert plain.decoder.mid_block.attentions is None


# ----------------------------------------------------------------------------- posterior


def test_sample_is_mean_plus_std_times_noise(small):
    _, model = small
    post = model.encode(_image((2, 3, 16, 16)))
    noise = np.random.default_rng(3).standard_normal(tuple(post.mean.shape)).astype(np.float32)
    expected = _np(post.mean) + _np(post.std) * noise
    np.testing.assert_allclose(_np(post.sample(noise=noise)), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_np(post.sample(noise=ms.Tensor(noise))), expected, rtol=0, atol=1e-6)
    # a seed is a numpy generator seed: reproducible, and what default_rng(seed) would draw
    seeded = _np(post.sample(generator=7))
    np.testing.assert_array_equal(seeded, _np(post.sample(generator=np.random.default_rng(7))))
    drawn = np.random.default_rng(7).standard_normal(tuple(post.mean.shape), dtype=np.float32)
    np.testing.assert_allclose(seeded, _np(post.mean) + _np(post.std) * drawn, rtol=0, atol=1e-6)
    assert not np.array_equal(seeded, _np(post.sample(generator=8)))
    np.testing.assert_array_equal(_np(post.mode()), _np(post.mean))
    with pytest.raises(ValueError, match="noise shape"):
        post.sample(noise=noise[:1])


def test_logvar_is_clamped():
    from pixart.models.autoencoder_kl import DiagonalGaussian

    moments = np.zeros((1, 2, 1, 3), np.float32)
    moments[0, 1] = [-100.0, 0.0, 100.0]
    post = DiagonalGaussian(ms.Tensor(moments))
    np.testing.assert_array_equal(_np(post.logvar)[0, 0, 0], [-30.0, 0.0, 20.0])


# ----------------------------------------------------------------------------- tiling

# Measured on SMALL (seed 0; decode z (1, 4, 40, 28) with 16-latent tiles, 12 tiles; encode x
# (1, 3, 80, 56) with 32-px tiles). Tiled and untiled differ a lot on a random-weight VAE because
# each tile gets its own GroupNorm statistics and its own global mid-block attention (a trained
# VAE is far smoother); what makes the bound principled is that diffusers' own tiled-vs-untiled gap
# on the same model is the same to 1e-6. Measured max abs (mean abs), ours | diffusers:
#   decode      0.70768 (0.07292) | 0.70768 (0.07292), on outputs of max |x| 2.31
#   encode mean 0.23165 (0.02558) | 0.23165 (0.02558), on means of max |x| 0.76
TILED_DECODE_GAP = 0.71
TILED_ENCODE_GAP = 0.235


def test_tiled_decode_matches_diffusers_tiled(small):
    ref, model = small
    z = np.random.default_rng(5).standard_normal((1, 4, 40, 28)).astype(np.float32)  # > 16-latent tile
    ours_tiled = model.decode(z, tiled=True)
    ours_full = model.decode(z, tiled=False)
    with torch.no_grad():
        ref.enable_tiling()
        ref_tiled = ref.decode(torch.from_numpy(z)).sample
        ref.disable_tiling()
        ref_full = ref.decode(torch.from_numpy(z)).sample
    assert tuple(ours_tiled.shape) == tuple(ref_tiled.shape) == (1, 3, 80, 56)
    assert _maxdiff(ours_tiled, ref_tiled) <= TOL
    assert _maxdiff(ours_full, ref_full) <= TOL
    gap, ref_gap = _maxdiff(ours_tiled, ours_full), _maxdiff(ref_tiled, ref_full)
    assert gap <= ref_gap + 2 * TOL
    assert gap <= TILED_DECODE_GAP
    # The top-left corner is tile (0, 0) alone: nothing blends into it.
    limit = model.tile_sample_min_size - int(model.tile_sample_min_size * model.tile_overlap_factor)
    corner = model.decode(z[:, :, :16, :16], tiled=False)
    np.testing.assert_allclose(_np(ours_tiled)[..., :limit, :limit], _np(corner)[..., :limit, :limit],
                               rtol=0, atol=1e-6)


def test_tiled_encode_matches_diffusers_tiled(small):
    ref, model = small
    x = _image((1, 3, 80, 56), seed=6)  # > 32-px tile
    ours_tiled = model.encode(x, tiled=True)
    ours_full = model.encode(x, tiled=False)
    with torch.no_grad():
        ref.enable_tiling()
        ref_tiled = ref.encode(torch.from_numpy(x)).latent_dist
        ref.disable_tiling()
        ref_full = ref.encode(torch.from_numpy(x)).latent_dist
    assert tuple(ours_tiled.mean.shape) == tuple(ref_tiled.mean.shape) == (1, 4, 40, 28)
    assert _maxdiff(ours_tiled.mean, ref_tiled.mean) <= TOL
    assert _maxdiff(ours_tiled.logvar, ref_tiled.logvar) <= TOL
    gap, ref_gap = _maxdiff(ours_tiled.mean, ours_full.mean), _maxdiff(ref_tiled.mean, ref_full.mean)
    assert gap <= ref_gap + 2 * TOL
    assert gap <= TILED_ENCODE_GAP


def test_auto_tiling_threshold_and_tile_size(saved):
    model = AutoencoderKL.from_pretrained(saved["small"][1])
    z = np.random.default_rng(2).standard_normal((1, 4, 12, 10)).astype(np.float32)
    untiled = _np(model.decode(z))
    model.enable_tiling(tile_sample_min_size=16)  # 8-latent tiles: z is above the threshold
    assert model.tile_latent_min_size == 8
    tiled = _np(model.decode(z))
    np.testing.assert_array_equal(tiled, _np(model.decode(z, tiled=True)))
    assert np.abs(tiled - untiled).max() > 1e-3  # it did tile
    np.testing.assert_array_equal(_np(model.decode(z, tiled=False)), untiled)
    # at one tile, auto mode decodes whole (forcing tiles there would start a second tile at the
    # stride, 6, as diffusers does); below the stride a forced tiling is one tile, the same computation
    np.testing.assert_array_equal(_np(model.decode(z[:, :, :8, :8])), _np(model.decode(z[:, :, :8, :8], tiled=False)))
    np.testing.assert_allclose(_np(model.decode(z[:, :, :6, :6], tiled=True)),
                               _np(model.decode(z[:, :, :6, :6], tiled=False)), rtol=0, atol=1e-6)
    model.disable_tiling()
    np.testing.assert_array_equal(_np(model.decode(z)), untiled)


# ----------------------------------------------------------------------------- dtype


def test_force_upcast_keeps_fp32_and_half_runs_otherwise(saved):
    upcast = AutoencoderKL.from_pretrained(saved["sd_like"][1], dtype=ms.float16)  # force_upcast: true
    assert upcast.compute_dtype == ms.float32
    assert all(p.dtype == ms.float32 for p in upcast.get_parameters())
    z = np.random.default_rng(4).standard_normal((1, 4, 3, 4)).astype(np.float32)
    assert upcast.decode(z).dtype == ms.float32

    cfg_path = os.path.join(saved["small"][1], "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    assert cfg["force_upcast"] is True  # diffusers' default
    cfg["force_upcast"] = False
    half = AutoencoderKL.from_config(cfg, dtype="fp16")
    full = AutoencoderKL.from_config(cfg)
    ms.load_param_into_net(half, {k: ms.Parameter(p.astype(ms.float16), name=k) for k, p in full.parameters_and_names()})
    assert half.compute_dtype == ms.float16 and all(p.dtype == ms.float16 for p in half.get_parameters())
    out16, out32 = half.decode(z), full.decode(z)
    assert out16.dtype == ms.float16
    assert _maxdiff(out16, out32) <= 2e-2 * max(1.0, float(np.abs(_np(out32)).max()))


# ----------------------------------------------------------------------------- errors


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_folder_config_or_weights(saved, tmp_path):
    with pytest.raises(CheckpointError) as err:
        AutoencoderKL.from_pretrained(str(tmp_path / "nope"))
    msg = _one_line(err)
    assert "nope" in msg and "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers" in msg and "SD VAE" in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as err:
        AutoencoderKL.from_pretrained(str(empty))
    assert "config.json" in _one_line(err) and "pixart_sigma_sdxlvae_T5_diffusers (vae/)" in str(err.value)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(saved["small"][1], "config.json"), no_weights)
    with pytest.raises(CheckpointError) as err:
        AutoencoderKL.from_pretrained(str(no_weights))
    assert "no weights" in _one_line(err) and "pixart_sigma_sdxlvae_T5_diffusers" in str(err.value)


def test_config_that_does_not_fit_weights(saved, tmp_path):
    folder = tmp_path / "wrong"
    shutil.copytree(saved["small"][1], folder)
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    cfg["block_out_channels"] = [8, 32]
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError) as err:
        AutoencoderKL.from_pretrained(str(folder))
    msg = _one_line(err)
    assert "diffusion_pytorch_model.safetensors" in msg and "mis-shaped" in msg
    assert "pixart_sigma_sdxlvae_T5_diffusers" in msg


def test_invalid_config_is_a_config_error(saved, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(saved["small"][1], folder)
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    cfg["up_block_types"] = ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError) as err:
        AutoencoderKL.from_pretrained(str(folder))
    assert "config.json" in _one_line(err) and "AttnUpDecoderBlock2D" in str(err.value)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        AutoencoderKL.from_pretrained(str(folder))
    assert "config.json" in _one_line(err)

    with pytest.raises(ConfigError, match="norm_num_groups"):
        VAEConfig.from_dict(dict(SMALL, norm_num_groups=3))
