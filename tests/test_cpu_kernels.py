"""The CPU bf16 GEMM / fast upcast kernels (pixart.ops.cpu_kernels) and use_bf16_gemm on the DiT.

Reference semantics of the bf16 GEMM: torch fp32 matmul of the bf16-rounded operands (only the
summation order differs), and diffusers' model run in bf16 for the end-to-end parity.
"""
import logging
import os

import ml_dtypes
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import nn

from pixart.models.pixart_weights import from_pretrained
from pixart.ops import cpu_kernels
from pixart.ops.cpu_kernels import (Bf16Linear, Bf16Mlp, FusedAdaLayerNorm, FusedGatedResidual, FusedLinear, FusedMlp,
                                    bf16_gemm_layers, fused_attention_layers, fused_linear_layers, fused_norm_layers,
                                    use_bf16_gemm, use_fused_attention, use_fused_linears, use_fused_norms)
from test_pixart_dit import inputs, ms_forward, tiny_diffusers, torch_forward
from tiny_models import with_bf16_rounded_linears


@pytest.fixture(autouse=True)
def bf16_gemm_on_every_cpu(monkeypatch):
    """The bf16 layers on any x86-64 CPU: natively with AVX512-BF16, else the kernel's exact fp32
    emulation (which use_bf16_gemm otherwise declines there, as slower than fp32)."""
    monkeypatch.setenv("PIXART_BF16_GEMM", "emulate")


def _round_bf16(a):
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def _rel_err(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("x_dtype", [ms.float32, ms.bfloat16])
def test_cpu_kernels_equals_fp32_matmul_of_bf16_operands(x_dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 130), np.float32) * 4
    w = rng.standard_normal((67, 130), np.float32)
    out = cpu_kernels.bf16_matmul_op()(ms.Tensor(x, dtype=x_dtype), ms.Tensor(w, dtype=ms.bfloat16))
    assert out.dtype == ms.float32 and out.shape == (3, 7, 67)
    # x fp32 is rounded to bf16 inside the kernel, to nearest even like torch's .bfloat16()
    expected = torch.from_numpy(x).bfloat16().float() @ torch.from_numpy(_round_bf16(w)).T
    assert _rel_err(out.asnumpy(), expected.numpy()) < 1e-6


@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_matmul_bias_and_gelu_are_applied_in_the_kernel(gelu):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 130), np.float32) * 2
    w = rng.standard_normal((67, 130), np.float32)  # 67 outputs: four 16-wide vectors and a 3-wide tail
    b = rng.standard_normal(67).astype(np.float32)
    out = cpu_kernels.bf16_matmul_op(bias=True, gelu=gelu)(ms.Tensor(x), ms.Tensor(w, dtype=ms.bfloat16), ms.Tensor(b))
    assert out.shape == (2, 9, 67) and out.dtype == ms.float32
    expected = torch.from_numpy(x).bfloat16().float() @ torch.from_numpy(_round_bf16(w)).T + torch.from_numpy(b)
    if gelu:
        expected = torch.nn.functional.gelu(expected, approximate="tanh")
    assert _rel_err(out.asnumpy(), expected.numpy()) < 1e-6
    assert (out.asnumpy() < 0).any()


