"""PixArt-α / PixArt-Σ diffusion transformers (DiT with adaLN-single and text cross-attention).

Parameter names are the original PixArt checkpoint names (``blocks.3.attn.qkv.weight``...), so an
original ``.pth`` loads by name; loading, saving and the diffusers layout are in ``pixart_weights.py``.

Shapes: N batch, C latent channels, H×W latent size, T = (H/p)(W/p) image tokens, D hidden size,
L text tokens, E caption channels (4096 for T5-XXL).
"""
import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from pixart.models.attention import mask_to_bias, resolve_backend, scaled_dot_product_attention
from pixart.models.layers import gelu_tanh, share_compiled_graph
from pixart.utils.checkpoint import to_tensor
from pixart.utils.errors import ConfigError

KV_COMPRESS_MODES = ("conv", "ave", "uniform", "uniform_every")


@dataclass
class PixArtConfig:
    """The architecture of a PixArt DiT (what a checkpoint must match; runtime choices such as the
    dtype or attention backend are constructor arguments of the model, not part of it).

    input_size: latent side the model was trained at (image size / 8); sets the token grid
        ``base_size = input_size / patch_size`` the position embedding is scaled to.
    pe_interpolation: position-embedding interpolation (Σ: 256px 0.5, 512px 1, 1024px 2, ...).
    model_max_length: text tokens of the null caption (300 for Σ, 120 for α).
    learn_sigma: output 2·C channels (ε and the variance interpolation).
    kv_compress_config: ``{"sampling": "conv"|"ave"|"uniform", "scale_factor": 2,
        "kv_compress_layer": [14, ..., 27]}`` or None.
    micro_condition: PixArt-α 1024-MS image-size and aspect-ratio embedders.
    """

    input_size: int = 128
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300
    pe_interpolation: float = 1.0
    learn_sigma: bool = True
    kv_compress_config: Optional[dict] = None
    qk_norm: bool = False
    micro_condition: bool = False

    @classmethod
    def preset(cls, name, **overrides):
        """A published (``"XL-2"``) or test (``"tiny"``) architecture, with field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown PixArt preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown PixArt config keys: {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self):
        return asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# Architectures by name: PixArt-XL/2 (all released PixArt-α/Σ models) and the tiny one tests use.
PRESETS = {
    "XL-2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "tiny": dict(input_size=8, depth=2, hidden_size=16, patch_size=2, num_heads=2, caption_channels=8),
}


# ----------------------------------------------------------------------------- helpers


def _dense(in_features, out_features):
    """nn.Dense with zero-filled parameters: their values come from ``initialize_weights`` or a
    checkpoint, and MindSpore's default HeUniform draw alone took 17 s of XL-2's 27 s load."""
    return nn.Dense(in_features, out_features, weight_init="zeros", bias_init="zeros")


def modulate(x, shift, scale):
    """adaLN modulation: x (N, T, D), shift/scale (N, T, D) (tiled: see ``expand_tokens``)."""
    return x * (1 + scale) + shift


def expand_tokens(v, tokens):
    """(N, 1, D) -> (N, T, D). Materialised because MindSpore's CPU kernels for broadcasting
    binary ops are 5-20× slower than same-shape ones."""
    return ops.tile(v, (1, tokens, 1))


def tile_rows(v, batch, name):
    """(B, ...) -> (batch, ...) by tiling, when batch is a multiple of B: the official PixArt
    models repeat per-prompt inputs (mask, image size, aspect ratio) this way for the 2B rows of a
    guided forward. Other row counts are an error naming the input."""
    if v is None or v.shape[0] == batch:
        return v
    if v.shape[0] == 0 or batch % v.shape[0]:
        raise ValueError(f"PixArt got {batch} latents but {v.shape[0]} rows of {name}; give {batch} rows "
                         f"(or a divisor of {batch}, which is tiled as the official model does)")
    return ops.tile(v, (batch // v.shape[0],) + (1,) * (v.ndim - 1))


def with_spare_row(v):
    """(N, ...) -> (N + 1, ...) with a zero row appended. The (N, D) matmuls of the timestep path
    then never see a single row: oneDNN's CPU matmul rounds one row (its gemv path) differently
    from two or more, which made an image depend on whether it was generated alone."""
    return ops.concat([v, ops.zeros_like(v[:1])], axis=0)


def timestep_frequencies(dim, max_period=10000):
    """(dim/2,) fp32 frequencies of the timestep sinusoid, computed once on the host.

    The exponent ``-ln(max_period) * i / (dim/2)`` is rounded to float32 step by step, as the
    original PixArt and diffusers compute it (a float64 exponent moves the sinusoid by ~2.5e-5 at
    t≈999); its exp is then taken exactly (float64, rounded once), because MindSpore's CPU exp is
    only accurate to ~5e-6, which t≈1000 would turn into 1e-3 errors.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return ms.Tensor(np.exp(exponent.astype(np.float64)).astype(np.float32))


