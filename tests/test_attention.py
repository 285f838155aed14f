"""The one attention against PyTorch's scaled_dot_product_attention."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import mindspore as ms

from pixart.models.attention import mask_to_bias, resolve_backend, scaled_dot_product_attention


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