@pytest.mark.parametrize("m,n,k", [(100, 300, 1000), (33, 48, 64), (1, 16, 27)])
def test_bf16_matmul_on_every_blocking_of_the_gemm(m, n, k):
    """Shapes that cover the GEMM's blocking (on AMX CPUs: 32-row weight blocks and 16-column panels, with
    a 16-row block, an odd panel, and K padded to 32 where it is not a multiple) and its tails."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((m, k), np.float32)
    w = rng.standard_normal((n, k), np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    out = cpu_kernels.bf16_matmul_op(bias=True, gelu=True)(ms.Tensor(x), ms.Tensor(w, dtype=ms.bfloat16),
                                                            ms.Tensor(b)).asnumpy()
    pre = _round_bf16(x).astype(np.float64) @ _round_bf16(w).astype(np.float64).T + b
    expected = torch.nn.functional.gelu(torch.from_numpy(pre), approximate="tanh").numpy()
    assert out.shape == (m, n)
    assert _rel_err(out, expected) < 1e-6


@pytest.mark.parametrize("gelu", [False, True])
def test_f32_linear_kernel_matches_float64(gelu):
    """x·wᵀ + b (then tanh-GELU) by the fp32 kernel: fp32 rounding only (67 outputs: eight 8-wide
    vectors and a 3-wide tail; 1 and 2 rows too)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((67, 130)).astype(np.float32) / 8
    b = rng.standard_normal(67).astype(np.float32)
    op = cpu_kernels.f32_linear_op(gelu)
    for shape in [(2, 9, 130), (1, 130), (2, 130)]:
        x = rng.standard_normal(shape).astype(np.float32) * 2
        out = op(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b))
        assert out.shape == shape[:-1] + (67,) and out.dtype == ms.float32
        expected = x.astype(np.float64) @ w.T.astype(np.float64) + b
        if gelu:
            expected = 0.5 * expected * (1 + np.tanh(np.sqrt(2 / np.pi) * (expected + 0.044715 * expected ** 3)))
            assert (expected < -0.1).any()  # the GELU's negative lobe is exercised
        assert _rel_err(out.asnumpy(), expected) < 1e-6


def test_f32_matmul_kernel_and_the_sgemm_it_uses():
    """x·wᵀ without bias (T5's projections), by numpy's OpenBLAS sgemm where numpy bundles one (as
    the pinned numpy<2 wheels do), written into rows that start at zero (not uninitialised memory)."""
    path, symbol = cpu_kernels.numpy_openblas()
    assert os.path.isfile(path) and symbol.endswith("sgemm64_")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((67, 130)).astype(np.float32) / 8
    op = cpu_kernels.f32_matmul_op()
    for shape in [(2, 9, 130), (1, 130)]:
        x = rng.standard_normal(shape).astype(np.float32) * 2
        out = op(ms.Tensor(x), ms.Tensor(w))
        assert out.shape == shape[:-1] + (67,) and out.dtype == ms.float32
        assert _rel_err(out.asnumpy(), x.astype(np.float64) @ w.T.astype(np.float64)) < 1e-6
    empty = op(ms.Tensor(np.zeros((3, 0), np.float32)), ms.Tensor(np.zeros((4, 0), np.float32))).asnumpy()
    np.testing.assert_array_equal(empty, np.zeros((3, 4), np.float32))


def test_t5_projections_run_on_the_sgemm_kernel(tmp_path):
    from pixart.models.t5 import Linear, T5Config, T5Encoder

    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                      feed_forward_proj="gated-gelu")
    linears = [c for _, c in T5Encoder(config).cells_and_names() if isinstance(c, Linear)]
    assert len(linears) == 7 and all("F32MatMul" in str(c.matmul.func) for c in linears)

@pytest.mark.parametrize("dim", [1152, 20])
def test_ada_layer_norm_and_gated_residual_kernels(dim):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, dim)).astype(np.float32) * 3 + 1
    shift, scale, gate = (rng.standard_normal((3, 1, dim)).astype(np.float32) for _ in range(3))
    h = rng.standard_normal((3, 5, dim)).astype(np.float32)
    x64 = x.astype(np.float64)
    normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    out = cpu_kernels.ada_layer_norm_op()(ms.Tensor(x), ms.Tensor(shift), ms.Tensor(scale)).asnumpy()
    np.testing.assert_allclose(out, normed * (1 + scale) + shift, rtol=0, atol=2e-6)
    out = cpu_kernels.gated_residual_op()(ms.Tensor(x), ms.Tensor(gate), ms.Tensor(h)).asnumpy()
    np.testing.assert_array_equal(out, x + gate * h)  # one rounding per op, as numpy's float32


