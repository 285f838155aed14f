"""The one attention: scaled dot-product attention with a backend switch.

Every model in the project (the DiT's self/cross attention, T5, the VAE's mid-block) calls
``scaled_dot_product_attention``; the models own only their projections.

Backends:
- ``"math"``: matmul -> softmax (fp32) -> matmul with MindSpore ops; runs everywhere.
- ``"flash"``: MindSpore's fused ``flash_attention_score`` kernel (Ascend Atlas A2 only).
- ``"auto"`` (default): ``"flash"`` on Ascend, ``"math"`` elsewhere.
"""
import math

import mindspore as ms
from mindspore import ops

BACKENDS = ("auto", "math", "flash")
# Finite in fp16 too (max 65504): -1e9 becomes -inf there and 0·inf poisons kept tokens with NaN.
# exp(-3e4) is exactly 0 in fp32, and a fully-masked row still gives a uniform softmax.
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


def scaled_dot_product_attention(q, k, v, bias=None, scale=None, backend="math"):
    """softmax(q kᵀ · scale + bias) v.

    Args:
        q: (N, H, L, D) queries.
        k, v: (N, H, S, D) keys and values.
        bias: optional additive bias broadcastable to (N, H, L, S): a padding mask from
            ``mask_to_bias`` or a position bias (T5). Added in fp32.
        scale: multiplier of q kᵀ; default 1/sqrt(D). T5 uses 1.0.
        backend: ``"math"`` or ``"flash"`` (call ``resolve_backend`` once, outside the hot path).
    Returns:
        (N, H, L, D) in q's dtype. Softmax is computed in fp32 whatever the input dtype.
    """
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if backend == "flash":
        return _flash_attention(q, k, v, bias, scale)
    scores = ops.BatchMatMul(transpose_b=True)(q * scale, k).astype(ms.float32)
    if bias is not None:
        scores = scores + bias.astype(ms.float32)
    probs = ops.softmax(scores, axis=-1).astype(v.dtype)
    return ops.BatchMatMul()(probs, v)


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
