"""T5 v1.1 text encoder (the encoder half of T5-XXL that conditions PixArt-α / PixArt-Σ).

One pre-norm Transformer encoder, built so that every parameter's MindSpore name IS the Hugging
Face key (``shared.weight``, ``encoder.block.0.layer.0.SelfAttention.q.weight``, ...): a
``text_encoder/`` folder loads by name with ``load_into_cell``, no key mapping.

    input_ids (N, L) -> shared (embedding) -> encoder.block[0..n) -> encoder.final_layer_norm
                     -> last hidden state (N, L, D), D = d_model (4096 for XXL)

Each block: x + SelfAttention(RMSNorm(x)), then x + FeedForward(RMSNorm(x)). T5 specifics:
RMSNorm without mean or bias, no biases anywhere, no 1/sqrt(d) attention scaling (it is folded
into the trained weights), and a learned relative position bias that only block 0 owns and all
blocks add to their attention scores.

Memory: T5-XXL has 4.76 B parameters (19 GB in fp32), too much for a 24 GiB machine next to the
DiT. The big matrices (q, k, v, o, wi, wo) can therefore be *stored* in half precision
(``weight_dtype``, by default whatever half dtype the checkpoint has) and are upcast one matrix
at a time inside ``Linear`` for fp32 compute; MindSpore's CPU kernels have no bf16 matmul. On CPU
the bf16 upcast is a custom kernel (``pixart.ops.cpu_kernels``, ~10× faster than MindSpore's Cast,
which cost a third of the encoder's time); ``use_bf16_gemm=True`` instead runs the projections as
bf16 GEMMs (bf16 products, fp32 sums: about twice the fp32 speed).
Loading maps the safetensors copy-on-write: projections kept in their stored dtype use the file's
pages directly (no second copy of T5-XXL), and tensors converted to another dtype are copied one
at a time through a map that is dropped after each, so file pages never pile up.
"""
import functools
import json
import math
import os
from dataclasses import dataclass, fields

import ml_dtypes
import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from pixart.models.layers import gelu_tanh
from pixart.models.attention import mask_to_bias, resolve_backend, scaled_dot_product_attention
from pixart.ops import cpu_kernels
from pixart.utils.checkpoint import find_weight_files, load_into_cell, read_safetensors, read_state_dict
from pixart.utils.errors import CheckpointError, ConfigError

HF_REPO_HINT = ("it comes from the Hugging Face repo PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers "
                "(folder text_encoder/)")

_HALF_DTYPES = {np.dtype(np.float16): ms.float16, np.dtype(ml_dtypes.bfloat16): ms.bfloat16}


# ----------------------------------------------------------------------------- config


