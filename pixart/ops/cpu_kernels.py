"""CPU kernels as MindSpore ``ops.Custom`` AOT ops: bf16 GEMM, fast bf16 -> fp32 upcast, fused norms,
fp32 linears, attention and convolutions.

MindSpore 2.7's CPU backend has no bf16 MatMul, its bf16 -> fp32 Cast is slow (about 5× an fp16
Cast), and its CPU LayerNorm and broadcasting elementwise ops cost more than the DiT's GEMMs
around them. ``cpu_kernels.cc`` fills those gaps:

    bf16_matmul(x (..., K) fp32|bf16, w (N, K) bf16[, b (N)]) -> (..., N) fp32   bf16 products, fp32 sums,
                                                              optionally + b and tanh-GELU
    bf16_to_fp32(w bf16) -> fp32                              exact, a 16-bit shift
    ada_layer_norm(x (B, T, D), shift, scale (B, 1, D))       LayerNorm(x)·(1 + scale) + shift, fp32
    gated_residual(x (B, T, D), gate (B, 1, D), h (B, T, D))  x + gate·h, fp32
    f32_linear(x (..., K), w (N, K), b (N)) -> (..., N) fp32  x·wᵀ + b (then tanh-GELU), one kernel
    attention(q, k, v (N, L, H·d)[, key_bias (N, S)])         softmax(q kᵀ·scale + bias) v per head, fp32
    f32_conv2d(x (N, C, H, W), w (O, C, k, k), b (O))         the convolution, im2col + sgemm, fp32

On CPUs with AMX-BF16 (Intel Sapphire Rapids and later; ``amx_ready()``) the bf16 GEMMs, and the
``"cpu-bf16"`` attention of bf16-GEMM models, run on the AMX tile unit (~1-1.9 TFLOP/s on 2 cores,
``benchmarks/bench_bf16_gemm.py``). Elsewhere the GEMM is oneDNN's ``gemm_bf16bf16f32`` from the
``libdnnl.so.2`` that ships inside MindSpore, so it needs only a C++ compiler (``$CXX``, default g++).
The library is compiled once per source / MindSpore / compiler version into ``$PIXART_CACHE_DIR``
(default ``~/.cache/pixart``) and checked by a self-test; without a compiler or libdnnl the callers warn once and keep the fp32 MindSpore path.

On a CPU without AVX512-BF16 (e.g. AVX2-only x86) the kernel computes the same products exactly
with oneDNN's fp32 sgemm on fp32 copies of the bf16 operands: the same results up to summation
order, but slower than MindSpore's fp32 path. ``use_bf16_gemm`` then warns once and keeps the fp32
path, unless ``PIXART_BF16_GEMM=emulate`` asks for the bf16 layers anyway (half the weight memory,
and how the tests check these kernels on such CPUs).

``use_bf16_gemm(model)`` switches a model's linear layers (``nn.Dense`` and the T5 ``Linear``)
to the bf16 GEMM, storing their weights in bf16 (half the memory); an ``Mlp``'s fc1 gets its GELU
in the same kernel. ``use_fused_norms(model)`` switches the DiT blocks' ``AdaLayerNorm`` and
``GatedResidual`` (fp32) to their one-pass kernels, and ``use_fused_linears(model)`` its fp32
``nn.Dense`` layers to ``FusedLinear`` (oneDNN's sgemm with the bias, and an ``Mlp``'s GELU, inside
the kernel: XL-2's MLP took 7% less time at 512 rows, 32% at 2048 rows), and ``use_fused_attention``
its attention to the ``"cpu"`` backend (``fused_attention``); ``use_fused_kernels`` does all three.
``use_conv_kernels(model)`` switches an fp32 VAE's ``nn.Conv2d`` layers to ``F32Conv2d`` (1.03-1.23×
MindSpore's Conv2D at the SDXL decoder's shapes, ``benchmarks/bench_conv.py``). They need no bf16
instructions.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import ml_dtypes
import mindspore as ms
import numpy as np
from mindspore import nn, ops

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class KernelUnavailable(RuntimeError):
    """Why the custom kernels cannot be used here (a one-line reason)."""


def cache_dir():
    """Where compiled kernels live: $PIXART_CACHE_DIR, else $XDG_CACHE_HOME/pixart, else ~/.cache/pixart."""
    if os.environ.get("PIXART_CACHE_DIR"):
        return os.environ["PIXART_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pixart")


def _mindspore_lib_dir():
    return os.path.join(os.path.dirname(os.path.abspath(ms.__file__)), "lib")


def _compiler():
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelUnavailable(f"no C++ compiler ({cxx!r} not found; set $CXX)")
    return path


# numpy's bundled OpenBLAS (ILP64) and its CBLAS sgemm symbol, by wheel generation
_OPENBLAS_BUILDS = (("libscipy_openblas64_", "scipy_cblas_sgemm64_"), ("libopenblas64_", "cblas_sgemm64_"))


def numpy_openblas():
    """(path, sgemm symbol) of the OpenBLAS bundled with numpy's wheel, or None (other numpy builds,
    or ``PIXART_SGEMM=onednn``). The fp32 linear kernels use its sgemm instead of oneDNN's: on an
    AVX2 Zen 3 it ran T5's GEMMs 1.1-1.9x faster and the DiT's 0.97-1.24x (``bench_sgemm.py``)."""
    if os.environ.get("PIXART_SGEMM", "").lower() == "onednn":
        return None
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    names = sorted(os.listdir(libs)) if os.path.isdir(libs) else []
    for prefix, symbol in _OPENBLAS_BUILDS:
        for name in names:
            if name.startswith(prefix) and ".so" in name:
                return os.path.join(libs, name), symbol
    return None


def _compile(path, cxx, lib_dir, openblas):
    """Build the shared library at ``path`` atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", SOURCE, "-o", tmp, f"-L{lib_dir}", "-l:libdnnl.so.2",
           f"-Wl,-rpath,{lib_dir}", "-lpthread"]
    if openblas is not None:
        blas_path, symbol = openblas
        cmd += [f"-DPIXART_SGEMM={symbol}", blas_path, f"-Wl,-rpath,{os.path.dirname(blas_path)}"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["?"])[0]
            raise KernelUnavailable(f"compiling {os.path.basename(SOURCE)} failed: {first}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def kernel_library():
    """Path of the compiled kernel library (built on first use); raises KernelUnavailable."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"only built for Linux x86_64 (this is {platform.system()} {platform.machine()})")
    if ms.get_context("device_target") != "CPU":
        raise KernelUnavailable("the kernels are for MindSpore's CPU backend")
    lib_dir = _mindspore_lib_dir()
    if not os.path.isfile(os.path.join(lib_dir, "libdnnl.so.2")):
        raise KernelUnavailable(f"MindSpore's oneDNN (libdnnl.so.2) is not in {lib_dir}")
    cxx = _compiler()
    with open(SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    openblas = numpy_openblas()
    key = hashlib.sha256(b"\0".join([source, ms.__version__.encode(), cxx.encode(), *(v.encode() for v in version),
                                     repr(openblas).encode()]))
    path = os.path.join(cache_dir(), "ops", f"cpu_kernels-{key.hexdigest()[:16]}.so")
    if not os.path.isfile(path):
        _compile(path, cxx, lib_dir, openblas)
    allowed = os.environ.get("MS_CUSTOM_AOT_WHITE_LIST")
    if allowed and not os.path.realpath(path).startswith(os.path.realpath(allowed) + os.sep):
        raise KernelUnavailable(f"MS_CUSTOM_AOT_WHITE_LIST={allowed} does not contain {path} "
                                "(add the cache dir, or set PIXART_CACHE_DIR inside it)")
    return path


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def bf16_gemm_library():
    """The kernel library once its bf16 GEMM gave the exact answer of its self-test (natively, or
    emulated on a CPU without bf16 instructions); raises KernelUnavailable."""
    path = kernel_library()
    status = ctypes.CDLL(path).pixart_bf16_selftest()
    if status != 0:
        raise KernelUnavailable(f"the oneDNN bf16 GEMM self-test failed (status {status})")
    return path


def amx_ready():
    """Whether the bf16 GEMMs and the bf16 attention run on the AMX tile unit here (Intel Sapphire Rapids
    and later, Linux 5.16+; ``PIXART_AMX=0`` turns it off); False where the kernels cannot be built."""
    try:
        return bool(ctypes.CDLL(kernel_library()).pixart_amx_ready())
    except KernelUnavailable:
        return False


def native_bf16():
    """Whether this CPU has bf16 instructions (AVX512-BF16; AMX-BF16 CPUs have it too)."""
    return bool(_cpu_flags() & set(_CPU_BF16_FLAGS))


def _fast_bf16_gemm():
    """bf16_gemm_library, on a CPU where it is faster than fp32 (or PIXART_BF16_GEMM=emulate)."""
    path = bf16_gemm_library()
    if not native_bf16() and os.environ.get("PIXART_BF16_GEMM", "").lower() != "emulate":
        raise KernelUnavailable("this CPU has neither AVX512-BF16 nor AMX-BF16 (the emulated bf16 GEMM is slower "
                                "than fp32; PIXART_BF16_GEMM=emulate uses it anyway)")
    return path


def _available(check, what):
    try:
        check()
        return True
    except KernelUnavailable as err:
        _warn_once(f"{what} unavailable ({err}); using MindSpore's fp32 path")
        return False


@functools.lru_cache(maxsize=None)
def _warn_once(message):
    logger.warning(message)


def bf16_gemm_available():
    """True when the bf16 GEMM runs here and pays off (bf16 instructions, or PIXART_BF16_GEMM=emulate);
    else warns once (one line) and returns False. The ops themselves run on any x86-64 CPU."""
    return _available(_fast_bf16_gemm, "bf16 GEMM")


def kernels_available(what):
    """True when the fp32 kernel library (``kernel_library``) builds here; else warns once (one line,
    naming ``what``) and returns False."""
    return _available(kernel_library, what)


def fast_upcast_available():
    """True when ``bf16_to_fp32`` can run here; else warns once (one line) and returns False."""
    return kernels_available("fast bf16 upcast")


def _matmul_shape(x_shape, w_shape):
    return list(x_shape[:-1]) + [w_shape[0]]


def bf16_matmul_op(bias=False, gelu=False):
    """ops.Custom: (x (..., K) fp32|bf16, w (N, K) bf16[, b (N) fp32]) -> x·wᵀ (+ b) (..., N) fp32, bf16
    products, fp32 sums; ``gelu`` (needs ``bias``) applies tanh-GELU to the result in the kernel."""
    if gelu and not bias:
        raise ValueError("the GELU kernel is the biased one (Bf16MatMulBiasGelu)")
    name = "Bf16MatMulBiasGelu" if gelu else "Bf16MatMulBias" if bias else "Bf16MatMul"
    return ops.Custom(f"{bf16_gemm_library()}:{name}", out_shape=lambda x, w, *b: _matmul_shape(x, w),
                      out_dtype=lambda x, w, *b: ms.float32, func_type="aot")


def ada_layer_norm_op():
    """ops.Custom: (x (B, T, D), shift (B, 1, D), scale (B, 1, D)) fp32 -> LayerNorm(x)·(1 + scale) + shift;
    LayerNorm without affine, eps 1e-6."""
    return ops.Custom(f"{kernel_library()}:AdaLayerNorm", out_shape=lambda x, shift, scale: x,
                      out_dtype=lambda x, shift, scale: ms.float32, func_type="aot")


def gated_residual_op():
    """ops.Custom: (x (B, T, D), gate (B, 1, D), h (B, T, D)) fp32 -> x + gate·h."""
    return ops.Custom(f"{kernel_library()}:GatedResidual", out_shape=lambda x, gate, h: x,
                      out_dtype=lambda x, gate, h: ms.float32, func_type="aot")


def f32_linear_op(gelu=False):
    """ops.Custom: (x (..., K), w (N, K), b (N)) fp32 -> x·wᵀ + b (then tanh-GELU) (..., N) fp32, by an
    sgemm (``numpy_openblas``'s, else oneDNN's) onto rows that start as the bias."""
    name = "F32MatMulBiasGelu" if gelu else "F32MatMulBias"
    return ops.Custom(f"{kernel_library()}:{name}", out_shape=lambda x, w, b: _matmul_shape(x, w),
                      out_dtype=lambda x, w, b: ms.float32, func_type="aot")


def f32_matmul_op():
    """ops.Custom: (x (..., K), w (N, K)) fp32 -> x·wᵀ (..., N) fp32 by the sgemm (T5's projections)."""
    return ops.Custom(f"{kernel_library()}:F32MatMul", out_shape=lambda x, w: _matmul_shape(x, w),
                      out_dtype=lambda x, w: ms.float32, func_type="aot")


def attention_op(key_bias, bf16=False):
    """ops.Custom: (q (N, T, H·d), k (N, S, H·d), v (N, S, H·d)[, key_bias (N, S)], config (H) = the
    scale) fp32 -> softmax(q kᵀ·scale (+ key_bias)) v per head, (N, T, H·d). With ``bf16`` the two
    products take bf16 operands (fp32 sums) on CPUs with AMX, as torch's bf16 attention."""
    name = ("Bf16" if bf16 else "") + ("AttentionBias" if key_bias else "Attention")
    return ops.Custom(f"{kernel_library()}:{name}", out_shape=lambda q, *rest: q,
                      out_dtype=lambda *args: ms.float32, func_type="aot")


# {(key bias?, bf16?): op}: made by use_fused_attention, read by fused_attention inside graphs
ATTENTION_OPS = {}


def fused_attention(q, k, v, key_bias, num_heads, scale, bf16=False):
    """The ``"cpu"`` / ``"cpu-bf16"`` attention backends (``pixart.models.attention``): q (N, T, H·d),
    k/v (N, S, H·d), key_bias (N, S) or None, fp32 -> (N, T, H·d). Needs ``use_fused_attention``."""
    config = ops.full((num_heads,), scale, dtype=ms.float32)  # its length tells the kernel the head count
    if key_bias is None:
        return ATTENTION_OPS[False, bf16](q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32), config)
    return ATTENTION_OPS[True, bf16](q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32), key_bias,
                                     config)