def timestep_embedding(t, freqs):
    """Sinusoidal embedding (cos, sin) of t (N,) with ``timestep_frequencies`` -> (N, dim), fp32."""
    args = t.astype(ms.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    return ops.concat([ops.cos(args), ops.sin(args)], axis=-1)


def sincos_pos_embed_2d(dim, grid_h, grid_w, base_size, pe_interpolation):
    """2-D sin-cos position embedding for a (grid_h, grid_w) token grid -> (1, T, dim), fp32.

    Coordinates are ``arange(n) / (n / base_size) / pe_interpolation``; the first half of the
    channels encodes the column (w) coordinate and the second half the row (h), in row-major
    token order, as the original PixArt and diffusers do.
    """
    ys = ops.arange(0, grid_h, dtype=ms.float32) / (grid_h / base_size) / pe_interpolation
    xs = ops.arange(0, grid_w, dtype=ms.float32) / (grid_w / base_size) / pe_interpolation
    quarter = dim // 4
    omega = 1.0 / ops.pow(10000.0, ops.arange(0, quarter, dtype=ms.float32) / quarter)

    def embed_1d(pos):  # (M,) -> (M, dim/2) as [sin, cos]
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return ops.concat([ops.sin(out), ops.cos(out)], axis=-1)

    emb_w = ops.tile(embed_1d(xs).reshape(1, grid_w, dim // 2), (grid_h, 1, 1))
    emb_h = ops.tile(embed_1d(ys).reshape(grid_h, 1, dim // 2), (1, grid_w, 1))
    return ops.concat([emb_w, emb_h], axis=-1).reshape(1, grid_h * grid_w, dim)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in fp32; parameters named weight/bias like torch."""

    def __init__(self, dim, eps=1e-6, affine=True):
        super().__init__()
        self.affine = affine
        self.eps = eps
        if affine:
            self.weight = ms.Parameter(ms.Tensor(np.ones(dim, np.float32)), name="weight")
            self.bias = ms.Parameter(ms.Tensor(np.zeros(dim, np.float32)), name="bias")
        else:
            self.ones = ms.Tensor(np.ones(dim, np.float32))
            self.zeros = ms.Tensor(np.zeros(dim, np.float32))
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        gamma, beta = (self.weight.astype(ms.float32), self.bias.astype(ms.float32)) if self.affine \
            else (self.ones, self.zeros)
        y, _, _ = self.norm(x.astype(ms.float32), gamma, beta)
        return y.astype(x.dtype)


class AdaLayerNorm(nn.Cell):
    """LayerNorm without affine, then adaLN modulation: x (N, T, D), shift/scale (N, 1, D) -> (N, T, D).

    One cell so that CPU runs can swap in a one-pass kernel (``pixart.ops.cpu_kernels.use_fused_norms``)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.norm = LayerNorm(dim, eps, affine=False)

    def construct(self, x, shift, scale):
        tokens = x.shape[1]
        return modulate(self.norm(x), expand_tokens(shift, tokens), expand_tokens(scale, tokens))


class GatedResidual(nn.Cell):
    """x + gate·h: x, h (N, T, D), gate (N, 1, D) -> (N, T, D) (swappable like ``AdaLayerNorm``)."""

    def construct(self, x, gate, h):
        return x + expand_tokens(gate, x.shape[1]) * h


class Mlp(nn.Cell):
    """fc1 -> tanh-GELU -> fc2: (..., in) -> (..., out)."""

    def __init__(self, in_features, hidden_features, out_features):
        super().__init__()
        self.fc1 = _dense(in_features, hidden_features)
        self.fc2 = _dense(hidden_features, out_features)

    def construct(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


# ----------------------------------------------------------------------------- embedders


class PatchEmbed(nn.Cell):
    """(N, C, H, W) latents -> (N, T, D) patch tokens via a stride-p convolution."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, pad_mode="valid",
                              has_bias=True)

    def construct(self, x):
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)


class TimestepEmbedder(nn.Cell):
    """Scalar timesteps (N,) -> (N, D): 256-d sinusoid, Linear, SiLU, Linear."""

    def __init__(self, hidden_size, frequency_dim=256):
        super().__init__()
        self.freqs = timestep_frequencies(frequency_dim)
        self.mlp = nn.SequentialCell(_dense(frequency_dim, hidden_size), nn.SiLU(), _dense(hidden_size, hidden_size))

    def construct(self, t, dtype):
        return self.mlp(timestep_embedding(t, self.freqs).astype(dtype))


class SizeEmbedder(TimestepEmbedder):
    """PixArt-α micro-condition: (N, K) sizes -> (N, K·D), each scalar embedded like a timestep."""

    def construct(self, s, dtype):
        batch = s.shape[0]
        return super().construct(s.reshape(-1), dtype).reshape(batch, -1)


class CaptionEmbedder(nn.Cell):
    """T5 features (N, L, E) -> (N, L, D); holds the learned null caption for class dropout."""

    def __init__(self, caption_channels, hidden_size, token_num):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.y_embedding = ms.Parameter(ms.Tensor(np.zeros((token_num, caption_channels), np.float32)),
                                        name="y_embedding")

    def construct(self, caption, drop_ids=None):
        """drop_ids (N,) bool: captions replaced by the null caption (training-time CFG dropout)."""
        if drop_ids is not None:
            null = self.y_embedding.astype(caption.dtype).reshape(1, *self.y_embedding.shape)
            caption = ops.where(drop_ids.reshape(-1, 1, 1), null, caption)
        return self.y_proj(caption)


# ----------------------------------------------------------------------------- attention


class SelfAttention(nn.Cell):
    """Multi-head self-attention over image tokens with optional KV token compression.

    KV compression (PixArt-Σ) shortens only K and V by ``scale`` along each grid axis, so the
    output keeps all T tokens: ``conv`` is a depthwise stride-``scale`` convolution followed by an
    affine LayerNorm, ``ave`` nearest-neighbour downsampling, ``uniform`` a strided slice of the
    grid, ``uniform_every`` every ``scale``-th token of the flattened sequence (the official
    PixArt-Σ modes).
    """

    def __init__(self, dim, num_heads, kv_compress=None, kv_scale=1, qk_norm=False, backend="math"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.backend = backend
        self.qkv = _dense(dim, dim * 3)
        self.proj = _dense(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = LayerNorm(dim, eps=1e-5)
            self.k_norm = LayerNorm(dim, eps=1e-5)
        self.kv_compress = kv_compress if kv_scale > 1 else None
        self.kv_scale = kv_scale
        if self.kv_compress == "conv":
            self.sr = nn.Conv2d(dim, dim, kv_scale, stride=kv_scale, group=dim, pad_mode="valid", has_bias=True)
            self.norm = LayerNorm(dim, eps=1e-5)

    def compress(self, x, grid_h, grid_w):
        """(N, T, D) tokens on a grid_h×grid_w grid -> (N, T', D) fewer tokens."""
        n, _, d = x.shape
        s = self.kv_scale
        if self.kv_compress == "conv":
            x = x.transpose(0, 2, 1).reshape(n, d, grid_h, grid_w)
            x = self.sr(x)
            return self.norm(x.reshape(n, d, -1).transpose(0, 2, 1))
        if self.kv_compress == "uniform_every":  # row-major token order, not the grid
            return x[:, ::s, :]
        x = x.reshape(n, grid_h, grid_w, d)
        if self.kv_compress == "ave":  # nearest: rows/cols i*s, floor(H/s) of them
            x = x[:, : (grid_h // s) * s : s, : (grid_w // s) * s : s, :]
        else:  # uniform
            x = x[:, ::s, ::s, :]
        return x.reshape(n, -1, d)

    def construct(self, x, grid_h, grid_w):
        """x (N, T, D) on a grid_h×grid_w grid -> (N, T, D)."""
        q, k, v = ops.split(self.qkv(x), x.shape[-1], axis=-1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_compress is not None:
            k, v = self.compress(k, grid_h, grid_w), self.compress(v, grid_h, grid_w)
        return self.proj(scaled_dot_product_attention(q, k, v, backend=self.backend, num_heads=self.num_heads))


class CrossAttention(nn.Cell):
    """Image tokens (N, T, D) attend to caption tokens (N, L, D); padded tokens masked by bias."""

    def __init__(self, dim, num_heads, backend="math"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.backend = backend
        self.q_linear = _dense(dim, dim)
        self.kv_linear = _dense(dim, dim * 2)
        self.proj = _dense(dim, dim)

    def text_kv(self, y):
        """Caption tokens (N, L, D) -> (K, V), each (N, L, D)."""
        k, v = ops.split(self.kv_linear(y), y.shape[-1], axis=-1)
        return k, v

    def construct(self, x, text_kv, bias):
        """x (N, T, D), text_kv = ``text_kv(y)``, bias (N, 1, 1, L) or (N, heads, T, L) or None -> (N, T, D)."""
        k, v = text_kv
        out = scaled_dot_product_attention(self.q_linear(x), k, v, bias=bias, backend=self.backend,
                                           num_heads=self.num_heads)
        return self.proj(out)


# ----------------------------------------------------------------------------- block & final layer


class PixArtBlock(nn.Cell):
    """LN·modulate → self-attn ·gate; + cross-attn (no norm, no gate); LN·modulate → MLP ·gate."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, kv_compress=None, kv_scale=1, qk_norm=False,
                 backend="math"):
        super().__init__()
        self.norm1 = AdaLayerNorm(hidden_size)
        self.attn = SelfAttention(hidden_size, num_heads, kv_compress, kv_scale, qk_norm, backend)
        self.gate1 = GatedResidual()
        self.cross_attn = CrossAttention(hidden_size, num_heads, backend)
        self.norm2 = AdaLayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.gate2 = GatedResidual()
        self.scale_shift_table = ms.Parameter(ms.Tensor(np.zeros((6, hidden_size), np.float32)),
                                              name="scale_shift_table")

    def construct(self, x, text_kv, text_bias, t0, grid_h, grid_w):
        """x (N, T, D), text_kv = ``cross_attn.text_kv(captions)``, text_bias (see ``embed_inputs``) or
        None, t0 (N, 6D) -> (N, T, D)."""
        mod = self.scale_shift_table.reshape(1, 6, -1) + t0.reshape(t0.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.split(mod, 1, axis=1)  # (N, 1, D)
        x = self.gate1(x, gate_msa, self.attn(self.norm1(x, shift_msa, scale_msa), grid_h, grid_w))
        x = x + self.cross_attn(x, text_kv, text_bias)
        x = self.gate2(x, gate_mlp, self.mlp(self.norm2(x, shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Cell):
    """LN·modulate (from the raw timestep embedding) → Linear to p·p·C_out per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, affine=False)
        self.linear = _dense(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = ms.Parameter(ms.Tensor(np.zeros((2, hidden_size), np.float32)),
                                              name="scale_shift_table")

    def construct(self, x, t):
        mod = self.scale_shift_table.reshape(1, 2, -1) + t.reshape(t.shape[0], 1, -1)
        shift, scale = (expand_tokens(m, x.shape[1]) for m in ops.split(mod, 1, axis=1))
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------- the model


class PixArtMS(nn.Cell):
    """PixArt diffusion transformer for any aspect ratio (the "MS" models).

    Args:
        config: the architecture (``PixArtConfig``, or its fields as keyword arguments).
        attention_backend: "auto", "math" or "flash" (see ``pixart.models.attention``).
        dtype: parameter dtype (norms and softmax compute in fp32 regardless).
        initialize: draw the original initialisation (``from_pretrained`` skips it).
    """

    fixed_grid = False

    def __init__(self, config=None, attention_backend="auto", dtype=ms.float32, initialize=True, **fields_):
        super().__init__()
        config = PixArtConfig.from_dict(config) if isinstance(config, dict) else (config or PixArtConfig())
        config = config.replace(**fields_)
        backend = resolve_backend(attention_backend)
        kv = config.kv_compress_config or {}
        kv_layers = set(kv.get("kv_compress_layer") or []) if kv.get("sampling") else set()
        if kv.get("sampling") and kv["sampling"] not in KV_COMPRESS_MODES:
            raise ConfigError(f"kv_compress sampling must be one of {KV_COMPRESS_MODES}, got {kv['sampling']!r}")
        if config.hidden_size % config.num_heads:
            raise ConfigError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        if not kv_layers and config.kv_compress_config is not None:
            config = config.replace(kv_compress_config=None)
        self.config = config
        patch_size, in_channels, hidden_size = config.patch_size, config.in_channels, config.hidden_size
        num_heads, mlp_ratio, qk_norm = config.num_heads, config.mlp_ratio, config.qk_norm
        self.patch_size, self.in_channels = patch_size, in_channels
        self.out_channels = in_channels * 2 if config.learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.base_size = config.input_size // patch_size
        self.pe_interpolation = float(config.pe_interpolation)
        self.micro_condition = config.micro_condition

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.SequentialCell(nn.SiLU(), _dense(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(config.caption_channels, hidden_size, config.model_max_length)
        if config.micro_condition:
            self.csize_embedder = SizeEmbedder(hidden_size // 3)
            self.ar_embedder = SizeEmbedder(hidden_size // 3)
        self.blocks = nn.CellList([
            PixArtBlock(hidden_size, num_heads, mlp_ratio,
                        kv.get("sampling") if i in kv_layers else None,
                        kv.get("scale_factor", 1) if i in kv_layers else 1, qk_norm, backend)
            for i in range(config.depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if initialize:  # skipped by from_pretrained, which overwrites the weights anyway
            self.initialize_weights()
        if dtype != ms.float32:
            self.to_dtype(dtype)

    def initialize_weights(self, seed=0, names=None):
        """Original PixArt init: xavier Linear/patch weights, N(0, 0.02) embedders, zeroed cross-attn
        and output projections, tables N(0, 1/D); deterministic for a given seed. ``names``
        limits it to those parameters."""
        rng = np.random.default_rng(seed)
        d = self.hidden_size

        def set_(param, value):
            param.set_data(to_tensor(value.astype(np.float32), param.dtype))

        def xavier(shape):
            fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-bound, bound, size=shape)

        for name, param in self.parameters_and_names():
            if names is not None and name not in names:
                continue
            shape = tuple(param.shape)
            if name.endswith(".bias"):
                set_(param, np.zeros(shape))
            elif name.endswith("scale_shift_table"):
                set_(param, rng.standard_normal(shape) / math.sqrt(d))
            elif name == "y_embedder.y_embedding":
                set_(param, rng.standard_normal(shape) / math.sqrt(shape[1]))
            elif name.endswith("norm.weight") or name.endswith("_norm.weight"):
                set_(param, np.ones(shape))
            elif name.endswith("attn.sr.weight"):
                set_(param, np.full(shape, 1.0 / (shape[-1] * shape[-2])))  # starts as an average
            elif name.startswith(("t_embedder.", "t_block.", "y_embedder.y_proj.", "csize_embedder.", "ar_embedder.")):
                set_(param, rng.normal(0.0, 0.02, size=shape))
            elif name.endswith("cross_attn.proj.weight") or name == "final_layer.linear.weight":
                set_(param, np.zeros(shape))
            else:  # Linear layers and the patch projection
                set_(param, xavier(shape))

    def to_dtype(self, dtype):
        """Cast every parameter to ``dtype`` (norms and softmax still compute in fp32)."""
        if dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU":
            raise ConfigError("bf16 parameters have no MindSpore CPU kernels (Conv2D, MatMul): on CPU keep fp32 "
                              "parameters with bf16 GEMMs (pipelines: dtype bf16, i.e. use_bf16_gemm) or use fp16")
        for _, param in self.parameters_and_names():
            if param.dtype != dtype:
                param.set_dtype(dtype)  # set_data(param.astype(dtype)) would keep the fp32 dtype
        return self

    @property
    def dtype(self):
        return self.x_embedder.proj.weight.dtype

    def pos_embed(self, grid_h, grid_w):
        return sincos_pos_embed_2d(self.hidden_size, grid_h, grid_w, self.base_size, self.pe_interpolation)

    def unpatchify(self, x, grid_h, grid_w):
        """(N, T, p·p·C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c).transpose(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def embed_patches(self, x, grid_h, grid_w):
        """(N, C, H, W) latents -> (N, T, D) patch tokens plus the position embedding of their grid
        (also how a ControlNet embeds its hint latents)."""
        return self.x_embedder(x.astype(self.dtype)) + self.pos_embed(grid_h, grid_w).astype(self.dtype)

    def embed_caption(self, y, drop_ids=None):
        """T5 features (N, L, E) (or (N, 1, L, E)) -> caption tokens (N, L, D); ``drop_ids`` (N,) bool
        replaces those captions by the learned null caption (training)."""
        if y.ndim == 4:
            y = y.squeeze(1)
        return self.y_embedder(y.astype(self.dtype), drop_ids)

    def text_context(self, y, drop_ids=None):
        """Caption features (N, L, E) -> what the blocks' cross-attention attends to: per block its
        (K, V), each (N, L, D).

        It depends on neither the latents nor the timestep, so a sampler computes it once per
        prompt and passes it as ``y`` at every step: the same result as passing the features,
        without the caption projection and 28 K/V projections per step (by FLOPs about 7% of an
        XL-2 step at 256² with 128 text tokens, 14% with 300).
        """
        y = self.embed_caption(y, drop_ids)
        return tuple(block.cross_attn.text_kv(y) for block in self.blocks)

    def embed_inputs(self, x, timestep, mask=None, resolution=None, aspect_ratio=None):
        """What the blocks take besides the text, from ``construct``'s inputs.

        Returns (tokens (N, T, D), text_bias (N, heads, T, L) for the math attention, (N, 1, 1, L)
        for the fused ones, or None; t (N, D) timestep embedding,
        t0 (N, 6D) adaLN-single modulation, grid_h, grid_w).
        """
        dtype = self.dtype
        batch = x.shape[0]
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if self.micro_condition:
            resolution = tile_rows(resolution, batch, "resolution")
            aspect_ratio = tile_rows(aspect_ratio, batch, "aspect_ratio")
        if self.fixed_grid and (grid_h != self.base_size or grid_w != self.base_size):
            raise ValueError("PixArt (fixed grid) only takes latents of its input_size; use PixArtMS")
        x = self.embed_patches(x, grid_h, grid_w)
        t = self.t_embedder(with_spare_row(timestep), dtype)
        if self.micro_condition:
            t = t + ops.concat([self.csize_embedder(with_spare_row(resolution), dtype),
                                self.ar_embedder(with_spare_row(aspect_ratio), dtype)], axis=1)
        t0, t = self.t_block(t)[:batch], t[:batch]
        text_bias = None if mask is None else mask_to_bias(tile_rows(mask.reshape(mask.shape[0], -1), batch, "mask"))
        cross_attn = self.blocks[0].cross_attn
        if text_bias is not None and cross_attn.backend == "math":
            # expanded once here so the 28 blocks add it shape-for-shape (see expand_tokens); the
            # fused backends take the (N, 1, 1, L) padding mask as it is
            heads = cross_attn.num_heads
            text_bias = ops.broadcast_to(text_bias, (batch, heads, x.shape[1], text_bias.shape[-1]))
        return x, text_bias, t, t0, grid_h, grid_w

    def decode_tokens(self, x, t, grid_h, grid_w):
        """Final layer and unpatchify: (N, T, D) tokens -> (N, C_out, H, W) fp32."""
        x = self.final_layer(x, t)
        return self.unpatchify(x, grid_h, grid_w).astype(ms.float32)

    def construct(self, x, timestep, y, mask=None, resolution=None, aspect_ratio=None, drop_ids=None):
        """Predict noise (and variance).

        Args:
            x: (N, C, H, W) noisy latents; H, W multiples of the patch size.
            timestep: (N,) diffusion timesteps.
            y: (N, L, E) caption features (or (N, 1, L, E) as the original code passes them), or
                their ``text_context`` (computed once for all steps of a sampler).
            mask: (N, L) 1 for real tokens, 0 for padding; None attends to all.
            resolution: (N, 2) image (height, width) and aspect_ratio (N, 1): micro-conditions.
            drop_ids: (N,) bool, replace those captions by the null caption (training; features only).

            mask, resolution and aspect_ratio may also have N/k rows (the official sampler passes
            B rows with 2B latents under guidance); they are then tiled k times, as the official
            model does.
        Returns:
            (N, C_out, H, W), C_out = 2C with learned sigma.
        """
        if isinstance(y, tuple) and drop_ids is not None:
            raise ValueError("drop_ids replaces caption features; a precomputed text_context has none")
        text = y if isinstance(y, tuple) else self.text_context(y, drop_ids)
        x, text_bias, t, t0, grid_h, grid_w = self.embed_inputs(x, timestep, mask, resolution, aspect_ratio)
        for i, block in enumerate(self.blocks):
            x = block(x, text[i], text_bias, t0, grid_h, grid_w)
        return self.decode_tokens(x, t, grid_h, grid_w)


class PixArt(PixArtMS):
    """PixArt on the fixed square token grid of its training size (the 256×256 models)."""

    fixed_grid = True


def compile_blocks_once(model):
    """Let graph mode compile each distinct block of ``model`` (a DiT, or a ``ControlPixArt`` with
    its copied blocks) once instead of once per block: XL-2's 28 blocks share one graph (the
    compile of a 256² step on CPU: 10.9 → 6.3 s, ``bench_compile.py``), with bitwise the same outputs. Blocks that
    differ (a LoRA on some of them, KV compression) get graphs of their own. Call it right before
    the first graph-mode call of ``model`` (the pipelines do)."""
    share_compiled_graph(cell for _, cell in model.cells_and_names() if isinstance(cell, PixArtBlock))


def PixArt_XL_2(**kwargs):
    return PixArt(**PRESETS["XL-2"], **kwargs)


def PixArtMS_XL_2(**kwargs):
    return PixArtMS(**PRESETS["XL-2"], **kwargs)

RUNTIME_ARGS = ("attention_backend", "dtype", "initialize")


def build_pixart(config, fixed_grid=False, **overrides):
    """A PixArtMS (or the fixed-grid PixArt) from a ``PixArtConfig`` or its dict, with overrides of
    its fields or of the runtime arguments (``attention_backend``, ``dtype``, ``initialize``)."""
    config = PixArtConfig.from_dict(config) if isinstance(config, dict) else config
    runtime = {k: overrides.pop(k) for k in RUNTIME_ARGS if k in overrides}
    cls = PixArt if fixed_grid else PixArtMS
    return cls(config.replace(**overrides), **runtime)
