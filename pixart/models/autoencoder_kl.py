"""AutoencoderKL: the Stable Diffusion / SDXL VAE in MindSpore.

PixArt-Σ decodes its latents with the SDXL VAE (scaling factor 0.13025), PixArt-α with the SD VAE
(0.18215). Both are diffusers' ``AutoencoderKL`` with different configs, so this file builds that
one architecture from a diffusers ``vae/config.json``. The cell tree mirrors diffusers' module
tree, so MindSpore's parameter names *are* diffusers' state-dict keys
(``encoder.down_blocks.0.resnets.0.norm1.weight``, ``decoder.mid_block.attentions.0.to_out.0.bias``
...) and a diffusers ``vae/`` folder loads by name through ``load_into_cell`` with no conversion.

Shapes: images ``x`` are (N, 3, H, W) in [-1, 1]; latents are (N, C, H/f, W/f) with
f = 2 ** (len(block_out_channels) - 1) (8 for SD/SDXL) and C = latent_channels (4). Latents here
are *unscaled*: the DiT works on ``z * scaling_factor``, so callers multiply after ``encode`` and
divide before ``decode``.

Large images (2K/4K) are encoded/decoded in overlapping tiles blended linearly across the overlap,
with the same tile grid and blend as diffusers' ``tiled_encode``/``tiled_decode``, so activation
memory is bounded by the tile size instead of the image size.
"""
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops

from pixart.models.attention import scaled_dot_product_attention
from pixart.utils.checkpoint import find_weight_files, load_into_cell, read_state_dict
from pixart.utils.errors import CheckpointError, ConfigError

__all__ = ["VAEConfig", "SD_VAE_CONFIG", "SDXL_VAE_CONFIG", "GroupNorm", "ResnetBlock", "Downsample",
           "Upsample", "AttentionBlock", "Encoder", "Decoder", "DiagonalGaussian", "AutoencoderKL"]

WEIGHTS_HINT = ("the VAE comes from the Hugging Face repo PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers "
                "(vae/) for PixArt-Sigma, or the SD VAE (stabilityai/sd-vae-ft-ema, the vae/ of a "
                "PixArt-alpha diffusers repo) for PixArt-alpha")
CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

_HALF = (ms.float16, ms.bfloat16)
_DTYPES = {"float32": ms.float32, "fp32": ms.float32, "float16": ms.float16, "fp16": ms.float16,
           "half": ms.float16, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16}


# ----------------------------------------------------------------------------- config


@dataclass
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json that shape or use the model.

    Defaults are diffusers' constructor defaults, so a config.json that omits a key means the same
    thing here as there. Unknown keys (``_class_name``, ``latents_mean`` ...) are ignored.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, raw, source="VAE config"):
        """Validate a config.json dict; a bad value raises a one-line ConfigError naming ``source``."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            setattr(cfg, key, tuple(getattr(cfg, key)))
        if isinstance(cfg.sample_size, (list, tuple)):  # diffusers allows (h, w); tiles are square
            cfg.sample_size = cfg.sample_size[0]
        cfg._validate(source)
        return cfg

    def _validate(self, source):
        def bad(msg):
            raise ConfigError(f"{source}: {msg}")

        levels = len(self.block_out_channels)
        if levels == 0 or any(not isinstance(c, int) or c <= 0 for c in self.block_out_channels):
            bad(f"block_out_channels must be positive integers, got {list(self.block_out_channels)}")
        if tuple(self.down_block_types) != ("DownEncoderBlock2D",) * levels:
            bad(f"down_block_types must be {levels} x DownEncoderBlock2D (one per block_out_channels), "
                f"got {list(self.down_block_types)}")
        if tuple(self.up_block_types) != ("UpDecoderBlock2D",) * levels:
            bad(f"up_block_types must be {levels} x UpDecoderBlock2D, got {list(self.up_block_types)}")
        if self.act_fn != "silu":
            bad(f"only act_fn 'silu' is supported, got {self.act_fn!r}")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            bad(f"layers_per_block must be a positive integer, got {self.layers_per_block!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                bad(f"norm_num_groups {self.norm_num_groups} does not divide block channels {c}")
        for key in ("in_channels", "out_channels", "latent_channels", "sample_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                bad(f"{key} must be a positive integer, got {getattr(self, key)!r}")

    @property
    def downscale(self):
        """Pixels per latent along each side: 2 ** (number of downsampling levels)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self):
        d = asdict(self)
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            d[key] = list(d[key])
        return d