def test_use_fused_norms_dit_matches_diffusers_in_both_modes(tmp_path):
    tiny_diffusers(seed=5).save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    x, t, y, mask = inputs()
    plain = ms_forward(model, x, t, y, mask)
    assert use_fused_norms(model) == fused_norm_layers(model) == 4 * len(model.blocks)
    assert isinstance(model.blocks[0].norm1, FusedAdaLayerNorm) and isinstance(model.blocks[0].gate2, FusedGatedResidual)
    eager = ms_forward(model, x, t, y, mask)
    reference = torch_forward(tiny_diffusers(seed=5), x, t, y, mask)
    assert _rel_err(eager, reference) < 1e-5
    np.testing.assert_allclose(eager, plain, rtol=0, atol=2e-6 * np.abs(plain).max())
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = ms_forward(model, x, t, y, mask)
    np.testing.assert_allclose(graph, eager, rtol=0, atol=1e-6 * np.abs(eager).max())


@pytest.mark.parametrize("micro", [False, True])
def test_use_fused_linears_and_attention_dit_matches_diffusers_in_both_modes(tmp_path, micro):
    """Every fp32 Dense of the DiT (the Mlps with their GELU inside fc1's kernel) as FusedLinear and
    every attention as the fused kernel, on top of the fused norms (what the pipelines run on CPU):
    diffusers parity, Parameter names kept."""
    # PixArt-α 1024-MS's size embedders take hidden/3 each: 3 heads of 8
    reference_model = lambda: tiny_diffusers(seed=6, micro=micro, heads=3 if micro else 2)  # noqa: E731
    reference_model().save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    names = [name for name, _ in model.parameters_and_names()]
    x, t, y, mask = inputs(h=8, w=12)
    added = {"resolution": np.array([[64.0, 96.0]] * 2, np.float32), "aspect_ratio": np.array([[1.5]] * 2, np.float32)}
    kw = added if micro else {}
    plain = ms_forward(model, x, t, y, mask, **kw)
    use_fused_norms(model)
    # per block: qkv, proj, q_linear, kv_linear, cross proj, the Mlp's two; then the timestep Mlp's
    # two, t_block, the caption Mlp's two, the final linear (and two Mlps of micro-conditions)
    expected_layers = 7 * len(model.blocks) + 6 + (4 if micro else 0)
    assert use_fused_linears(model) == fused_linear_layers(model) == expected_layers
    assert isinstance(model.blocks[0].mlp, FusedMlp) and isinstance(model.blocks[0].attn.qkv, FusedLinear)
    assert [name for name, _ in model.parameters_and_names()] == names
    assert all(param.name == name for name, param in model.parameters_and_names())
    assert use_fused_linears(model) == 0  # nothing left to swap
    assert use_fused_attention(model) == fused_attention_layers(model) == 2 * len(model.blocks)
    assert model.blocks[0].attn.backend == model.blocks[0].cross_attn.backend == "cpu"
    eager = ms_forward(model, x, t, y, mask, **kw)
    torch_kw = {"added": {k: torch.from_numpy(v) for k, v in added.items()}} if micro else {}
    reference = torch_forward(reference_model(), x, t, y, mask, **torch_kw)
    assert _rel_err(eager, reference) < 1e-5
    np.testing.assert_allclose(eager, plain, rtol=0, atol=2e-6 * np.abs(plain).max())
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = ms_forward(model, x, t, y, mask, **kw)
    np.testing.assert_allclose(graph, eager, rtol=0, atol=1e-6 * np.abs(eager).max())


def test_bf16_to_fp32_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)  # all bf16 values: ±0, subnormals, ±inf, NaNs
    values = bits.view(ml_dtypes.bfloat16).reshape(256, 256)
    out = cpu_kernels.bf16_to_fp32_op()(ms.Tensor(values.astype(np.float32), dtype=ms.bfloat16)).asnumpy()
    expected = (bits.astype(np.uint32) << 16).view(np.float32).reshape(256, 256)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(out.view(np.uint32)[finite], expected.view(np.uint32)[finite])
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))