@dataclass
class T5Config:
    """The fields of a transformers ``T5Config`` (config.json) that the encoder uses.

    Defaults are transformers' own, so a config.json that omits a field means the same here.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"T5 config: {f.name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError("T5 config: relative_attention_num_buckets must be at least 4")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"T5 config: layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        parts = str(self.feed_forward_proj).split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACTIVATIONS:
            raise ConfigError(f"T5 config: feed_forward_proj {self.feed_forward_proj!r} is not supported; "
                              f"use one of {sorted(ACTIVATIONS)} optionally prefixed by 'gated-'")

    @property
    def is_gated(self):
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self):
        # transformers maps "gated-gelu" (the T5 v1.1 name) to the tanh approximation "gelu_new".
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_dict(cls, raw, source="config"):
        if raw.get("model_type", "t5") not in ("t5", "mt5"):
            raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} is not a T5 encoder "
                              "(expected 't5'; umT5's per-layer position bias is not supported)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_json_file(cls, path):
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: unreadable T5 config.json ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=path)


# ----------------------------------------------------------------------------- building blocks


ACTIVATIONS = {
    "gelu_new": gelu_tanh,  # transformers' NewGELUActivation: the tanh approximation
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0))),
    "relu": ops.relu,
    "silu": ops.silu,
    "swish": ops.silu,
}


def _zeros(shape, dtype):
    # Placeholders that cost nothing: MindSpore leaves zero pages untouched until written, and
    # from_pretrained overwrites every weight (a random init of 4.7 B values takes minutes).
    return initializer("zeros", shape, dtype)


class Linear(nn.Cell):
    """y = x Wᵀ without bias; W is (out, in) like torch and may be stored in a half dtype.

    nn.Dense cannot mix a bf16 weight with fp32 inputs, and CPU MindSpore has no bf16 matmul, so
    the weight is upcast to the input's dtype here, one matrix at a time (transient memory only):
    by ``upcast`` (the fast bf16 -> fp32 kernel, set by T5Encoder on CPU) or else MindSpore's Cast.
    ``matmul`` is MindSpore's MatMul, or in fp32 on CPU the kernels' sgemm (set by T5Encoder).
    """

    bf16_gemm_compatible = True  # pixart.ops.cpu_kernels.use_bf16_gemm may swap it for a bf16 GEMM

    def __init__(self, in_features, out_features, weight_dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(_zeros((out_features, in_features), weight_dtype), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)
        self.upcast = None

    def construct(self, x):
        """x (..., in) -> (..., out)."""
        if self.weight.dtype == x.dtype:
            weight = self.weight
        elif self.upcast is not None and x.dtype == ms.float32:
            weight = self.upcast(self.weight)
        else:
            weight = self.weight.astype(x.dtype)
        out = self.matmul(x.reshape(-1, x.shape[-1]), weight)
        return out.reshape(x.shape[:-1] + (weight.shape[0],))


class Embedding(nn.Cell):
    """Token embedding with a ``weight`` (V, D) parameter (nn.Embedding names it embedding_table).

    Kept in the compute dtype: CPU MindSpore cannot gather bf16, and it is only 3% of T5-XXL.
    """

    def __init__(self, num_embeddings, dim, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(_zeros((num_embeddings, dim), dtype), name="weight")

    def construct(self, ids):
        """ids (...) int -> (..., D)."""
        return ops.gather(self.weight, ids, 0)


class RMSNorm(nn.Cell):
    """T5LayerNorm: x / sqrt(mean(x²) + eps) · weight; no mean subtraction, no bias.

    The mean of squares is taken in fp32 whatever the compute dtype (as transformers does).
    """

    def __init__(self, dim, eps=1e-6, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(_zeros((dim,), dtype), name="weight")
        self.eps = eps

    def construct(self, x):
        """x (N, L, D) -> (N, L, D)."""
        x32 = x.astype(ms.float32)
        variance = ops.mean(x32 * x32, -1, keep_dims=True)
        return self.weight * (x32 * ops.rsqrt(variance + self.eps)).astype(x.dtype)


def relative_position_buckets(query_length, key_length, num_buckets, max_distance):
    """Bidirectional T5 bucket of every (query i, key j) pair: (Lq, Lk) int32 in [0, num_buckets).

    Half the buckets are for keys after the query. Within a half, distances below half of it get
    their own bucket; larger ones share log-spaced buckets up to max_distance, beyond which all
    distances share the last one. Computed in float32 like transformers, so the truncation at the
    log-bucket boundaries lands on the same side.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # key - query
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) on the exact branch, unused
        log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
        scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
        large = max_exact + np.nan_to_num(scaled, neginf=0.0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class Attention(nn.Cell):
    """T5 self-attention: q, k, v, o projections without bias, scores not scaled by 1/sqrt(d).

    Only the first block has ``relative_attention_bias`` (num_buckets, H); its ``position_bias``
    is computed once per forward and shared by every block.
    """

    def __init__(self, config, has_relative_bias, dtype, weight_dtype, backend):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        self.q = Linear(config.d_model, inner, weight_dtype)
        self.k = Linear(config.d_model, inner, weight_dtype)
        self.v = Linear(config.d_model, inner, weight_dtype)
        self.o = Linear(inner, config.d_model, weight_dtype)
        self.backend = backend
        if has_relative_bias:
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance
            self.relative_attention_bias = Embedding(self.num_buckets, config.num_heads, dtype)
            self._bucket_cache = {}

    def position_bias(self, length):
        """The learned relative position bias for a length-L sequence: (1, H, L, L)."""
        if length not in self._bucket_cache:  # the bucket ids depend only on L
            self._bucket_cache[length] = ms.Tensor(
                relative_position_buckets(length, length, self.num_buckets, self.max_distance))
        bias = self.relative_attention_bias(self._bucket_cache[length])  # (L, L, H)
        return bias.transpose(2, 0, 1).expand_dims(0)

    def _heads(self, x):
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x, bias):
        """x (N, L, D), bias (N or 1, H, L, L) position bias + padding mask -> (N, L, D)."""
        n, length, _ = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        out = scaled_dot_product_attention(q, k, v, bias=bias, scale=1.0, backend=self.backend)
        return self.o(out.transpose(0, 2, 1, 3).reshape(n, length, self.num_heads * self.head_dim))


