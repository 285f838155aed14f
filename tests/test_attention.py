"""The one attention against PyTorch's scaled_dot_product_attention."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import mindspore as ms

from pixart.models.attention import mask_to_bias, resolve_backend, scaled_dot_product_attention
from tiny_models import tiny_pixart


def test_auto_backend_is_math_off_ascend():
    assert resolve_backend("auto") == "math"
    with pytest.raises(ValueError):
        resolve_backend("cuda")


@pytest.mark.parametrize("scale", [None, 1.0])
def test_masked_attention_matches_torch(scale):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)])
    mask = np.array([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.float32)
    out = scaled_dot_product_attention(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v),
                                       bias=mask_to_bias(ms.Tensor(mask)), scale=scale).asnumpy()
    ref = F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                         attn_mask=torch.from_numpy(mask).bool()[:, None, None, :],
                                         scale=scale).numpy()
    assert out.shape == (2, 3, 5, 8)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _token_major(x):
    """(N, H, L, D) -> (N, L, H·D)."""
    n, h, length, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(n, length, h * d))


@pytest.mark.parametrize("backend", ["math", "cpu"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lengths", [(5, 7), (37, 300)])  # 300 keys: query blocks of the cpu kernel < 37 rows
def test_token_major_layout_matches_torch(backend, masked, lengths):
    """(N, L, H·D) inputs with num_heads, for the math backend and the fused CPU kernel (which the
    pipelines switch on with use_fused_attention), eager and compiled."""
    from pixart.ops import cpu_kernels

    if backend == "cpu":
        cpu_kernels.use_fused_attention(tiny_pixart())  # makes the kernel's ops
    t, s = lengths
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in [(3, 4, t, 8), (3, 4, s, 8), (3, 4, s, 8)])
    mask = np.ones((3, s), np.float32)
    mask[0, 3:] = 0
    mask[2, :-1] = 0  # only the last key
    bias = mask_to_bias(ms.Tensor(mask)) if masked else None
    ref = F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                         attn_mask=torch.from_numpy(mask).bool()[:, None, None, :] if masked else None)
    ref = _token_major(ref.numpy())
    if masked:
        np.testing.assert_array_equal(ref[2], _token_major(np.repeat(v[:, :, -1:], t, axis=2))[2])
    def attend(a, b, c):
        return scaled_dot_product_attention(a, b, c, bias=bias, backend=backend, num_heads=4)

    inputs = [ms.Tensor(_token_major(x)) for x in (q, k, v)]
    for out in (attend(*inputs), ms.jit(attend)(*inputs)):  # eager, then compiled
        assert out.shape == (3, t, 32)
        np.testing.assert_allclose(out.asnumpy(), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lengths", [(5, 7), (70, 300)])
def test_cpu_bf16_backend_is_bf16_attention_on_amx_and_fp32_elsewhere(monkeypatch, masked, lengths):
    """The backend of bf16-GEMM models: on CPUs with AMX, q, k, v and the probabilities rounded to bf16
    with fp32 sums (as torch's bf16 attention), checked against that rounding done in float64; elsewhere
    the fp32 kernel, against torch fp32."""
    from pixart.ops import cpu_kernels

    monkeypatch.setenv("PIXART_BF16_GEMM", "emulate")  # bf16 layers on any CPU, so the model gets "cpu-bf16"
    model = tiny_pixart()
    cpu_kernels.use_bf16_gemm(model)
    cpu_kernels.use_fused_attention(model)
    assert model.blocks[0].attn.backend == "cpu-bf16"
    t, s = lengths
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) * 2 for shape in [(2, 3, t, 24), (2, 3, s, 24),
                                                                                (2, 3, s, 24)])
    mask = np.ones((2, s), np.float32)
    mask[0, 4:] = 0
    bias = mask_to_bias(ms.Tensor(mask)) if masked else None
    out = scaled_dot_product_attention(*(ms.Tensor(_token_major(x)) for x in (q, k, v)), bias=bias,
                                       backend="cpu-bf16", num_heads=3).asnumpy()
    if not cpu_kernels.amx_ready():
        ref = F.scaled_dot_product_attention(*(torch.from_numpy(x) for x in (q, k, v)),
                                             attn_mask=torch.from_numpy(mask).bool()[:, None, None, :] if masked else None)
        ref = _token_major(ref.numpy())  # the fp32 kernel's 2e-6 of unit-scale outputs, relative here
        assert np.abs(out - ref).max() < 2e-6 * np.abs(ref).max()
        return
    def bf16(x):
        return torch.from_numpy(x).bfloat16().double()

    scores = bf16(q) @ bf16(k).transpose(-1, -2) / np.sqrt(24)
    if masked:
        scores = scores.masked_fill(~torch.from_numpy(mask).bool()[:, None, None, :], -np.inf)
    probs = torch.softmax(scores, -1).bfloat16().double()
    ref = _token_major((probs @ bf16(v)).numpy())
    fp32 = _token_major(F.scaled_dot_product_attention(*(torch.from_numpy(x) for x in (q, k, v)),
                        attn_mask=torch.from_numpy(mask).bool()[:, None, None, :] if masked else None).numpy())
    assert np.abs(out - ref).max() < 2e-3 < np.abs(out - fp32).max()


def test_cpu_kernel_refuses_what_it_does_not_compute():
    from pixart.ops import cpu_kernels

    cpu_kernels.use_fused_attention(tiny_pixart())
    q = ms.Tensor(np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="num_heads"):
        scaled_dot_product_attention(q, q, q, backend="cpu")
    tokens = ms.Tensor(np.zeros((1, 3, 8), np.float32))
    with pytest.raises(ValueError, match="key-padding"):
        scaled_dot_product_attention(tokens, tokens, tokens, bias=ms.Tensor(np.zeros((1, 2, 3, 3), np.float32)),
                                     backend="cpu", num_heads=2)