def test_bf16_gemm_self_test_and_cache(tmp_path, monkeypatch):
    """Compiled once into the cache dir; a second call reuses the library."""
    monkeypatch.setenv("PIXART_CACHE_DIR", str(tmp_path))
    cpu_kernels.kernel_library.cache_clear()
    cpu_kernels.bf16_gemm_library.cache_clear()
    try:
        path = cpu_kernels.bf16_gemm_library()
        assert path.startswith(str(tmp_path)) and path.endswith(".so")
        mtime = (tmp_path / "ops").stat().st_mtime_ns, len(list((tmp_path / "ops").iterdir()))
        cpu_kernels.kernel_library.cache_clear()
        assert cpu_kernels.kernel_library() == path
        assert ((tmp_path / "ops").stat().st_mtime_ns, len(list((tmp_path / "ops").iterdir()))) == mtime
    finally:
        cpu_kernels.kernel_library.cache_clear()
        cpu_kernels.bf16_gemm_library.cache_clear()




def test_use_bf16_gemm_dit_matches_diffusers(tmp_path):
    reference = tiny_diffusers()
    reference.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    fp32_fc1 = model.blocks[0].mlp.fc1.weight.asnumpy()
    dense_count = sum(isinstance(c, nn.Dense) for _, c in model.cells_and_names())
    names = [n for n, _ in model.parameters_and_names()]
    assert use_bf16_gemm(model) == dense_count == bf16_gemm_layers(model) > 10
    assert not any(isinstance(c, nn.Dense) for _, c in model.cells_and_names())
    assert isinstance(model.blocks[0].mlp, Bf16Mlp) and model.blocks[0].mlp.fc1.gelu  # GELU inside fc1's kernel
    assert [n for n, _ in model.parameters_and_names()] == names  # checkpoint names unchanged
    # and each Parameter's own name is its full path again (MindSpore renames moved Parameters
    # relative to their new cell: 'proj.weight' in every block, duplicates for checkpoints/optimizers)
    assert [p.name for _, p in model.parameters_and_names()] == names
    bf16_layers = [c for _, c in model.cells_and_names() if isinstance(c, Bf16Linear)]
    assert all(c.weight.dtype == ms.bfloat16 for c in bf16_layers)
    fc1 = model.blocks[0].mlp.fc1.weight
    np.testing.assert_array_equal(fc1.astype(ms.float32).asnumpy(), _round_bf16(fp32_fc1))
    x, t, y, mask = inputs()
    out = ms_forward(model, x, t, y, mask)
    # exact semantics: fp32 everywhere except bf16-rounded linear inputs and weights; a bf16
    # rounding may flip with the summation order (none does here: measured 4e-8), one ulp is 3.9e-3
    exact = torch_forward(with_bf16_rounded_linears(tiny_diffusers()), x, t, y, mask)
    assert _rel_err(out, exact) < 4e-3
    # diffusers in bf16 (bf16 activations everywhere): the same to bf16 accuracy
    with torch.no_grad():
        ref_bf16 = reference.to(torch.bfloat16)(
            torch.from_numpy(x).bfloat16(), encoder_hidden_states=torch.from_numpy(y).bfloat16(),
            timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
            return_dict=False)[0].float().numpy()
    fp32 = torch_forward(tiny_diffusers(), x, t, y, mask)
    assert _rel_err(out, ref_bf16) < 2e-2
    assert _rel_err(out, fp32) < _rel_err(ref_bf16, fp32)  # fp32 activations: closer to fp32 than bf16 torch


def test_use_bf16_gemm_dit_graph_mode_equals_pynative(tmp_path):
    tiny_diffusers(seed=3).save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    use_bf16_gemm(model)
    x, t, y, mask = inputs()
    eager = ms_forward(model, x, t, y, mask)
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = ms_forward(model, x, t, y, mask)
    np.testing.assert_allclose(graph, eager, rtol=0, atol=1e-5 * np.abs(eager).max())