class FeedForward(nn.Cell):
    """wo(act(wi_0 x) · wi_1 x) for the gated variants (v1.1), wo(act(wi x)) otherwise."""

    def __init__(self, config, weight_dtype):
        super().__init__()
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, weight_dtype)
            self.wi_1 = Linear(config.d_model, config.d_ff, weight_dtype)
        else:
            self.wi = Linear(config.d_model, config.d_ff, weight_dtype)
        self.wo = Linear(config.d_ff, config.d_model, weight_dtype)
        self.act = ACTIVATIONS[config.activation]

    def construct(self, x):
        """x (N, L, D) -> (N, L, D)."""
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(hidden)


class AttentionSublayer(nn.Cell):
    """x + SelfAttention(layer_norm(x)) (transformers' T5LayerSelfAttention)."""

    def __init__(self, config, has_relative_bias, dtype, weight_dtype, backend):
        super().__init__()
        self.SelfAttention = Attention(config, has_relative_bias, dtype, weight_dtype, backend)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype)

    def construct(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class FeedForwardSublayer(nn.Cell):
    """x + DenseReluDense(layer_norm(x)) (transformers' T5LayerFF)."""

    def __init__(self, config, dtype, weight_dtype):
        super().__init__()
        self.DenseReluDense = FeedForward(config, weight_dtype)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype)

    def construct(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Cell):
    """One encoder block; ``layer`` is a list so names read ``layer.0.*`` / ``layer.1.*`` as in HF."""

    def __init__(self, config, has_relative_bias, dtype, weight_dtype, backend):
        super().__init__()
        self.layer = nn.CellList([
            AttentionSublayer(config, has_relative_bias, dtype, weight_dtype, backend),
            FeedForwardSublayer(config, dtype, weight_dtype),
        ])
        # fp16 activations of T5 v1.1 overflow; clamp like transformers so inf never propagates.
        self.clamp = float(np.finfo(np.float16).max) - 1000 if dtype == ms.float16 else None

    def _clamp(self, x):
        return x if self.clamp is None else ops.clamp(x, -self.clamp, self.clamp)

    def construct(self, x, bias):
        """x (N, L, D) -> (N, L, D)."""
        x = self._clamp(self.layer[0](x, bias))
        return self._clamp(self.layer[1](x))


class Encoder(nn.Cell):
    """The block stack and final norm (transformers' T5Stack without its embedding)."""

    def __init__(self, config, dtype, weight_dtype, backend):
        super().__init__()
        self.block = nn.CellList([Block(config, i == 0, dtype, weight_dtype, backend)
                                  for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype)

    def construct(self, x, mask):
        """x (N, L, D) embeddings, mask (N, L) with 1 = token, 0 = padding -> (N, L, D)."""
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])  # (1, H, L, L)
        bias = bias + mask_to_bias(mask)  # + (N, 1, 1, L): padded keys get MASK_FILL (-3e4)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


# ----------------------------------------------------------------------------- the model


