"""The one attention: scaled dot-product attention with a backend switch.

Every model in the project (the DiT's self/cross attention, T5, the VAE's mid-block) calls
``scaled_dot_product_attention``; the models own only their projections.

Backends:
- ``"math"``: matmul -> softmax (fp32) -> matmul with MindSpore ops; runs everywhere.
- ``"flash"``: MindSpore's fused ``flash_attention_score`` kernel (Ascend Atlas A2 only).
- ``"cpu"``: the fused CPU kernel of ``pixart.ops.cpu_kernels`` (fp32, token-major inputs, a
  key-padding bias at most; no gradient: for inference, so not a construction choice: a model's
  attention is switched to it by ``pixart.ops.cpu_kernels.use_fused_attention``).
- ``"cpu-bf16"``: the same kernel with bf16 operands and fp32 sums on the AMX tile unit (fp32 on
  CPUs without AMX): what ``use_fused_attention`` picks for a model with bf16 GEMM layers.
- ``"auto"`` (default): ``"flash"`` on Ascend, ``"math"`` elsewhere.

Layouts: (N, H, L, D) tensors, or with ``num_heads`` the token-major (N, L, H·D) tensors the
projections produce (the DiT): the fused backends then need no transposes into and out of heads.
"""
import math

import mindspore as ms
from mindspore import ops

from pixart.ops import cpu_kernels

BACKENDS = ("auto", "math", "flash")
# Finite in fp16 too (max 65504): -1e9 becomes -inf there and 0·inf poisons kept tokens with NaN.
# exp(-3e4) is exactly 0 in fp32; a fully-masked row stays finite (its softmax is over the shifted scores).
MASK_FILL = -30000.0


def resolve_backend(backend="auto"):
    """Map ``"auto"`` to the concrete backend for the current device target."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flash" if ms.get_context("device_target") == "Ascend" else "math"
    return backend


def mask_to_bias(mask, dtype=ms.float32):
    """Key-padding mask (N, M) with 1 = attend, 0 = padding -> additive bias (N, 1, 1, M)."""
    keep = mask.astype(dtype).reshape(mask.shape[0], 1, 1, mask.shape[-1])
    return (1.0 - keep) * MASK_FILL


def scaled_dot_product_attention(q, k, v, bias=None, scale=None, backend="math", num_heads=None):
    """softmax(q kᵀ · scale + bias) v.

    Args:
        q: (N, H, L, D) queries, or (N, L, H·D) with ``num_heads``.
        k, v: (N, H, S, D) keys and values, or (N, S, H·D) with ``num_heads``.
        bias: optional additive bias broadcastable to (N, H, L, S): a padding mask from
            ``mask_to_bias`` (N, 1, 1, S) or a position bias (T5). Added in fp32. The ``"cpu"``
            backend takes a padding mask only.
        scale: multiplier of q kᵀ; default 1/sqrt(D). T5 uses 1.0.
        backend: ``"math"``, ``"flash"``, ``"cpu"`` or ``"cpu-bf16"`` (call ``resolve_backend`` once, outside
            the hot path).
        num_heads: heads of token-major inputs (None: the inputs are (N, H, L, D)).
    Returns:
        q's layout and dtype. Softmax is computed in fp32 whatever the input dtype.
    """
    if num_heads is None:
        head_dim = q.shape[-1]
    else:
        head_dim = q.shape[-1] // num_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if backend in ("cpu", "cpu-bf16"):
        if num_heads is None:
            raise ValueError("the cpu attention kernel takes token-major (N, L, H·D) inputs: pass num_heads")
        return _cpu_attention(q, k, v, bias, scale, num_heads, bf16=backend == "cpu-bf16")
    if num_heads is None:
        return _attention_heads(q, k, v, bias, scale, backend)
    n, length, width = q.shape
    out = _attention_heads(_to_heads(q, num_heads), _to_heads(k, num_heads), _to_heads(v, num_heads), bias, scale,
                           backend)
    return out.transpose(0, 2, 1, 3).reshape(n, length, width)


def _attention_heads(q, k, v, bias, scale, backend):
    """The math and flash backends on (N, H, L, D) tensors."""
    if backend == "flash":
        return _flash_attention(q, k, v, bias, scale)
    scores = ops.BatchMatMul(transpose_b=True)(q * scale, k).astype(ms.float32)
    if bias is not None:
        scores = scores + bias.astype(ms.float32)
    probs = ops.softmax(scores, axis=-1).astype(v.dtype)
    return ops.BatchMatMul()(probs, v)


def _to_heads(x, num_heads):
    """(N, L, H·D) -> (N, H, L, D)."""
    n, length, width = x.shape
    return x.reshape(n, length, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def _cpu_attention(q, k, v, bias, scale, num_heads, bf16=False):
    if bias is not None:
        if bias.shape[1] != 1 or bias.shape[2] != 1:
            raise ValueError("the cpu attention kernel takes a key-padding bias (N, 1, 1, S) only")
        bias = bias.reshape(bias.shape[0], bias.shape[-1]).astype(ms.float32)
    return cpu_kernels.fused_attention(q, k, v, bias, num_heads, scale, bf16=bf16)


def _flash_attention(q, k, v, bias, scale):
    """Ascend fused kernel. It needs fp16/bf16 and a head dim that is a multiple of 16, so the
    head dim is zero-padded (zeros change neither q kᵀ nor the kept output columns); the bias is
    passed as a boolean drop-mask when it is a padding mask, else as the position shift."""
    batch, heads, _, head_dim = q.shape
    in_dtype = q.dtype
    compute_dtype = in_dtype if in_dtype in (ms.float16, ms.bfloat16) else ms.float16
    pad = (-head_dim) % 16
    if pad:
        q, k, v = (ops.pad(t, (0, pad)) for t in (q, k, v))
    q, k, v = (t.astype(compute_dtype) for t in (q, k, v))
    attn_mask, real_shift = None, None
    if bias is not None:
        if bias.shape[1] == 1 and bias.shape[2] == 1:  # key-padding mask (N, 1, 1, S)
            attn_mask = ops.broadcast_to(bias < MASK_FILL / 2, (batch, 1, q.shape[2], k.shape[2]))
        else:
            real_shift = ops.broadcast_to(bias, (batch, heads, q.shape[2], k.shape[2])).astype(compute_dtype)
    out = ops.flash_attention_score(q, k, v, heads, real_shift=real_shift, attn_mask=attn_mask,
                                    scalar_value=scale, input_layout="BNSD")
    if pad:
        out = out[..., :head_dim]
    return out.astype(in_dtype)