def test_fallback_without_compiler_warns_once_and_keeps_fp32(tmp_path, monkeypatch, caplog):
    tiny_diffusers(seed=4).save_pretrained(tmp_path / "dit")
    model = from_pretrained(str(tmp_path / "dit"))
    x, t, y, mask = inputs()
    before = ms_forward(model, x, t, y, mask)
    monkeypatch.setenv("PIXART_CACHE_DIR", str(tmp_path / "cache"))  # nothing compiled there yet
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    for fn in (cpu_kernels.kernel_library, cpu_kernels.bf16_gemm_library, cpu_kernels._warn_once):
        fn.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pixart.ops.cpu_kernels"):
            assert use_bf16_gemm(model) == 0
            assert use_bf16_gemm(model) == 0
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and "\n" not in messages[0]
        assert "no-such-compiler-xyz" in messages[0] and "fp32" in messages[0]
        assert any(isinstance(c, nn.Dense) for _, c in model.cells_and_names())
        np.testing.assert_array_equal(ms_forward(model, x, t, y, mask), before)
    finally:
        for fn in (cpu_kernels.kernel_library, cpu_kernels.bf16_gemm_library, cpu_kernels._warn_once):
            fn.cache_clear()


def test_fallback_on_cpu_without_bf16_flags(monkeypatch, caplog):
    """Without bf16 instructions use_bf16_gemm declines (one warning line) unless
    PIXART_BF16_GEMM=emulate; the ops still run, with the same results."""
    monkeypatch.delenv("PIXART_BF16_GEMM")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "avx512f"})
    cpu_kernels._warn_once.cache_clear()
    model = nn.SequentialCell(nn.Dense(8, 4))
    try:
        with caplog.at_level(logging.WARNING, logger="pixart.ops.cpu_kernels"):
            assert not cpu_kernels.bf16_gemm_available()
            assert use_bf16_gemm(model) == 0 and isinstance(model[0], nn.Dense)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and "AVX512-BF16" in messages[0] and "PIXART_BF16_GEMM=emulate" in messages[0]
        assert cpu_kernels.fast_upcast_available()  # the upcast needs no bf16 instructions
        monkeypatch.setenv("PIXART_BF16_GEMM", "emulate")
        assert cpu_kernels.bf16_gemm_available() and use_bf16_gemm(model) == 1
    finally:
        cpu_kernels._warn_once.cache_clear()


def test_pipeline_use_bf16_gemm_matches_diffusers_bf16(tmp_path):
    """from_pretrained(use_bf16_gemm=True) (what sample.py --dtype bf16 does on CPU): the DiT and
    T5 run bf16 GEMMs; images agree with diffusers' pipeline in bf16 to bf16 accuracy."""
    import diffusers

    from pixart import PixArtSigmaPipeline
    from tests.tiny_models import make_pipeline_folder, seeded_latents

    folder = make_pipeline_folder(tmp_path / "sigma")
    latents = seeded_latents((1, 4, 4, 4))
    kwargs = dict(prompt="a red cube", negative_prompt="", num_inference_steps=4, height=32, width=32)
    pipe = PixArtSigmaPipeline.from_pretrained(str(folder), use_bf16_gemm=True)
    assert any(isinstance(c, Bf16Linear) for _, c in pipe.text_encoder.cells_and_names())
    assert any(isinstance(c, Bf16Linear) for _, c in pipe.transformer.cells_and_names())
    assert not any(isinstance(c, nn.Dense) for _, c in pipe.transformer.cells_and_names())
    out = np.stack(pipe(latents=latents, use_resolution_binning=False, output_type="np", progress=False,
                        **kwargs).images)
    fp32 = np.stack(PixArtSigmaPipeline.from_pretrained(str(folder))(
        latents=latents, use_resolution_binning=False, output_type="np", progress=False, **kwargs).images)
    reference = diffusers.PixArtSigmaPipeline.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = reference(latents=torch.from_numpy(latents).bfloat16(), use_resolution_binning=False, output_type="np",
                        **kwargs).images
    ref = np.asarray(ref, np.float32)
    assert out.shape == ref.shape == (1, 32, 32, 3) and ref.std() > 0.05
    # pixels in [0, 1]; measured: 0.010 from our fp32 pipeline, 0.015 from diffusers bf16, which is
    # itself 0.015 from our fp32 (bf16 activations everywhere)
    assert np.abs(out - fp32).max() < 0.03
    assert np.abs(out - ref).max() < 0.03
    assert np.abs(out - fp32).max() < np.abs(ref - fp32).max()