class T5Encoder(nn.Cell):
    """T5 encoder: token ids (N, L) -> last hidden state (N, L, d_model).

    Args:
        config: a ``T5Config``.
        dtype: compute dtype, also that of the embedding, norms and position bias
            (float32 is the reference; float16 runs on CPU but is lossy).
        weight_dtype: storage dtype of the projection matrices (default: ``dtype``); float16 or
            bfloat16 halve the memory, each matrix is upcast to ``dtype`` when used.
        backend: attention backend, see ``pixart.models.attention``.

    The constructor makes zero placeholders (free until written); T5 is only used pretrained,
    so build it with ``from_pretrained`` or fill it with ``load_into_cell``.
    """

    def __init__(self, config, dtype=ms.float32, weight_dtype=None, backend="auto"):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.weight_dtype = weight_dtype or dtype
        self.shared = Embedding(config.vocab_size, config.d_model, dtype)
        self.encoder = Encoder(config, dtype, self.weight_dtype, resolve_backend(backend))
        if dtype == ms.float32 and ms.get_context("device_target") == "CPU":
            self._use_cpu_kernels()

    def _use_cpu_kernels(self):
        """fp32 on CPU: the projections by the kernels' sgemm (``pixart.ops.cpu_kernels.f32_matmul_op``)
        and bf16-stored weights upcast by the custom kernel (same values as Cast, ~10× faster)."""
        if not cpu_kernels.kernels_available("T5 CPU kernels"):  # it warned once; MindSpore's ops are used
            return
        matmul = cpu_kernels.f32_matmul_op()
        upcast = cpu_kernels.bf16_to_fp32_op() if self.weight_dtype == ms.bfloat16 else None
        for _, cell in self.cells_and_names():
            if isinstance(cell, Linear):
                cell.matmul, cell.upcast = matmul, upcast

    def construct(self, input_ids, attention_mask=None):
        """input_ids (N, L) int, attention_mask (N, L) 1/0 (default all ones) -> (N, L, D)."""
        if attention_mask is None:
            attention_mask = ops.ones(input_ids.shape, ms.int32)
        x = self.shared(input_ids.astype(ms.int32))
        return self.encoder(x, attention_mask)

    @classmethod
    def from_pretrained(cls, folder, dtype=ms.float32, weight_dtype="auto", backend="auto", use_bf16_gemm=False):
        """Load a transformers ``text_encoder/`` folder (config.json + weights).

        Weights: model.safetensors, sharded ``*.safetensors`` with their index json (read without
        torch, memory-mapped), or ``pytorch_model*.bin`` (read by the safe unpickler). Decoder and
        lm_head keys of a full T5 checkpoint are ignored; the token embedding may be stored as
        ``shared.weight`` or ``encoder.embed_tokens.weight`` (they are tied).

        weight_dtype: ``"auto"`` keeps the checkpoint's half dtype (fp16/bf16 files stay half in
        memory, upcast per matrix), and uses ``dtype`` for fp32 files; or give a MindSpore dtype,
        e.g. ``ms.bfloat16`` to hold an fp32 T5-XXL in 9.5 GB instead of 19 GB.

        use_bf16_gemm: on CPU, run the projections as bf16 GEMMs (``pixart.ops.cpu_kernels``):
        weights stored bf16, activations rounded to bf16 at each projection, fp32 sums and
        outputs, about twice the fp32 speed. Where the kernel cannot run (no compiler, no
        AVX512-BF16/AMX-BF16, not CPU) it warns once and keeps the fp32 path.

        Raises CheckpointError (missing folder/file, weights that do not fit config.json) or
        ConfigError (invalid config.json), each with a one-line message saying what to fix.
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(f"T5 text encoder folder {folder} does not exist; {HF_REPO_HINT}")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{config_path} is missing; {HF_REPO_HINT}")
        config = T5Config.from_json_file(config_path)
        state = _encoder_state(folder)
        if weight_dtype == "auto":
            weight_dtype = _HALF_DTYPES.get(_stored_dtype(state, "encoder.block.0.layer.0.SelfAttention.q.weight"), dtype)
        model = cls(config, dtype=dtype, weight_dtype=weight_dtype, backend=backend)
        try:
            load_into_cell(model, state, source=f"T5 weights in {folder}")
        except CheckpointError as err:
            raise CheckpointError(f"{err}; check that config.json and the weights come from the same "
                                  "model") from None
        if use_bf16_gemm:
            cpu_kernels.use_bf16_gemm(model)
        model.set_train(False)
        return model


# ----------------------------------------------------------------------------- loading helpers


class _MappedTensor:
    """One tensor of a safetensors file, read only when loaded.

    A parameter of the stored dtype adopts ``private_view()``: the file's pages through a
    copy-on-write map, shared with the page cache, nothing copied (T5-XXL in bf16: no second
    9.5 GB, so the file stays cached beside the model). A parameter of another dtype converts
    ``np.asarray(tensor)``: each read maps the file, copies the tensor and drops the map, so the
    pages it touched leave the resident set again (peak: the model plus one tensor).
    """

    def __init__(self, path, name, shape, dtype, shared_map):
        self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), np.dtype(dtype)
        self._shared_map = shared_map

    def private_view(self):
        """The tensor in the file's copy-on-write map (writable; writes never reach the file)."""
        return self._shared_map()[self.name]

    def __array__(self, dtype=None, copy=None):
        array = np.array(read_safetensors(self.path)[self.name])  # own copy; the map is released
        return array if dtype is None else array.astype(dtype)


def _encoder_state(folder):
    """{HF key: array or _MappedTensor} of the encoder's weights in a text_encoder folder."""
    try:
        files = find_weight_files(folder)
    except CheckpointError:
        raise CheckpointError(f"no weights in {folder} (expected model.safetensors, sharded *.safetensors "
                              f"with an index json, or pytorch_model.bin); {HF_REPO_HINT}") from None
    state = {}
    for path in files:
        if path.endswith(".safetensors"):
            shared_map = functools.lru_cache(maxsize=1)(functools.partial(read_safetensors, path, copy_on_write=True))
            for name, view in read_safetensors(path).items():  # header only: nothing is read yet
                state[name] = _MappedTensor(path, name, view.shape, view.dtype, shared_map)
        else:
            state.update(read_state_dict(path))
    # A full T5 (encoder-decoder) checkpoint: the decoder and LM head are not ours.
    state = {k: v for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}
    embed = state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    if "shared.weight" not in state and embed is not None:
        state["shared.weight"] = embed
    return state


def _stored_dtype(state, name):
    value = state.get(name)
    return None if value is None else np.dtype(value.dtype)