def bf16_to_fp32_op():
    """ops.Custom: w bf16 (any shape) -> the same values in fp32."""
    return ops.Custom(f"{kernel_library()}:Bf16ToF32", out_shape=lambda w: w, out_dtype=lambda w: ms.float32,
                      func_type="aot")


def bf16_gated_gelu_op():
    """ops.Custom: (x (..., K) fp32, w0 (N, K), w1 (N, K) bf16) -> tanh-GELU(x·w0ᵀ)·(x·w1ᵀ) (..., N) fp32."""
    return ops.Custom(f"{bf16_gemm_library()}:Bf16GatedGelu", out_shape=lambda x, w0, w1: _matmul_shape(x, w0),
                      out_dtype=lambda *args: ms.float32, func_type="aot")


def _conv_shape(stride, padding):
    def out_shape(x, w, b, config):
        k = w[2]
        return [x[0], w[0], (x[2] + 2 * padding - k) // stride + 1, (x[3] + 2 * padding - k) // stride + 1]
    return out_shape


def bf16_conv2d_op(stride, padding):
    """ops.Custom: (x (N, C, H, W) fp32, w (O, C, k, k) bf16, b (O) fp32, config (2) int32 = (stride,
    padding)) -> the convolution (N, O, Ho, Wo) fp32: im2col + the bf16 GEMM, fp32 sums."""
    return ops.Custom(f"{bf16_gemm_library()}:Bf16Conv2d", out_shape=_conv_shape(stride, padding),
                      out_dtype=lambda *args: ms.float32, func_type="aot")


def f32_conv2d_op(stride, padding):
    """ops.Custom: (x (N, C, H, W), w (O, C, k, k), b (O) fp32, config (2) int32 = (stride, padding)) ->
    the convolution (N, O, Ho, Wo) fp32: im2col + the fp32 kernels' sgemm."""
    return ops.Custom(f"{kernel_library()}:F32Conv2d", out_shape=_conv_shape(stride, padding),
                      out_dtype=lambda *args: ms.float32, func_type="aot")


def group_norm_op():
    """ops.Custom: (x (N, C, ...), gamma (C), beta (C), config (3) = (groups, eps, silu)) fp32 ->
    GroupNorm(x)·gamma + beta, then SiLU when config[2] is 1."""
    return ops.Custom(f"{kernel_library()}:GroupNormSilu", out_shape=lambda x, gamma, beta, config: x,
                      out_dtype=lambda *args: ms.float32, func_type="aot")


# ----------------------------------------------------------------------------- layers


def _to_bf16(param):
    """The Parameter itself becomes bf16 (round to nearest even, as ml_dtypes): the kernel library's
    cast on its threads (XL-2's linears 2.7 -> 0.9 s at load; ml_dtypes' cast was ~3x faster than
    ``set_dtype``, and set_data would keep the fp32 dtype)."""
    if param.dtype == ms.bfloat16:
        return
    src = np.ascontiguousarray(param.asnumpy(), dtype=np.float32)
    dst = np.empty(src.shape, ml_dtypes.bfloat16)
    _to_bf16_function()(src.ctypes.data, dst.ctypes.data, src.size)
    param.assign_value(ms.from_numpy(dst))


@functools.lru_cache(maxsize=None)
def _to_bf16_function():
    function = ctypes.CDLL(kernel_library()).pixart_to_bf16
    function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    function.restype = None
    return function


class Bf16Linear(nn.Cell):
    """y = x Wᵀ (+ b) (then tanh-GELU) with W (out, in) stored in bf16, computed by the bf16 GEMM.

    Holds the layer's own Parameter objects (same names), so checkpoints and LoRA still see them.
    The bias stays fp32 and is added in the kernel, as is ``gelu`` (an ``Mlp``'s fc1).
    """

    def __init__(self, weight, bias=None, gelu=False):
        super().__init__()
        _to_bf16(weight)
        self.weight = weight
        if bias is not None:
            bias.set_dtype(ms.float32)
        self.bias = bias
        self.has_bias = bias is not None
        self.gelu = gelu
        if gelu and bias is None:
            raise ValueError("Bf16Linear(gelu=True) needs a bias")
        self.matmul = bf16_matmul_op(bias=self.has_bias, gelu=gelu)

    def construct(self, x):
        """x (..., in) fp32 or bf16 -> (..., out) in x's dtype."""
        if self.has_bias:
            out = self.matmul(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        else:
            out = self.matmul(x.reshape(-1, x.shape[-1]), self.weight)
        out = out.reshape(x.shape[:-1] + (self.weight.shape[0],))
        return out if x.dtype == ms.float32 else out.astype(x.dtype)


class Bf16Mlp(nn.Cell):
    """``Mlp`` with fc1 + GELU as one bf16-GEMM kernel, then fc2: (..., in) -> (..., out)."""

    def __init__(self, mlp):
        super().__init__()
        self.fc1 = Bf16Linear(mlp.fc1.weight, mlp.fc1.bias, gelu=True)
        self.fc2 = Bf16Linear(mlp.fc2.weight, mlp.fc2.bias)

    def construct(self, x):
        return self.fc2(self.fc1(x))


class Bf16GatedFeedForward(nn.Cell):
    """T5 v1.1's gated tanh-GELU ``FeedForward``, wo(GELU(wi_0 x) · wi_1 x): the two input GEMMs and
    the gating as one kernel, then wo. (..., D) -> (..., D); the Linears' own Parameters, in bf16."""

    def __init__(self, ff):
        super().__init__()
        self.wi_0, self.wi_1, self.wo = Bf16Linear(ff.wi_0.weight), Bf16Linear(ff.wi_1.weight), Bf16Linear(ff.wo.weight)
        self.gated = bf16_gated_gelu_op()

    def construct(self, x):
        hidden = self.gated(x.astype(ms.float32).reshape(-1, x.shape[-1]), self.wi_0.weight, self.wi_1.weight)
        out = self.wo(hidden.reshape(x.shape[:-1] + (hidden.shape[-1],)))
        return out if x.dtype == ms.float32 else out.astype(x.dtype)


def _conv_geometry(conv):
    """(stride, padding) of an nn.Conv2d the convolution kernels compute, else None (groups, dilation,
    non-square kernels, strides or paddings, no bias)."""
    padding = conv.padding if isinstance(conv.padding, int) else tuple(conv.padding)
    if isinstance(padding, tuple):
        padding = padding[0] if len(set(padding)) == 1 else None
    square = conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
    if (conv.group != 1 or tuple(conv.dilation) != (1, 1) or not square or not conv.has_bias or padding is None
            or conv.pad_mode not in ("pad", "valid") or conv.data_format != "NCHW"):
        return None
    return int(conv.stride[0]), int(padding) if conv.pad_mode == "pad" else 0


class Bf16Conv2d(nn.Cell):
    """An ``nn.Conv2d`` (NCHW, with bias) as im2col + the bf16 GEMM: (N, C, H, W) fp32 -> (N, O, Ho, Wo)
    fp32. Holds the layer's own Parameters (same names); the weight becomes bf16, the bias stays fp32."""

    def __init__(self, conv):
        super().__init__()
        stride, padding = _conv_geometry(conv)
        _to_bf16(conv.weight)
        self.weight, self.bias = conv.weight, conv.bias
        self.config = ms.Tensor(np.array([stride, padding], np.int32))
        self.op = bf16_conv2d_op(stride, padding)

    def construct(self, x):
        return self.op(x, self.weight, self.bias, self.config)


class F32Conv2d(nn.Cell):
    """An fp32 ``nn.Conv2d`` (NCHW, with bias) as im2col + the kernels' sgemm: (N, C, H, W) -> (N, O, Ho, Wo).
    Holds the layer's own Parameters (same names, fp32)."""

    def __init__(self, conv):
        super().__init__()
        stride, padding = _conv_geometry(conv)
        self.weight, self.bias = conv.weight, conv.bias
        self.config = ms.Tensor(np.array([stride, padding], np.int32))
        self.op = f32_conv2d_op(stride, padding)

    def construct(self, x):
        return self.op(x, self.weight, self.bias, self.config)


class FusedGroupNorm(nn.Cell):
    """The VAE's ``GroupNorm`` (SiLU included when it has one) as one kernel, (N, C, H, W) fp32."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        self.config = ms.Tensor(np.array([norm.num_groups, norm.eps, float(norm.silu)], np.float32))
        self.op = group_norm_op()

    def construct(self, x):
        return self.op(x, self.weight, self.bias, self.config)


class FusedAdaLayerNorm(nn.Cell):
    """``AdaLayerNorm`` as one kernel: x (B, T, D), shift/scale (B, 1, D) fp32 -> (B, T, D)."""

    def __init__(self):
        super().__init__()
        self.op = ada_layer_norm_op()

    def construct(self, x, shift, scale):
        return self.op(x, shift, scale)


class FusedGatedResidual(nn.Cell):
    """``GatedResidual`` as one kernel: x + gate·h, x/h (B, T, D), gate (B, 1, D) fp32."""

    def __init__(self):
        super().__init__()
        self.op = gated_residual_op()

    def construct(self, x, gate, h):
        return self.op(x, gate, h)


class FusedLinear(nn.Cell):
    """An fp32 ``nn.Dense`` with bias as one kernel: x (..., in) -> x Wᵀ + b (then tanh-GELU) (..., out).

    oneDNN's sgemm adds x Wᵀ onto rows that start as the bias, so there is no BiasAdd pass (and with
    ``gelu`` no GELU ops: an ``Mlp``'s fc1). Holds the layer's own Parameters (same names).
    """

    def __init__(self, dense, gelu=False):
        super().__init__()
        self.weight, self.bias = dense.weight, dense.bias
        self.linear = f32_linear_op(gelu)

    def construct(self, x):
        out = self.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.reshape(x.shape[:-1] + (self.weight.shape[0],))


class FusedMlp(nn.Cell):
    """An fp32 ``Mlp`` as two ``FusedLinear`` kernels, the GELU inside the first: (..., in) -> (..., out)."""

    def __init__(self, mlp):
        super().__init__()
        self.fc1 = FusedLinear(mlp.fc1, gelu=True)
        self.fc2 = FusedLinear(mlp.fc2)

    def construct(self, x):
        return self.fc2(self.fc1(x))


def _replaceable(cell):
    """(weight, bias) of a linear layer that Bf16Linear can replace, else None (an Mlp is swapped whole)."""
    if isinstance(cell, nn.Dense):
        if cell.activation_flag:  # nn.Dense(..., activation=...): not used by the models here
            return None
        return cell.weight, (cell.bias if cell.has_bias else None)
    if getattr(cell, "bf16_gemm_compatible", False):  # pixart.models.t5.Linear: weight only
        return cell.weight, None
    return None


def bf16_gemm_layers(model):
    """How many of ``model``'s layers run as bf16 GEMMs (0 for a plain model)."""
    return sum(isinstance(cell, (Bf16Linear, Bf16Conv2d)) for _, cell in model.cells_and_names())


def fused_norm_layers(model):
    """How many of ``model``'s norms and gates run as fused kernels (0 for a plain model)."""
    return sum(isinstance(cell, (FusedAdaLayerNorm, FusedGatedResidual, FusedGroupNorm))
               for _, cell in model.cells_and_names())


def use_bf16_gemm(model, convs=False):
    """Swap every linear layer of ``model`` for a bf16-GEMM ``Bf16Linear`` (and with ``convs`` every
    convolution for a ``Bf16Conv2d``: the VAE), in place.

    Returns the number of layers swapped; 0 (after one warning line, model unchanged) when the
    GEMM is unavailable here. Weights become bf16; everything else (norms, attention, biases, and
    convs unless asked) keeps its dtype. Call it after the weights are loaded.
    """
    from pixart.models.layers import gelu_tanh
    from pixart.models.pixart import Mlp
    from pixart.models.t5 import FeedForward

    if not bf16_gemm_available():
        return 0

    def swap(child):
        if type(child) is FeedForward and child.gated and child.act is gelu_tanh:  # T5 v1.1
            return Bf16GatedFeedForward(child), 3
        if type(child) is Mlp and child.fc1.has_bias and not child.fc1.activation_flag:
            return Bf16Mlp(child), 2
        if convs and isinstance(child, nn.Conv2d) and _conv_geometry(child) is not None:
            return Bf16Conv2d(child), 1
        parts = _replaceable(child)
        return None if parts is None else (Bf16Linear(*parts), 1)

    return _swap_layers(model, swap)


def _swap_layers(model, swap):
    """Replace in place every sub-cell of ``model`` for which ``swap(cell)`` returns (new cell,
    layers it counts for); a replaced cell's children are not visited. Returns the layers counted."""
    from pixart.models.layers import set_child, sync_parameter_names

    swapped, replaced = 0, set()
    for parent in [cell for _, cell in model.cells_and_names()]:
        if id(parent) in replaced:
            continue
        for name, child in list(parent.name_cells().items()):
            result = swap(child)
            if result is not None:
                set_child(parent, name, result[0])
                replaced.add(id(child))
                swapped += result[1]
    sync_parameter_names(model)  # MindSpore renamed the moved Parameters relative to their new cells
    return swapped


def use_fused_norms(model):
    """Swap the DiT blocks' ``AdaLayerNorm`` / ``GatedResidual`` and the VAE's ``GroupNorm`` for their
    one-kernel versions, in place.

    For fp32 models on CPU (bf16-GEMM ones included: their activations are fp32). Returns the
    number swapped; 0 (one warning line, model unchanged) when the kernels cannot be built here.
    """
    from pixart.models.autoencoder_kl import GroupNorm
    from pixart.models.pixart import AdaLayerNorm, GatedResidual

    if not _available(kernel_library, "fused norm kernels"):
        return 0

    def swap(child):
        if type(child) is AdaLayerNorm and child.norm.eps == 1e-6:
            return FusedAdaLayerNorm(), 1
        if type(child) is GatedResidual:
            return FusedGatedResidual(), 1
        if type(child) is GroupNorm and child.weight.dtype == ms.float32:
            return FusedGroupNorm(child), 1
        return None

    return _swap_layers(model, swap)


def use_conv_kernels(model):
    """Swap every fp32 ``nn.Conv2d`` of ``model`` that the kernel computes (see ``_conv_geometry``) for an
    ``F32Conv2d``, in place: the VAE on CPU. Returns the number swapped; 0 (one warning line, model
    unchanged) when the kernels cannot be built here."""
    if not _available(kernel_library, "fp32 convolution kernel"):
        return 0

    def swap(child):
        if (type(child) is nn.Conv2d and child.weight.dtype == ms.float32 and _conv_geometry(child) is not None
                and child.bias.dtype == ms.float32):
            return F32Conv2d(child), 1
        return None

    return _swap_layers(model, swap)


def _fusable_dense(cell):
    """An fp32 ``nn.Dense`` with bias and no activation (what ``FusedLinear`` computes)."""
    return (type(cell) is nn.Dense and cell.has_bias and not cell.activation_flag
            and cell.weight.dtype == ms.float32 and cell.bias.dtype == ms.float32)


def use_fused_linears(model):
    """Swap ``model``'s fp32 linear layers (``nn.Dense`` with bias) for ``FusedLinear`` kernels and its
    ``Mlp``s for ``FusedMlp`` (GELU in the fc1 kernel), in place.

    For fp32 DiTs on CPU (layers already swapped by ``use_bf16_gemm`` are left alone). Returns the
    number of layers swapped; 0 (one warning line, model unchanged) when the kernels cannot be
    built here. The kernels have no gradient: for inference.
    """
    from pixart.models.pixart import Mlp

    if not _available(kernel_library, "fused linear kernels"):
        return 0

    def swap(child):
        if type(child) is Mlp and _fusable_dense(child.fc1) and _fusable_dense(child.fc2):
            return FusedMlp(child), 2
        return (FusedLinear(child), 1) if _fusable_dense(child) else None

    return _swap_layers(model, swap)


def fused_linear_layers(model):
    """How many of ``model``'s linear layers run as ``FusedLinear`` kernels (0 for a plain model)."""
    return sum(isinstance(cell, FusedLinear) for _, cell in model.cells_and_names())


def use_fused_attention(model):
    """Switch the self- and cross-attention of ``model`` (a DiT, a ControlNet branch) from the math
    backend to the fused CPU kernel (no (N, H, T, S) scores in memory, no transposes into and out of
    heads), in place: ``"cpu"`` (fp32), or ``"cpu-bf16"`` when ``model`` has bf16 GEMM layers
    (``use_bf16_gemm`` first): bf16 operands on CPUs with AMX. For fp32 DiTs on CPU, inference only
    (no gradient).

    Returns the number switched; 0 (one warning line, model unchanged) when the kernel cannot be
    built here.
    """
    from pixart.models.pixart import CrossAttention, SelfAttention

    if not _available(kernel_library, "fused attention kernel"):
        return 0
    bf16 = bf16_gemm_layers(model) > 0
    for key_bias in (False, True):
        if (key_bias, bf16) not in ATTENTION_OPS:
            ATTENTION_OPS[key_bias, bf16] = attention_op(key_bias, bf16)
    switched = 0
    for _, cell in model.cells_and_names():
        if isinstance(cell, (SelfAttention, CrossAttention)) and cell.backend == "math":
            cell.backend = "cpu-bf16" if bf16 else "cpu"
            switched += 1
    return switched


def fused_attention_layers(model):
    """How many of ``model``'s attention layers run the fused CPU kernel (fp32 or bf16)."""
    from pixart.models.pixart import CrossAttention, SelfAttention

    return sum(isinstance(cell, (SelfAttention, CrossAttention)) and cell.backend in ("cpu", "cpu-bf16")
               for _, cell in model.cells_and_names())


def use_fused_kernels(model):
    """What the pipelines switch on for an fp32 DiT (or ControlNet branch) on CPU, after
    ``use_bf16_gemm`` when asked: ``use_fused_norms``, ``use_fused_linears`` (the linears still in
    fp32) and ``use_fused_attention``. Returns the (norms, linears, attention layers) swapped."""
    return use_fused_norms(model), use_fused_linears(model), use_fused_attention(model)