def test_pipeline_fuses_norms_on_cpu_and_the_compile_cache_tells_the_variants_apart(tmp_path, monkeypatch):
    """An fp32 DiT on CPU runs the fused norm and linear kernels; the graph-cache signature counts
    fused and bf16-GEMM layers, so a --dtype bf16 run never loads the fp32 run's graph (or the reverse)."""
    from pixart import PixArtSigmaPipeline
    from pixart.utils import compile_cache
    from tests.tiny_models import make_pipeline_folder, seeded_latents

    folder = make_pipeline_folder(tmp_path / "sigma")
    signatures = []
    monkeypatch.setattr(compile_cache, "use_graph_cache", lambda root, signature: signatures.append(signature))
    kwargs = dict(prompt="a red cube", negative_prompt="", num_inference_steps=2, height=32, width=32,
                  latents=seeded_latents((1, 4, 4, 4)), use_resolution_binning=False, output_type="np", progress=False)
    for bf16 in (False, True):
        pipe = PixArtSigmaPipeline.from_pretrained(str(folder), use_bf16_gemm=bf16)
        pipe.mode, pipe.compile_cache = "graph", str(tmp_path / "cache")
        assert fused_norm_layers(pipe.transformer) == 4 * len(pipe.transformer.blocks)
        assert pipe(**kwargs).images[0].shape == (32, 32, 3)
    depth = len(pipe.transformer.blocks)
    assert [s["fused_norm_layers"] for s in signatures] == [4 * depth] * 2
    assert signatures[0]["bf16_gemm_layers"] == 0 < signatures[1]["bf16_gemm_layers"]
    # fp32: every linear layer fused; bf16: all of them are bf16 GEMMs instead
    assert [s["fused_linear_layers"] for s in signatures] == [7 * depth + 6, 0]
    assert [s["fused_attention_layers"] for s in signatures] == [2 * depth] * 2


CONV_GEOMETRIES = [(3, 1, 1, (2, 5, 9, 11)), (1, 1, 0, (1, 6, 4, 7)), (3, 2, 0, (1, 5, 9, 8)), (2, 2, 0, (2, 3, 6, 6))]


def _conv_case(k, stride, padding, shape, seed):
    """Random input, weight and bias, and an nn.Conv2d (7 outputs) holding them: borders, strides, 1×1, odd sizes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    w = rng.standard_normal((7, shape[1], k, k)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    conv = nn.Conv2d(shape[1], 7, k, stride=stride, pad_mode="pad" if padding else "valid", padding=padding,
                     has_bias=True)
    conv.weight.set_data(ms.Tensor(w))
    conv.bias.set_data(ms.Tensor(b))
    return x, w, b, conv


@pytest.mark.parametrize("k,stride,padding,shape", CONV_GEOMETRIES)
def test_bf16_conv2d_equals_fp32_conv_of_bf16_operands(k, stride, padding, shape):
    """im2col + the bf16 GEMM (borders, strides, 1×1 and odd sizes) against torch's fp32 conv of the
    same bf16-rounded input and weight, plus the fp32 bias."""
    x, w, b, conv = _conv_case(k, stride, padding, shape, seed=3)
    fp32 = conv(ms.Tensor(x)).asnumpy()
    layer = cpu_kernels.Bf16Conv2d(conv)
    assert layer.weight is conv.weight and layer.weight.dtype == ms.bfloat16
    out = layer(ms.Tensor(x)).asnumpy()
    expected = torch.nn.functional.conv2d(torch.from_numpy(_round_bf16(x)), torch.from_numpy(_round_bf16(w)),
                                          torch.from_numpy(b), stride=stride, padding=padding).numpy()
    assert out.shape == expected.shape == fp32.shape
    assert _rel_err(out, expected) < 1e-6
    assert 1e-4 < _rel_err(out, fp32) < 2e-2  # bf16 operands: close to fp32, not equal


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_kernel_matches_torch(silu):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 12, 5, 70)).astype(np.float32) * 2 + 3  # 350 values per channel: tails
    gamma, beta = (rng.standard_normal(12).astype(np.float32) for _ in range(2))
    config = ms.Tensor(np.array([4, 1e-6, float(silu)], np.float32))
    out = cpu_kernels.group_norm_op()(ms.Tensor(x), ms.Tensor(gamma), ms.Tensor(beta), config).asnumpy()
    x64 = torch.from_numpy(x).double()
    expected = torch.nn.functional.group_norm(x64, 4, torch.from_numpy(gamma).double(),
                                              torch.from_numpy(beta).double(), eps=1e-6)
    if silu:
        expected = torch.nn.functional.silu(expected)
    np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=2e-6)
    assert (out < 0).any()


@pytest.mark.parametrize("k,stride,padding,shape", CONV_GEOMETRIES)
def test_f32_conv2d_matches_torch(k, stride, padding, shape):
    """im2col + the fp32 sgemm (borders, strides, 1×1 and odd sizes, batch) against torch's fp32 conv."""
    x, w, b, conv = _conv_case(k, stride, padding, shape, seed=4)
    layer = cpu_kernels.F32Conv2d(conv)
    assert layer.weight is conv.weight and layer.weight.dtype == ms.float32
    out = layer(ms.Tensor(x)).asnumpy()
    expected = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                          torch.from_numpy(b).double(), stride=stride, padding=padding).numpy()
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert np.abs(expected).max() > 10