_SD_STRUCTURE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                     latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4)
SD_VAE_CONFIG = VAEConfig(**_SD_STRUCTURE, sample_size=512, scaling_factor=0.18215, force_upcast=True)
"""PixArt-α: the SD VAE (f = 8, 4 latent channels)."""
SDXL_VAE_CONFIG = VAEConfig(**_SD_STRUCTURE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
"""PixArt-Σ: the SDXL VAE. Same architecture as SD's, retrained; overflows in fp16."""


def _as_dtype(dtype):
    if dtype is None:
        return ms.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ConfigError(f"unknown VAE dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
        return _DTYPES[dtype.lower()]
    return dtype


# ----------------------------------------------------------------------------- building blocks


# "zeros" while from_pretrained builds a model whose weights it then loads: MindSpore's default
# random initialisers cost ~1 s for the SDXL VAE on CPU, for values that are overwritten.
_WEIGHT_INIT = {}


def _conv(cin, cout, kernel, stride=1, padding=0):
    """A torch-like Conv2d with bias: weight (cout, cin, k, k), bias (cout,)."""
    if padding:
        return nn.Conv2d(cin, cout, kernel, stride=stride, pad_mode="pad", padding=padding, has_bias=True,
                         **_WEIGHT_INIT)
    return nn.Conv2d(cin, cout, kernel, stride=stride, pad_mode="valid", has_bias=True, **_WEIGHT_INIT)


def _dense(cin, cout):
    return nn.Dense(cin, cout, **_WEIGHT_INIT)


class GroupNorm(nn.Cell):
    """GroupNorm over (N, C, H, W) with parameters named ``weight``/``bias`` (diffusers' keys).

    Statistics are always computed in fp32: a half-precision mean/variance over a 128×1024×1024
    activation loses most of its digits. The result is cast back to the input dtype. ``silu``:
    SiLU follows (every VAE norm but the attention's), so on CPU both run as one kernel
    (``pixart.ops.cpu_kernels.use_fused_norms``).
    """

    def __init__(self, num_groups, num_channels, eps=1e-6, silu=False):
        super().__init__()
        self.num_groups, self.eps, self.silu = num_groups, eps, silu
        self.weight = Parameter(ms.Tensor(np.ones(num_channels, np.float32)), name="weight")
        self.bias = Parameter(ms.Tensor(np.zeros(num_channels, np.float32)), name="bias")

    def construct(self, x):
        out = ops.group_norm(x.astype(ms.float32), self.num_groups, self.weight.astype(ms.float32),
                             self.bias.astype(ms.float32), self.eps)  # fused kernel, one op
        return (ops.silu(out) if self.silu else out).astype(x.dtype)


class ResnetBlock(nn.Cell):
    """norm1 → SiLU → conv1 → norm2 → SiLU → conv2, added to the input (1×1-projected when the
    channel count changes). (N, Cin, H, W) → (N, Cout, H, W). diffusers' ResnetBlock2D without
    a time embedding (dropout is a no-op at inference)."""

    def __init__(self, in_channels, out_channels, groups, eps=1e-6):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = _conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.conv2 = _conv(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = _conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x):
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample(nn.Cell):
    """Stride-2 3×3 conv: (N, C, H, W) → (N, C, ⌊H/2⌋, ⌊W/2⌋).

    The original LDM padding is asymmetric, (0, 1, 0, 1) — right and bottom only — before an
    unpadded conv; a symmetric padding=1 conv would shift every latent by half a pixel.
    """

    def __init__(self, channels):
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    """Nearest-neighbour 2× then a 3×3 conv: (N, C, H, W) → (N, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = _conv(channels, channels, 3, padding=1)

    def construct(self, x):
        n, c, h, w = x.shape
        # Nearest 2× is exact pixel repetition; broadcast+reshape says so without an interpolation op.
        x = ops.broadcast_to(x.reshape(n, c, h, 1, w, 1), (n, c, h, 2, w, 2)).reshape(n, c, 2 * h, 2 * w)
        return self.conv(x)


class AttentionBlock(nn.Cell):
    """Single-head self-attention over the H·W positions of the mid-block, with a residual.

    (N, C, H, W) → (N, C, H, W). diffusers' ``Attention`` with heads = 1, head dim = C, q/k/v/out
    projections with bias and a GroupNorm on the input. Queries are processed in chunks: softmax is
    row-wise, so chunking is exact and keeps the (L × L) score matrix from growing with the image
    (a 2K image untiled has L = 65,536, i.e. a 16 GiB fp32 score matrix in one piece).
    """

    def __init__(self, channels, groups, eps=1e-6, max_scores=2 ** 26):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = _dense(channels, channels)
        self.to_k = _dense(channels, channels)
        self.to_v = _dense(channels, channels)
        self.to_out = nn.CellList([_dense(channels, channels)])
        self.max_scores = max_scores  # score entries per chunk: 2**26 fp32 = 256 MiB

    def construct(self, x):
        n, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(n, c, h * w).transpose(0, 2, 1)  # (N, L, C)
        q, k, v = (proj(tokens).reshape(n, 1, h * w, c) for proj in (self.to_q, self.to_k, self.to_v))
        step = max(1, self.max_scores // (n * h * w))
        chunks = [scaled_dot_product_attention(q[:, :, i:i + step], k, v) for i in range(0, h * w, step)]
        out = chunks[0] if len(chunks) == 1 else ops.cat(chunks, axis=2)  # (N, 1, L, C)
        out = self.to_out[0](out.reshape(n, h * w, c))
        return x + out.transpose(0, 2, 1).reshape(n, c, h, w)


class MidBlock(nn.Cell):
    """resnet → [attention →] resnet at the lowest resolution; shape-preserving."""

    def __init__(self, channels, groups, add_attention=True):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock(channels, channels, groups),
                                    ResnetBlock(channels, channels, groups)])
        # diffusers keeps a None placeholder when attention is off; it owns no parameters either way.
        self.attentions = nn.CellList([AttentionBlock(channels, groups)]) if add_attention else None

    def construct(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Cell):
    """DownEncoderBlock2D: ``layers`` resnets, then an optional Downsample (all but the last level)."""

    def __init__(self, in_channels, out_channels, layers, groups, add_downsample):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                    for i in range(layers)])
        self.downsamplers = nn.CellList([Downsample(out_channels)]) if add_downsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Cell):
    """UpDecoderBlock2D: ``layers`` resnets, then an optional Upsample (all but the last level)."""

    def __init__(self, in_channels, out_channels, layers, groups, add_upsample):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                    for i in range(layers)])
        self.upsamplers = nn.CellList([Upsample(out_channels)]) if add_upsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Cell):
    """(N, in_channels, H, W) → (N, 2·latent_channels, H/f, W/f): mean and log-variance moments."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.CellList([
            DownBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, groups, i < len(chans) - 1)
            for i in range(len(chans))])
        self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, chans[-1], silu=True)
        self.conv_out = _conv(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Cell):
    """(N, latent_channels, h, w) → (N, out_channels, h·f, w·f). Each up level has one more resnet
    than the encoder's down level (diffusers: layers_per_block + 1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.CellList([
            UpBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, groups, i < len(chans) - 1)
            for i in range(len(chans))])
        self.conv_norm_out = GroupNorm(groups, chans[-1], silu=True)
        self.conv_out = _conv(chans[-1], cfg.out_channels, 3, padding=1)

    def construct(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


# ----------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """The encoder's posterior N(mean, diag(std²)) over latents.

    ``moments`` (N, 2C, h, w) is split into mean and logvar (N, C, h, w); logvar is clamped to
    [-30, 20] as in diffusers so exp() can neither underflow to a zero std nor overflow.
    """

    def __init__(self, moments):
        self.moments = moments
        self.mean, logvar = ops.chunk(moments, 2, axis=1)
        self.logvar = ops.clamp(logvar, -30.0, 20.0)
        self.std = ops.exp(0.5 * self.logvar)
        self.var = ops.exp(self.logvar)

    def sample(self, generator=None, noise=None):
        """mean + std · ε, (N, C, h, w), in the moments' dtype.

        ``noise`` (array or Tensor shaped like mean) is used as ε when given. Otherwise ε is drawn
        from ``generator``: a ``numpy.random.Generator``, an int seed, or None (fresh entropy).
        Host-side numpy draws make a seed give the same latents on every device and backend.
        """
        if noise is None:
            rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
            noise = rng.standard_normal(tuple(self.mean.shape), dtype=np.float32)
        if not isinstance(noise, ms.Tensor):
            noise = ms.Tensor(np.asarray(noise, dtype=np.float32))
        if tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.astype(self.mean.dtype)

    def mode(self):
        """The most likely latents: the mean, (N, C, h, w)."""
        return self.mean


# ----------------------------------------------------------------------------- the model


def _blend_v(a, b, extent):
    """Fade the bottom rows of tile ``a`` into the top rows of tile ``b`` (in place in b), linearly:
    row y of the overlap takes weight y/extent from b. (N, C, h, w) numpy arrays."""
    extent = min(a.shape[2], b.shape[2], extent)
    if extent > 0:
        w = (np.arange(extent, dtype=np.float64) / extent).astype(np.float32)[:, None]
        b[:, :, :extent, :] = a[:, :, -extent:, :] * (1 - w) + b[:, :, :extent, :] * w


def _blend_h(a, b, extent):
    """Same as ``_blend_v`` across columns: the right edge of ``a`` into the left edge of ``b``."""
    extent = min(a.shape[3], b.shape[3], extent)
    if extent > 0:
        w = (np.arange(extent, dtype=np.float64) / extent).astype(np.float32)
        b[:, :, :, :extent] = a[:, :, :, -extent:] * (1 - w) + b[:, :, :, :extent] * w


class AutoencoderKL(nn.Cell):
    """The KL-regularised autoencoder of SD / SDXL (diffusers ``AutoencoderKL``), inference side.

    Build with ``AutoencoderKL.from_pretrained(folder)`` (a diffusers ``vae/`` folder) or
    ``AutoencoderKL.from_config(dict_or_VAEConfig)`` (random weights).

    dtype: the requested compute dtype (fp32 by default). When the config says ``force_upcast``
    (SD and SDXL VAEs do; the SDXL VAE overflows to inf/NaN in fp16) and a half dtype is asked
    for, weights and compute stay fp32, as diffusers' pipelines upcast; ``compute_dtype`` tells
    which was used. Outputs are in ``compute_dtype``.

    Tiling: ``enable_tiling()`` makes ``encode``/``decode`` split inputs larger than one tile into
    tiles of ``tile_sample_min_size`` pixels (``tile_latent_min_size`` latents), overlapping by
    ``tile_overlap_factor``, and blend them: same grid and blend as diffusers, but tiles are
    assembled row by row so only two rows of tiles are alive at once.
    """

    def __init__(self, config=None, dtype=ms.float32):
        super().__init__()
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config or {})
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = _conv(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = _conv(c, c, 1) if cfg.use_post_quant_conv else None

        self.dtype = _as_dtype(dtype)
        self.compute_dtype = ms.float32 if (cfg.force_upcast and self.dtype in _HALF) else self.dtype
        if self.compute_dtype != ms.float32:
            for p in self.get_parameters():
                p.set_dtype(self.compute_dtype)  # set_data would cast back to the old dtype

        self.use_tiling = False
        self.tile_overlap_factor = 0.25
        self.set_tile_size(cfg.sample_size)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config, dtype=ms.float32):
        """Random-weight model from a config dict (diffusers keys) or a ``VAEConfig``."""
        return cls(config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config), dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=ms.float32):
        """Load a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
        or ``.bin``), or a pipeline folder that has one under ``vae/``.

        Every failure (missing folder, config or weights; a config whose shapes do not match the
        weights) is a one-line ``CheckpointError``/``ConfigError`` naming the file.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            what = "is not a folder" if os.path.exists(path) else "does not exist"
            raise CheckpointError(f"VAE folder {path} {what}; {WEIGHTS_HINT}")
        folder = path
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)) and \
                os.path.isfile(os.path.join(folder, "vae", CONFIG_NAME)):
            folder = os.path.join(folder, "vae")  # a whole pipeline checkout was given
        config_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{config_path} is missing (a VAE folder needs config.json and "
                                  f"diffusion_pytorch_model.safetensors); {WEIGHTS_HINT}")
        try:
            with open(config_path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{config_path}: unreadable ({' '.join(str(err).split())}); {WEIGHTS_HINT}") from None
        try:
            cfg = VAEConfig.from_dict(raw, source=config_path)
        except ConfigError as err:
            raise ConfigError(f"{err}; {WEIGHTS_HINT}") from None
        _WEIGHT_INIT.update(weight_init="zeros", bias_init="zeros")  # every parameter is loaded below
        try:
            model = cls(cfg, dtype=dtype)
        finally:
            _WEIGHT_INIT.clear()

        weights = next((os.path.join(folder, n) for n in WEIGHT_NAMES
                        if os.path.isfile(os.path.join(folder, n))), None)
        try:
            if weights is None:  # sharded or oddly named weights: let the shared loader find them
                weights = find_weight_files(folder)[0]
                state = read_state_dict(folder, copy_on_write=True)
            else:
                state = read_state_dict(weights, copy_on_write=True)
            load_into_cell(model, state, source=f"{weights} (with {config_path})", adopt=True)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; {WEIGHTS_HINT}") from None
        return model

    # ------------------------------------------------------------------ tiling controls

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    def set_tile_size(self, tile_sample_min_size):
        """Tile side in pixels; the latent tile is ``tile_sample_min_size // f`` (as diffusers)."""
        if int(tile_sample_min_size) < self.config.downscale:
            raise ConfigError(f"VAE tile size {tile_sample_min_size} is smaller than one latent "
                              f"({self.config.downscale} px)")
        self.tile_sample_min_size = int(tile_sample_min_size)
        self.tile_latent_min_size = int(self.tile_sample_min_size / self.config.downscale)

    def enable_tiling(self, tile_sample_min_size=None, tile_overlap_factor=None):
        """Tile inputs larger than one tile in ``encode``/``decode``. Tile size defaults to the
        config's sample_size (SDXL: 1024 px = 128 latents), overlap to 0.25."""
        if tile_sample_min_size is not None:
            self.set_tile_size(tile_sample_min_size)
        if tile_overlap_factor is not None:
            if not 0.0 <= tile_overlap_factor < 1.0:
                raise ConfigError(f"tile_overlap_factor must be in [0, 1), got {tile_overlap_factor}")
            self.tile_overlap_factor = float(tile_overlap_factor)
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    # ------------------------------------------------------------------ encode / decode

    def _to_input(self, x):
        if not isinstance(x, ms.Tensor):
            x = ms.Tensor(np.asarray(x, dtype=np.float32))
        if x.ndim != 4:
            raise ValueError(f"expected a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        return x.astype(self.compute_dtype)

    def _encode_tile(self, x):
        """(N, 3, H, W) → moments (N, 2C, H/f, W/f), untiled."""
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode_tile(self, z):
        """(N, C, h, w) → (N, 3, h·f, w·f), untiled."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x, tiled=None):
        """Images (N, 3, H, W) in [-1, 1] → ``DiagonalGaussian`` over latents (N, C, H/f, W/f).

        The latents are unscaled: multiply a sample by ``scaling_factor`` before the DiT.
        ``tiled``: True forces tiling, False forbids it, None tiles when ``enable_tiling()`` was
        called and H or W exceeds ``tile_sample_min_size``.
        """
        x = self._to_input(x)
        if tiled is None:
            tiled = self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size
        if tiled:
            moments = self._tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size)
        else:
            moments = self._encode_tile(x)
        return DiagonalGaussian(moments)

    def decode(self, z, tiled=None):
        """Unscaled latents (N, C, h, w) → images (N, 3, h·f, w·f), roughly in [-1, 1] (not clipped).

        ``tiled`` as in ``encode``, against ``tile_latent_min_size``.
        """
        z = self._to_input(z)
        if tiled is None:
            tiled = self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size
        if tiled:
            return self._tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decode_tile(z)

    def construct(self, x, sample_posterior=False, generator=None):
        """Reconstruct images: encode, take the mode (or a sample), decode. (N, 3, H, W) → same."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def _tiled(self, x, fn, tile_in, tile_out):
        """Run ``fn`` over overlapping tiles of ``x`` and blend the results (diffusers' grid).

        Tiles of ``tile_in`` start every ``int(tile_in · (1 - overlap))``; each result (``tile_out``
        per side) is blended with its upper and left neighbours over ``int(tile_out · overlap)``
        rows/columns, then cropped to ``tile_out - blend`` before being placed. Neighbours are the
        already-blended tiles, exactly as diffusers' in-place blend. Blending and assembly run on
        the host in fp32 numpy; only the previous row of tiles is kept.
        """
        overlap = self.tile_overlap_factor
        stride = max(1, int(tile_in * (1 - overlap)))
        blend = int(tile_out * overlap)
        limit = tile_out - blend
        height, width = x.shape[-2:]
        strips, above = [], None
        for i in range(0, height, stride):
            row = []
            for j in range(0, width, stride):
                tile = fn(x[:, :, i:i + tile_in, j:j + tile_in]).astype(ms.float32).asnumpy()
                if above is not None:
                    _blend_v(above[len(row)], tile, blend)
                if row:
                    _blend_h(row[-1], tile, blend)
                row.append(tile)
            strips.append(np.concatenate([t[:, :, :limit, :limit] for t in row], axis=3))
            above = row
        out = np.concatenate(strips, axis=2) if len(strips) > 1 else strips[0]
        return ms.Tensor(out).astype(self.compute_dtype)