def test_vae_kernels_match_diffusers(tmp_path):
    """use_fused_norms (GroupNorm + SiLU) keeps the VAE at fp32 parity; use_bf16_gemm(convs=True)
    (sample.py --dtype bf16) stays closer to diffusers fp32 than diffusers bf16 does."""
    from pixart.models.autoencoder_kl import AutoencoderKL
    from tiny_models import VAE_CONFIGS, tiny_vae_variant

    ref = tiny_vae_variant(VAE_CONFIGS["sd_like"])
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    z = np.random.default_rng(5).standard_normal((1, 4, 6, 5)).astype(np.float32)
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(z)).sample.numpy()
        bf16 = ref.to(torch.bfloat16).decode(torch.from_numpy(z).bfloat16()).sample.float().numpy()
    model = AutoencoderKL.from_pretrained(str(tmp_path))
    # 2 per resnet (encoder 4 levels × 2 resnets, decoder 4 × 3), each mid block 2 resnets + attention, 2 outputs
    assert use_fused_norms(model) == fused_norm_layers(model) == 2 * (4 * 2 + 4 * 3) + 2 * 5 + 2
    assert all(p.name == name for name, p in model.parameters_and_names())  # full paths, no duplicates
    np.testing.assert_allclose(model.decode(z).asnumpy(), expected, rtol=0, atol=1e-4)
    fp32 = AutoencoderKL.from_pretrained(str(tmp_path))  # as the pipelines run an fp32 VAE on CPU
    use_fused_norms(fp32)
    swapped = cpu_kernels.use_conv_kernels(fp32)
    convs = sum(isinstance(c, cpu_kernels.F32Conv2d) for _, c in fp32.cells_and_names())
    assert swapped == convs > 40 and not any(
        isinstance(c, nn.Conv2d) for _, c in fp32.cells_and_names())
    assert all(p.name == name for name, p in fp32.parameters_and_names())
    np.testing.assert_allclose(fp32.decode(z).asnumpy(), expected, rtol=0, atol=1e-4)
    swapped = cpu_kernels.use_bf16_gemm(model, convs=True)
    convs = sum(isinstance(c, cpu_kernels.Bf16Conv2d) for _, c in model.cells_and_names())
    assert swapped == bf16_gemm_layers(model) and convs > 40 and not any(
        isinstance(c, (nn.Conv2d, nn.Dense)) for _, c in model.cells_and_names())
    assert all(p.name == name for name, p in model.parameters_and_names())
    out = model.decode(z).asnumpy()
    assert np.abs(expected).max() > 0.1
    assert 1e-4 < np.abs(out - expected).max() < np.abs(bf16 - expected).max()
