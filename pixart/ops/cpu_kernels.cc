// CPU kernels for MindSpore's CPU backend, as ops.Custom AOT kernels: bf16 GEMM (with bias / GELU),
// a fast bf16 -> fp32 upcast, the DiT block's fused adaLN LayerNorm and gated residual, and fp32
// linears with the bias (and GELU) inside the kernel.
//
// MindSpore 2.7 has no CPU bf16 MatMul, its CPU bf16 -> fp32 Cast runs at a fraction of memory
// speed, and its CPU LayerNorm / broadcasting ops cost more than the GEMMs around them:
//   * Bf16MatMul: y (M, N) fp32 = x (M, K) · w (N, K)ᵀ with x fp32 (rounded to bf16 here, round to
//     nearest even like torch) or bf16, w bf16, fp32 accumulation. On CPUs with AMX the GEMM runs on
//     the tile unit (the AMX section below); else it is oneDNN's gemm_bf16bf16f32 from the
//     libdnnl.so.2 that ships inside MindSpore (its AVX512-BF16 kernels), so nothing beyond
//     MindSpore and a C++ compiler is needed. On a CPU without
//     AVX512-BF16 the same products are computed exactly by oneDNN's sgemm on fp32 copies of the
//     bf16 operands (every bf16·bf16 product is exact in fp32): the same results up to the
//     summation order, slower than plain fp32 (the Python side uses it only when asked).
//   * Bf16MatMulBias / Bf16MatMulBiasGelu: the same plus a fp32 bias, and then tanh-GELU (the MLP's
//     fc1), applied in the kernel instead of as 2-6 more MindSpore ops over the output.
//   * Bf16ToF32: exact upcast (a 16-bit shift), for fp32 compute on bf16-stored weights.
//   * AdaLayerNorm: LayerNorm (no affine, eps 1e-6) then x·(1 + scale) + shift, scale/shift per
//     image: one pass instead of MindSpore's CPU LayerNorm (slow) + Tile + Mul + Add.
//   * GatedResidual: x + gate·h, gate per image: one pass instead of Tile + Mul + Add.
//   * F32MatMulBias / F32MatMulBiasGelu: an fp32 Linear, y = x · wᵀ + b (then tanh-GELU), by an sgemm
//     onto rows that start as the bias: no BiasAdd pass and no six-op GELU after the GEMM.
//   * F32MatMul: y = x · wᵀ by the same sgemm (T5's projections).
//   The sgemm is numpy's OpenBLAS where the build found it (PIXART_SGEMM names its cblas_sgemm: on an
//   AVX2 Zen 3 1.1-1.9x oneDNN's speed at T5's shapes, 0.97-1.24x at the DiT's), else oneDNN's.
// MindSpore's bundled oneDNN is built with the THREADPOOL runtime: its BLAS calls take a
// threadpool object, which ThreadPool below provides (a fixed set of worker threads).
//
// AOT kernel ABI (MindSpore ops.Custom, func_type="aot"): params = inputs then outputs; return 0 on
// success. pixart_bf16_selftest() is a plain C entry point for the loader's self-check.

#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

// The abstract threadpool interface of oneDNN 2.x (dnnl_threadpool_iface.hpp): the virtual
// functions must be declared in this order for the vtable to match the library's.
namespace dnnl {
namespace threadpool_interop {
struct threadpool_iface {
  virtual int get_num_threads() const = 0;
  virtual bool get_in_parallel() const = 0;
  virtual void parallel_for(int n, const std::function<void(int, int)> &fn) = 0;
  virtual uint64_t get_flags() const = 0;
  virtual ~threadpool_iface() {}
};
}  // namespace threadpool_interop
}  // namespace dnnl

extern "C" int dnnl_threadpool_interop_gemm_bf16bf16f32(char transa, char transb, int64_t M, int64_t N,
                                                         int64_t K, float alpha, const uint16_t *A,
                                                         int64_t lda, const uint16_t *B, int64_t ldb,
                                                         float beta, float *C, int64_t ldc, void *threadpool);
extern "C" int dnnl_threadpool_interop_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                                             const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                                             float *C, int64_t ldc, void *threadpool);
#ifdef PIXART_SGEMM
// OpenBLAS's ILP64 CBLAS (numpy's bundled build): enums are ints, sizes 64-bit.
extern "C" void PIXART_SGEMM(int layout, int transa, int transb, int64_t M, int64_t N, int64_t K, float alpha,
                             const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                             int64_t ldc);
#endif

namespace {

thread_local bool tls_in_pool = false;

// Runs fn(i, n) for i < n on `size` threads (the caller is one of them), synchronously.
class ThreadPool : public dnnl::threadpool_interop::threadpool_iface {
 public:
  explicit ThreadPool(int size) : size_(std::max(1, size)), owner_(getpid()) {
    for (int w = 1; w < size_; ++w) workers_.emplace_back([this, w] { Work(w); });
  }
  ~ThreadPool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto &t : workers_) t.join();
  }
  int get_num_threads() const override { return size_; }
  bool get_in_parallel() const override { return tls_in_pool; }
  uint64_t get_flags() const override { return 0; }  // synchronous
  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 0) return;
    // nested, trivial, or in a forked child (which has none of the workers): run inline
    if (size_ == 1 || n == 1 || tls_in_pool || getpid() != owner_) {
      const unsigned csr = _mm_getcsr();
      _mm_setcsr(csr | 0x8040u);  // as RunShare
      for (int i = 0; i < n; ++i) fn(i, n);
      _mm_setcsr(csr);
      return;
    }
    std::lock_guard<std::mutex> call(call_mutex_);  // one job at a time
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      job_n_ = n;
      next_.store(0);
      busy_ = size_ - 1;
      ++generation_;
    }
    wake_.notify_all();
    RunShare();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  // Every thread runs its share with denormals flushed to zero (MXCSR FTZ and DAZ, restored after): the
  // caller may be a MindSpore thread that set them, the workers would not, and a softmax's tiny
  // probabilities made the worker's fp32 GEMMs 10x slower on Intel (a denormal costs a microcode assist),
  // and the two halves of one result must not differ by thread.
  void RunShare() {
    tls_in_pool = true;
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);
    for (int i = next_.fetch_add(1); i < job_n_; i = next_.fetch_add(1)) (*job_)(i, job_n_);
    _mm_setcsr(csr);
    tls_in_pool = false;
  }
  void Work(int) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
      }
      RunShare();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  int size_;
  pid_t owner_;
  std::vector<std::thread> workers_;
  std::mutex mutex_, call_mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int, int)> *job_ = nullptr;
  int job_n_ = 0;
  std::atomic<int> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

int DefaultThreads() {
  const char *env = std::getenv("PIXART_BF16_THREADS");
  if (env && std::atoi(env) > 0) return std::atoi(env);
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool &Pool() {
  static ThreadPool *pool = new ThreadPool(DefaultThreads());  // never destroyed: lives as long as the process
  return *pool;
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Splits [0, count) into one contiguous range per pool thread.
void ParallelRanges(int64_t count, const std::function<void(int64_t, int64_t)> &body) {
  ThreadPool &pool = Pool();
  int parts = static_cast<int>(std::min<int64_t>(pool.get_num_threads(), std::max<int64_t>(1, count / 65536)));
  if (parts <= 1) {
    body(0, count);
    return;
  }
  pool.parallel_for(parts, [&](int i, int n) { body(count * i / n, count * (i + 1) / n); });
}

#define PIXART_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define PIXART_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define PIXART_AVX2 __attribute__((target("avx2,fma")))

bool NativeBf16() {
  static const bool native = __builtin_cpu_supports("avx512bf16");
  return native;
}

bool HasAvx512() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  return avx512;
}

bool HasAvx2() {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2;
}

// ToBf16 on 16 values at a time, bit for bit (denormals kept, unlike the AVX512-BF16 instruction).
PIXART_AVX512 void ToBf16Avx512Exact(const float *src, uint16_t *dst, int64_t count) {
  int64_t i = 0;
  const __m512i one = _mm512_set1_epi32(1), round = _mm512_set1_epi32(0x7fff);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  for (; i + 16 <= count; i += 16) {
    const __m512i bits = _mm512_loadu_si512(src + i);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, abs_mask), inf);
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(bits, 16), one)));
    const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));  // (bits >> 16) | 0x40
    const __m512i top = _mm512_srli_epi32(_mm512_mask_blend_epi32(nan, rounded, quiet), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + i), _mm512_cvtepi32_epi16(top));
  }
  for (; i < count; ++i) dst[i] = ToBf16(src[i]);
}

void ToBf16Array(const float *src, uint16_t *dst, int64_t count) {
  ParallelRanges(count, [&](int64_t begin, int64_t end) {
    if (HasAvx512()) return ToBf16Avx512Exact(src + begin, dst + begin, end - begin);
    for (int64_t i = begin; i < end; ++i) dst[i] = ToBf16(src[i]);
  });
}

int64_t Elements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

thread_local std::vector<float> tls_a32, tls_b32;  // fp32 copies of the operands of an emulated GEMM

// bf16 (count values) -> fp32, exact.
void Bf16ToF32Array(const uint16_t *src, float *dst, int64_t count) {
  uint32_t *out = reinterpret_cast<uint32_t *>(dst);
  ParallelRanges(count, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<uint32_t>(src[i]) << 16;
  });
}

// fp32 -> bf16 (round to nearest even) with AVX512-BF16.
PIXART_AVX512_BF16 void ToBf16Avx512(const float *src, uint16_t *dst, int64_t count) {
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    const __m512 lo = _mm512_loadu_ps(src + i), hi = _mm512_loadu_ps(src + i + 16);
    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  for (; i < count; ++i) dst[i] = ToBf16(src[i]);
}

void ToBf16Run(const float *src, uint16_t *dst, int64_t count) {
  if (NativeBf16()) return ToBf16Avx512(src, dst, count);
  for (int64_t i = 0; i < count; ++i) dst[i] = ToBf16(src[i]);
}

// e^a, |relative error| < 2e-7 for a in [-87, 88] (Cody-Waite reduction, degree-6 Taylor on |r| <= ln2/2).
PIXART_AVX512 inline __m512 Exp512(__m512 a) {
  a = _mm512_min_ps(_mm512_max_ps(a, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), a);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Exp512 for AVX2 CPUs: the same reduction and polynomial; 2^n is built in the exponent bits
// (n in [-126, 127] after the clamp, so always a normal float).
PIXART_AVX2 inline __m256 Exp256(__m256 a) {
  a = _mm256_min_ps(_mm256_max_ps(a, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), a);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// tanh-GELU written as v·sigmoid(2√(2/π)(v + 0.044715v³)) = v / (1 + e^-z), the form the models use.
constexpr float kGeluScale = 1.5957691216057308f;

PIXART_AVX2 inline __m256 Gelu256(__m256 v) {
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v);
  const __m256 e = Exp256(_mm256_mul_ps(_mm256_set1_ps(-kGeluScale), inner));
  return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

PIXART_AVX2 void BiasGeluRowsAvx2(float *y, const float *bias, int64_t rows, int64_t N, bool gelu) {
  for (int64_t m = 0; m < rows; ++m) {
    float *row = y + m * N;
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) {
      __m256 v = _mm256_loadu_ps(row + n);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
      _mm256_storeu_ps(row + n, gelu ? Gelu256(v) : v);
    }
    for (; n < N; ++n) {
      float v = row[n] + (bias ? bias[n] : 0.0f);
      if (gelu) v = v / (1.0f + std::exp(-kGeluScale * (v + 0.044715f * v * v * v)));
      row[n] = v;
    }
  }
}

PIXART_AVX512 void BiasGeluRowsAvx512(float *y, const float *bias, int64_t rows, int64_t N, bool gelu) {
  for (int64_t m = 0; m < rows; ++m) {
    float *row = y + m * N;
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      __m512 v = _mm512_loadu_ps(row + n);
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n));
      if (gelu) {
        const __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v);
        const __m512 e = Exp512(_mm512_mul_ps(_mm512_set1_ps(-kGeluScale), inner));
        v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      }
      _mm512_storeu_ps(row + n, v);
    }
    for (; n < N; ++n) {
      float v = row[n] + (bias ? bias[n] : 0.0f);
      if (gelu) v = v / (1.0f + std::exp(-kGeluScale * (v + 0.044715f * v * v * v)));
      row[n] = v;
    }
  }
}

// y + bias, then tanh-GELU, over `rows` rows of N values.
void BiasGeluRows(float *y, const float *bias, int64_t rows, int64_t N, bool gelu) {
  if (HasAvx512()) return BiasGeluRowsAvx512(y, bias, rows, N, gelu);
  if (HasAvx2()) return BiasGeluRowsAvx2(y, bias, rows, N, gelu);
  for (int64_t i = 0; i < rows * N; ++i) {
    float v = y[i] + (bias ? bias[i % N] : 0.0f);
    if (gelu) v = v / (1.0f + std::exp(-kGeluScale * (v + 0.044715f * v * v * v)));
    y[i] = v;
  }
}

// Splits rows [0, M) into one contiguous range per pool thread (rows of `width` floats).
void ParallelRows(int64_t M, int64_t width, const std::function<void(int64_t, int64_t)> &body) {
  ThreadPool &pool = Pool();
  const int parts = static_cast<int>(std::min<int64_t>({pool.get_num_threads(), M, std::max<int64_t>(1, M * width / 16384)}));
  if (parts <= 1) {
    body(0, M);
    return;
  }
  pool.parallel_for(parts, [&](int i, int n) { body(M * i / n, M * (i + 1) / n); });
}

}  // namespace

// ----------------------------------------------------------------------------- AMX-BF16 GEMM
// On CPUs with AMX (Intel Sapphire Rapids and later) the bf16 GEMMs run on the tile unit: oneDNN 2.2
// inside MindSpore predates AMX's enabling in Linux (it never asks the kernel for the tile state),
// and its AVX512-BF16 gemm_bf16bf16f32 reached ~220 GFLOP/s on 2 such cores, below MindSpore's fp32
// MatMul (~380), where torch's AMX kernels reach ~2000 (benchmarks/bench_bf16_gemm.py).
//
// C = A · B with A the weight as stored, (rows, K) bf16 row-major: 16-row tiles load straight from it
// (a zero-padded copy only when K % 32 or rows % 16), and B the other operand packed per call into
// 16-column panels in the tile unit's pair-interleaved layout: panel p, k chunk c is a 1 KiB tile whose
// row r holds, for its 16 columns j, the bf16 pair (B[32c + 2r][16p + j], B[32c + 2r + 1][16p + j]).
// A linear layer y = x · wᵀ runs as yᵀ = w · xᵀ (x packed while rounded to bf16, each 16×16 result
// transposed into y's rows with the bias and GELU applied in registers); a convolution's GEMM
// w · cols runs as is. Each 32×32 block of C sums over the whole K in four tile accumulators.
// Sums are fp32 as in the other bf16 paths; the tile unit treats bf16 denormal inputs as zero.

#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define PIXART_HAS_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#define PIXART_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace {

#ifdef PIXART_HAS_AMX

// Whether the tile unit can run here: the CPU has AMX-TILE and AMX-BF16 (and AVX512-BF16 for the packing),
// Linux grants this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, kernel 5.16+), and
// PIXART_AMX is not "0" (which keeps oneDNN's GEMM, for comparisons).
bool AmxReady() {
  static const bool ready = [] {
    const char *env = std::getenv("PIXART_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
    return NativeBf16();
  }();
  return ready;
}

// Tile registers: 0-3 the 2×2 accumulators, 4-5 A (16 rows × 32 bf16), 6-7 B (16 pair rows × 16 columns);
// every tile is 16 rows of 64 bytes.
PIXART_AMX void ConfigureTiles() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config = {};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// The 16×16 transpose of 32-bit lanes: rows r[i] (16 lanes j) -> r[j] (16 lanes i).
PIXART_AMX inline void Transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: column 4L + c of rows 4i..4i+3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// Packs xᵀ for yᵀ = w · xᵀ: x (M, K) fp32 (rounded to bf16 here) or bf16, row stride ldx; panel p holds rows
// 16p..16p+15 of x (zeros past M, and past K up to Kp).
PIXART_AMX void PackRowPanels(const void *x, bool x_bf16, int64_t M, int64_t K, int64_t ldx, int64_t Kp,
                              uint16_t *packed, int64_t p_begin, int64_t p_end) {
  const int64_t chunks = Kp / 32;
  for (int64_t p = p_begin; p < p_end; ++p)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * 32, valid = std::min<int64_t>(32, K - k0);
      const __mmask32 mask = valid >= 32 ? ~__mmask32(0) : ((__mmask32(1) << valid) - 1);
      __m512i rows[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t m = p * 16 + j;
        if (m >= M) {
          rows[j] = _mm512_setzero_si512();
        } else if (x_bf16) {
          rows[j] = _mm512_maskz_loadu_epi16(mask, static_cast<const uint16_t *>(x) + m * ldx + k0);
        } else {
          const float *row = static_cast<const float *>(x) + m * ldx + k0;
          const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), row);
          const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), row + 16);
          rows[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        }
      }
      Transpose16(rows);
      uint16_t *tile = packed + (p * chunks + c) * 512;
      for (int r = 0; r < 16; ++r) _mm512_store_si512(tile + r * 32, rows[r]);
    }
}

void PackRowsAsPanels(const void *x, bool x_bf16, int64_t M, int64_t K, int64_t Kp, uint16_t *packed) {
  const int64_t panels = (M + 15) / 16;
  Pool().parallel_for(static_cast<int>(std::min<int64_t>(panels, Pool().get_num_threads())), [&](int part, int parts) {
    PackRowPanels(x, x_bf16, M, K, K, Kp, packed, panels * part / parts, panels * (part + 1) / parts);
  });
}

// 16 values of a row as bf16 in the low halves of 32-bit lanes (zeros where mask is off): bf16 as is,
// fp32 rounded to nearest even.
PIXART_AMX inline __m512i WidenBf16(__mmask16 mask, const uint16_t *row) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, row));
}
PIXART_AMX inline __m512i WidenBf16(__mmask16 mask, const float *row) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, row)));
}

// Packs B (K, width) bf16 or fp32 (rounded), row stride ldb, for C = A · B: panel p holds columns 16p..16p+15.
template <typename T>
PIXART_AMX void PackColumnPanels(const T *b, int64_t ldb, int64_t K, int64_t width, int64_t Kp, uint16_t *packed,
                                 int64_t p_begin, int64_t p_end) {
  const int64_t chunks = Kp / 32;
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t valid = std::min<int64_t>(16, width - p * 16);
    const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
    for (int64_t c = 0; c < chunks; ++c) {
      uint16_t *tile = packed + (p * chunks + c) * 512;
      for (int r = 0; r < 16; ++r) {
        const int64_t k = c * 32 + 2 * r;
        const __m512i even = k < K ? WidenBf16(mask, b + k * ldb + p * 16) : _mm512_setzero_si512();
        const __m512i odd = k + 1 < K ? WidenBf16(mask, b + (k + 1) * ldb + p * 16) : _mm512_setzero_si512();
        _mm512_store_si512(tile + r * 32, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
      }
    }
  }
}

void PackColumnsAsPanels(const uint16_t *b, int64_t ldb, int64_t K, int64_t width, int64_t Kp, uint16_t *packed) {
  const int64_t panels = (width + 15) / 16;
  Pool().parallel_for(static_cast<int>(std::min<int64_t>(panels, Pool().get_num_threads())), [&](int part, int parts) {
    PackColumnPanels(b, ldb, K, width, Kp, packed, panels * part / parts, panels * (part + 1) / parts);
  });
}

// One block of C: NA A tiles (rows a, a + 16·lda) × NB panels (b0, b1), summed over `chunks` k chunks,
// stored to out as NA·NB consecutive 16×16 fp32 tiles (tile index 2·i + j for A tile i, panel j).
template <int NA, int NB>
PIXART_AMX inline void AmxBlock(const uint16_t *a, int64_t lda, const uint16_t *b0, const uint16_t *b1, int64_t chunks,
                                float *out) {
  const int64_t stride = lda * 2;
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NA > 1) _tile_zero(2);
  if constexpr (NA > 1 && NB > 1) _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, a + c * 32, stride);
    _tile_loadd(6, b0 + c * 512, 64);
    if constexpr (NB > 1) _tile_loadd(7, b1 + c * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA > 1) {
      _tile_loadd(5, a + 16 * lda + c * 32, stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out, 64);
  if constexpr (NB > 1) _tile_stored(1, out + 256, 64);
  if constexpr (NA > 1) _tile_stored(2, out + 512, 64);
  if constexpr (NA > 1 && NB > 1) _tile_stored(3, out + 768, 64);
}

// One thread's share of AmxGemm: A's 32-row blocks [b_begin, b_end) × panels [p_begin, p_end).
template <typename Store>
PIXART_AMX void AmxGemmPart(const uint16_t *a, int64_t lda, int64_t rows, const uint16_t *packed, int64_t chunks,
                            int64_t b_begin, int64_t b_end, int64_t p_begin, int64_t p_end, const Store &store) {
  // panels per pass: at most ~1 MiB of B, so that it stays in L2 while A's blocks go by
  const int64_t group = std::max<int64_t>(2, ((int64_t{1} << 20) / (chunks * 1024)) & ~int64_t{1});
  ConfigureTiles();
  alignas(64) float tiles[4 * 256];
  for (int64_t g = p_begin; g < p_end; g += group) {
    const int64_t g_end = std::min(p_end, g + group);
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      const int64_t r0 = blk * 32;
      const bool two = r0 + 16 < rows;
      const uint16_t *ab = a + r0 * lda;
      for (int64_t p = g; p < g_end; p += 2) {
        const uint16_t *b0 = packed + p * chunks * 512, *b1 = b0 + chunks * 512;
        const bool pair = p + 1 < g_end;
        if (two && pair) AmxBlock<2, 2>(ab, lda, b0, b1, chunks, tiles);
        else if (two) AmxBlock<2, 1>(ab, lda, b0, b1, chunks, tiles);
        else if (pair) AmxBlock<1, 2>(ab, lda, b0, b1, chunks, tiles);
        else AmxBlock<1, 1>(ab, lda, b0, b1, chunks, tiles);
        store(r0, p, tiles);
        if (pair) store(r0, p + 1, tiles + 256);
        if (two) store(r0 + 16, p, tiles + 512);
        if (two && pair) store(r0 + 16, p + 1, tiles + 768);
      }
    }
  }
  _tile_release();
}

// C (rows, panels·16) = A · B: A (rows, Kp) bf16 with row stride lda, rows a multiple of 16; B packed (panels,
// Kp / 32 chunks). store(row0, panel, tile) receives every 16×16 tile of C (fp32, row-major), from the
// pool's threads: each thread takes a share of A's 32-row blocks (or of the panels when A has few).
template <typename Store>
void AmxGemm(const uint16_t *a, int64_t lda, int64_t rows, const uint16_t *packed, int64_t panels, int64_t Kp,
             const Store &store) {
  const int64_t chunks = Kp / 32, blocks = (rows + 31) / 32, pairs = (panels + 1) / 2;
  const int threads = Pool().get_num_threads();
  const bool split_rows = blocks >= 2 * threads || pairs < threads;
  const int parts = static_cast<int>(std::min<int64_t>(threads, split_rows ? blocks : pairs));
  Pool().parallel_for(parts, [&](int part, int n) {
    if (split_rows) {
      AmxGemmPart(a, lda, rows, packed, chunks, blocks * part / n, blocks * (part + 1) / n, 0, panels, store);
    } else {
      AmxGemmPart(a, lda, rows, packed, chunks, 0, blocks, 2 * (pairs * part / n),
                  std::min(panels, 2 * (pairs * (part + 1) / n)), store);
    }
  });
}

thread_local std::vector<uint16_t> tls_amx_packed, tls_amx_weight;  // packed B, padded A: reused between calls

uint16_t *AlignedBuffer(std::vector<uint16_t> &buffer, int64_t count) {  // 64-byte aligned, count values
  if (buffer.size() < static_cast<size_t>(count + 32)) buffer.resize(static_cast<size_t>(count + 32));
  const uintptr_t p = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<uint16_t *>((p + 63) & ~uintptr_t{63});
}

// The weight w (rows, K) as A: itself when rows % 16 == 0 and K % 32 == 0, else a zero-padded copy.
const uint16_t *AmxWeight(const uint16_t *w, int64_t rows, int64_t K, int64_t *lda, int64_t *rows_padded) {
  const int64_t Kp = (K + 31) / 32 * 32, Rp = (rows + 15) / 16 * 16;
  *rows_padded = Rp;
  if (Kp == K && Rp == rows) {
    *lda = K;
    return w;
  }
  uint16_t *copy = AlignedBuffer(tls_amx_weight, Rp * Kp);
  for (int64_t r = 0; r < Rp; ++r) {
    uint16_t *row = copy + r * Kp;
    if (r < rows) std::memcpy(row, w + r * K, sizeof(uint16_t) * K);
    std::memset(row + (r < rows ? K : 0), 0, sizeof(uint16_t) * (r < rows ? Kp - K : Kp));
  }
  *lda = Kp;
  return copy;
}

// AmxGemm's store for yᵀ = w · xᵀ: tile (n0.., panel p) transposed into y's rows 16p.., + bias, GELU.
struct LinearStore {
  float *y;
  const float *bias;
  bool gelu;
  int64_t M, N;
  PIXART_AMX void operator()(int64_t n0, int64_t p, const float *tile) const {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(tile + 16 * i);
    Transpose16(r);  // r[j]: y[16p + j][n0 .. n0 + 15]
    const int64_t valid = std::min<int64_t>(16, N - n0);
    const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int j = 0; j < 16 && p * 16 + j < M; ++j) {
      __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[j]), b);
      if (gelu) {
        const __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v);
        const __m512 e = Exp512(_mm512_mul_ps(_mm512_set1_ps(-kGeluScale), inner));
        v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      }
      _mm512_mask_storeu_ps(y + (p * 16 + j) * N + n0, mask, v);
    }
  }
};

// AmxGemm's store for c = w · cols: tile (o0.., panel p) into rows o0.. of c at columns 16p...
struct RowsStore {
  float *c;
  int64_t O, width, ldc;
  PIXART_AMX void operator()(int64_t o0, int64_t p, const float *tile) const {
    const int64_t valid = std::min<int64_t>(16, width - p * 16);
    const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
    for (int i = 0; i < 16 && o0 + i < O; ++i)
      _mm512_mask_storeu_ps(c + (o0 + i) * ldc + p * 16, mask, _mm512_load_ps(tile + 16 * i));
  }
};

// y (M, N) = x · wᵀ (+ bias) (then tanh-GELU): x (M, K) fp32 or bf16, w (N, K) bf16, y fp32 row-major.
void AmxLinear(const void *x, bool x_bf16, const uint16_t *w, const float *bias, bool gelu, float *y, int64_t M,
               int64_t N, int64_t K) {
  const int64_t Kp = (K + 31) / 32 * 32, panels = (M + 15) / 16;
  int64_t lda, rows;
  const uint16_t *a = AmxWeight(w, N, K, &lda, &rows);
  uint16_t *packed = AlignedBuffer(tls_amx_packed, panels * Kp * 16);
  PackRowsAsPanels(x, x_bf16, M, K, Kp, packed);
  AmxGemm(a, lda, rows, packed, panels, Kp, LinearStore{y, bias, gelu, M, N});
}

// c (O, width, row stride ldc) = w (O, K) · cols (K, width), bf16 in, fp32 out.
void AmxGemmNN(const uint16_t *w, const uint16_t *cols, float *c, int64_t O, int64_t width, int64_t K, int64_t ldc) {
  const int64_t Kp = (K + 31) / 32 * 32, panels = (width + 15) / 16;
  int64_t lda, rows;
  const uint16_t *a = AmxWeight(w, O, K, &lda, &rows);
  uint16_t *packed = AlignedBuffer(tls_amx_packed, panels * Kp * 16);
  PackColumnsAsPanels(cols, width, K, width, Kp, packed);
  AmxGemm(a, lda, rows, packed, panels, Kp, RowsStore{c, O, width, ldc});
}

// softmax(s·scale + bias) of one row of S scores (s is overwritten), as bf16 into p, zeros from S to Sp.
PIXART_AMX void SoftmaxRowToBf16(float *s, int64_t S, int64_t Sp, float scale, const float *bias, uint16_t *p) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < S; j += 16) {
    const __mmask16 mask = S - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (S - j)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + j), vscale);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + j));
    _mm512_mask_storeu_ps(s + j, mask, v);
    vmax = _mm512_mask_max_ps(vmax, mask, vmax, v);
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; j += 16) {
    const __mmask16 mask = S - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (S - j)) - 1);
    const __m512 e = Exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), m));
    _mm512_mask_storeu_ps(s + j, mask, e);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(mask, e));
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int64_t j = 0; j < Sp; j += 16) {
    const __mmask16 mask = S - j >= 16 ? __mmask16(0xFFFF) : S > j ? static_cast<__mmask16>((1u << (S - j)) - 1) : 0;
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + j), inv);
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(p + j), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

thread_local std::vector<uint16_t> tls_attn_k, tls_attn_v, tls_attn_q, tls_attn_p;
thread_local std::vector<float> tls_attn_scores;

// One head of attention on the tile unit, bf16 operands and fp32 sums (what torch's bf16 attention
// computes): q (T, ·), k and v (S, ·) fp32 with row stride C, the head's d columns; bias (S) or null;
// out (T, ·) the same layout. Kᵀ and V are packed once, then per block of query rows: scores = q·kᵀ
// (tiles), softmax in fp32 to bf16 probabilities, out = P·V (tiles).
PIXART_AMX void Bf16AttentionHead(const float *q, const float *k, const float *v, const float *bias, float *out,
                                  int64_t T, int64_t S, int64_t C, int64_t d, float scale) {
  const int64_t dp = (d + 31) / 32 * 32, Sp = (S + 31) / 32 * 32;
  const int64_t key_panels = (S + 15) / 16, value_panels = (d + 15) / 16;
  uint16_t *kp = AlignedBuffer(tls_attn_k, key_panels * dp * 16);
  uint16_t *vp = AlignedBuffer(tls_attn_v, value_panels * Sp * 16);
  PackRowPanels(k, false, S, d, C, dp, kp, 0, key_panels);
  PackColumnPanels(v, C, S, d, Sp, vp, 0, value_panels);
  // query rows per block: scores of at most 128 Ki floats (512 KiB), a multiple of 16
  const int64_t block = std::max<int64_t>(16, std::min<int64_t>((T + 15) / 16 * 16, 131072 / Sp / 16 * 16));
  uint16_t *qa = AlignedBuffer(tls_attn_q, block * dp), *pa = AlignedBuffer(tls_attn_p, block * Sp);
  if (tls_attn_scores.size() < static_cast<size_t>(block * Sp)) tls_attn_scores.resize(static_cast<size_t>(block * Sp));
  float *scores = tls_attn_scores.data();
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t rows = std::min(block, T - t0), padded = (rows + 15) / 16 * 16;
    for (int64_t r = 0; r < padded; ++r)
      for (int64_t j = 0; j < dp; j += 16) {
        const int64_t n = r < rows ? std::min<int64_t>(16, std::max<int64_t>(0, d - j)) : 0;
        const __mmask16 mask = n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(mask, q + (t0 + r) * C + j);
        _mm256_store_si256(reinterpret_cast<__m256i *>(qa + r * dp + j), (__m256i)_mm512_cvtneps_pbh(x));
      }
    AmxGemmPart(qa, dp, padded, kp, dp / 32, 0, (padded + 31) / 32, 0, key_panels, RowsStore{scores, rows, S, Sp});
    for (int64_t r = 0; r < rows; ++r) SoftmaxRowToBf16(scores + r * Sp, S, Sp, scale, bias, pa + r * Sp);
    std::memset(pa + rows * Sp, 0, sizeof(uint16_t) * (padded - rows) * Sp);
    AmxGemmPart(pa, Sp, padded, vp, Sp / 32, 0, (padded + 31) / 32, 0, value_panels,
                RowsStore{out + t0 * C, rows, d, C});
  }
}

#else  // a compiler without AMX intrinsics: oneDNN's GEMM everywhere (these are never called)
bool AmxReady() { return false; }
void AmxLinear(const void *, bool, const uint16_t *, const float *, bool, float *, int64_t, int64_t, int64_t) {}
void AmxGemmNN(const uint16_t *, const uint16_t *, float *, int64_t, int64_t, int64_t, int64_t) {}
#endif

// C (M, N) fp32 = op(A) · op(B), A and B bf16 row-major as in BLAS (op = transpose for 'T'), fp32 sums.
// With AMX: the tile unit (A · Bᵀ or A · B, contiguous rows); with AVX512-BF16: oneDNN's gemm_bf16bf16f32;
// without either: sgemm on exact fp32 copies of A and B.
int GemmBf16(char transa, char transb, int64_t M, int64_t N, int64_t K, const uint16_t *A, int64_t lda,
             const uint16_t *B, int64_t ldb, float *C, int64_t ldc) {
  if (AmxReady() && transa == 'N' && transb == 'T' && lda == K && ldb == K && ldc == N) {
    AmxLinear(A, true, B, nullptr, false, C, M, N, K);  // C = A · Bᵀ: B is the weight
    return 0;
  }
  if (AmxReady() && transa == 'N' && transb == 'N' && lda == K && ldb == N) {
    AmxGemmNN(A, B, C, M, N, K, ldc);  // C = A · B: A is the weight
    return 0;
  }
  if (NativeBf16())
    return dnnl_threadpool_interop_gemm_bf16bf16f32(transa, transb, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, C, ldc,
                                                    &Pool());
  const int64_t a_count = (transa == 'N' ? M : K) * lda, b_count = (transb == 'N' ? K : N) * ldb;
  if (tls_a32.size() < static_cast<size_t>(a_count)) tls_a32.resize(static_cast<size_t>(a_count));
  if (tls_b32.size() < static_cast<size_t>(b_count)) tls_b32.resize(static_cast<size_t>(b_count));
  Bf16ToF32Array(A, tls_a32.data(), a_count);
  Bf16ToF32Array(B, tls_b32.data(), b_count);
  return dnnl_threadpool_interop_sgemm(transa, transb, M, N, K, 1.0f, tls_a32.data(), lda, tls_b32.data(), ldb, 0.0f,
                                       C, ldc, &Pool());
}

// y = x · wᵀ, x (M, K) bf16, w (N, K) bf16, y (M, N) fp32 row-major.
int Gemm(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
  return GemmBf16('N', 'T', M, N, K, x, K, w, K, y, N);
}

thread_local std::vector<uint16_t> tls_x16;  // the bf16 copy of an fp32 x, reused between calls

// y (M, N) = x · wᵀ (+ bias) (then GELU); x fp32 or bf16 (x_bf16), w bf16.
int MatMul(const void *x, bool x_bf16, const uint16_t *w, const float *bias, bool gelu, float *y, int64_t M,
           int64_t N, int64_t K) {
  if (M == 0 || N == 0) return 0;
  int status = 0;
  if (K == 0) {
    std::memset(y, 0, sizeof(float) * M * N);
  } else if (AmxReady()) {  // x rounded to bf16 while packed, the bias and GELU applied as y is written
    AmxLinear(x, x_bf16, w, bias, gelu, y, M, N, K);
    return 0;
  } else if (x_bf16) {
    status = Gemm(static_cast<const uint16_t *>(x), w, y, M, N, K);
  } else {
    if (tls_x16.size() < static_cast<size_t>(M * K)) tls_x16.resize(static_cast<size_t>(M * K));
    const float *xf = static_cast<const float *>(x);
    uint16_t *x16 = tls_x16.data();
    ParallelRows(M, K, [&](int64_t m0, int64_t m1) { ToBf16Run(xf + m0 * K, x16 + m0 * K, (m1 - m0) * K); });
    status = Gemm(x16, w, y, M, N, K);
  }
  if (status != 0 || (!bias && !gelu)) return status;
  ParallelRows(M, N, [&](int64_t m0, int64_t m1) { BiasGeluRows(y + m0 * N, bias, m1 - m0, N, gelu); });
  return 0;
}

bool IsDtype(const char *dtype, const char *name) { return std::strcmp(dtype, name) == 0; }

// Shared checks of the Bf16MatMul* kernels: params = x, w, [bias,] y.
int MatMulKernel(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool has_bias,
                 bool gelu) {
  const int out = has_bias ? 3 : 2;
  if (nparam != out + 1 || ndims[1] != 2 || !IsDtype(dtypes[1], "bfloat16") || !IsDtype(dtypes[out], "float32"))
    return 1;
  const int64_t K = shapes[0][ndims[0] - 1], N = shapes[1][0];
  if (shapes[1][1] != K) return 2;
  if (has_bias && (!IsDtype(dtypes[2], "float32") || Elements(ndims[2], shapes[2]) != N)) return 4;
  const bool x_bf16 = IsDtype(dtypes[0], "bfloat16");
  if (!x_bf16 && !IsDtype(dtypes[0], "float32")) return 3;
  const int64_t M = Elements(ndims[0], shapes[0]) / (K ? K : 1);
  return MatMul(params[0], x_bf16, static_cast<const uint16_t *>(params[1]),
                has_bias ? static_cast<const float *>(params[2]) : nullptr, gelu, static_cast<float *>(params[out]),
                M, N, K);
}

}  // namespace

// inputs: x (..., K) float32 or bfloat16, w (N, K) bfloat16; output: y (..., N) float32.
extern "C" int Bf16MatMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return MatMulKernel(nparam, params, ndims, shapes, dtypes, false, false);
}

// inputs: x (..., K), w (N, K) bfloat16, bias (N) float32; output: y (..., N) float32 = x·wᵀ + bias.
extern "C" int Bf16MatMulBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return MatMulKernel(nparam, params, ndims, shapes, dtypes, true, false);
}

// As Bf16MatMulBias, then tanh-GELU.
extern "C" int Bf16MatMulBiasGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return MatMulKernel(nparam, params, ndims, shapes, dtypes, true, true);
}

// input: w (any shape) bfloat16; output: the same values as float32 (exact).
extern "C" int Bf16ToF32(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2 || std::strcmp(dtypes[0], "bfloat16") != 0 || std::strcmp(dtypes[1], "float32") != 0) return 1;
  const uint16_t *src = static_cast<const uint16_t *>(params[0]);
  uint32_t *dst = static_cast<uint32_t *>(params[1]);
  ParallelRanges(Elements(ndims[0], shapes[0]), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
  });
  return 0;
}

// dst (count bf16) = src (count fp32) rounded to nearest even (NaN stays NaN, denormals kept), on the
// pool's threads: the weights' cast when a model switches to the bf16 GEMM (6x ml_dtypes' speed here).
extern "C" void pixart_to_bf16(const float *src, uint16_t *dst, int64_t count) { ToBf16Array(src, dst, count); }

// 1 when the bf16 GEMMs and the bf16 attention run on the AMX tile unit here, else 0.
extern "C" int pixart_amx_ready() { return AmxReady() ? 1 : 0; }

// 0 when the GEMM runs here and gives the exact answer on a small case (all products and sums are
// exact in fp32), else oneDNN's status (e.g. unimplemented on a CPU without bf16 support) or -1.
extern "C" int pixart_bf16_selftest() {
  const int64_t M = 5, N = 33, K = 70;
  std::vector<float> xf(M * K);
  std::vector<uint16_t> x(M * K), w(N * K);
  std::vector<float> y(M * N, -1.0f);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(i % 7) - 3.0f;
  for (int64_t i = 0; i < N * K; ++i) w[i] = ToBf16(static_cast<float>(i % 5) * 0.5f - 1.0f);
  ToBf16Array(xf.data(), x.data(), M * K);
  const int status = Gemm(x.data(), w.data(), y.data(), M, N, K);
  if (status != 0) return status;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float expected = 0.0f;
      for (int64_t k = 0; k < K; ++k) expected += xf[m * K + k] * (static_cast<float>((n * K + k) % 5) * 0.5f - 1.0f);
      if (y[m * N + n] != expected) return -1;
    }
  return 0;
}

// Per-image rows: x (B, T, D) and a per-image vector v (B, 1, D) or (B, D) -> the row's image b = row / T.
namespace {

bool PerImageShapes(int nparam, int *ndims, int64_t **shapes, const char **dtypes, int64_t *B, int64_t *T,
                    int64_t *D) {
  for (int i = 0; i < nparam; ++i)
    if (!IsDtype(dtypes[i], "float32")) return false;
  if (ndims[0] != 3) return false;
  *B = shapes[0][0], *T = shapes[0][1], *D = shapes[0][2];
  return true;
}

bool IsPerImage(int ndim, const int64_t *shape, int64_t B, int64_t D) {
  return Elements(ndim, shape) == B * D && shape[0] == B && shape[ndim - 1] == D;
}

}  // namespace

namespace {

// One row of AdaLayerNorm with 16 float lanes; the lanes' sums are added in double (the scalar
// path sums in double throughout: the two differ by ~1e-7 relative).
PIXART_AVX512 void AdaLayerNormRowAvx512(const float *row, const float *shift, const float *scale, float *out,
                                         int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mask = D - d >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (D - d)) - 1);
    acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, row + d));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  double sum = 0.0;
  for (float lane : lanes) sum += lane;
  const float mean = static_cast<float>(sum / D);
  const __m512 vmean = _mm512_set1_ps(mean);
  acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mask = D - d >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (D - d)) - 1);
    const __m512 c = _mm512_maskz_sub_ps(mask, _mm512_maskz_loadu_ps(mask, row + d), vmean);
    acc = _mm512_fmadd_ps(c, c, acc);
  }
  _mm512_store_ps(lanes, acc);
  double squares = 0.0;
  for (float lane : lanes) squares += lane;
  const __m512 rstd = _mm512_set1_ps(static_cast<float>(1.0 / std::sqrt(squares / D + 1e-6)));
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mask = D - d >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (D - d)) - 1);
    const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + d), vmean), rstd);
    const __m512 v = _mm512_fmadd_ps(c, _mm512_add_ps(one, _mm512_maskz_loadu_ps(mask, scale + d)),
                                     _mm512_maskz_loadu_ps(mask, shift + d));
    _mm512_mask_storeu_ps(out + d, mask, v);
  }
}

}  // namespace

// inputs: x (B, T, D), shift (B, 1, D), scale (B, 1, D) float32; output: LayerNorm(x)·(1 + scale) + shift,
// LayerNorm over D without affine, eps 1e-6, biased variance (as torch / MindSpore).
extern "C" int AdaLayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  int64_t B, T, D;
  if (nparam != 4 || !PerImageShapes(nparam, ndims, shapes, dtypes, &B, &T, &D) ||
      !IsPerImage(ndims[1], shapes[1], B, D) || !IsPerImage(ndims[2], shapes[2], B, D))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *shift = static_cast<const float *>(params[1]), *scale = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  ParallelRows(B * T, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *row = x + r * D, *sh = shift + (r / T) * D, *sc = scale + (r / T) * D;
      float *out = y + r * D;
      if (HasAvx512()) {
        AdaLayerNormRowAvx512(row, sh, sc, out, D);
        continue;
      }
      double sum = 0.0;
      for (int64_t d = 0; d < D; ++d) sum += row[d];
      const float mean = static_cast<float>(sum / D);
      double squares = 0.0;
      for (int64_t d = 0; d < D; ++d) squares += static_cast<double>(row[d] - mean) * (row[d] - mean);
      const float rstd = static_cast<float>(1.0 / std::sqrt(squares / D + 1e-6));
      for (int64_t d = 0; d < D; ++d) out[d] = (row[d] - mean) * rstd * (1.0f + sc[d]) + sh[d];
    }
  });
  return 0;
}

// inputs: x (B, T, D), gate (B, 1, D), h (B, T, D) float32; output: x + gate·h.
extern "C" int GatedResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  int64_t B, T, D;
  if (nparam != 4 || !PerImageShapes(nparam, ndims, shapes, dtypes, &B, &T, &D) ||
      !IsPerImage(ndims[1], shapes[1], B, D) || Elements(ndims[2], shapes[2]) != B * T * D)
    return 1;
  const float *x = static_cast<const float *>(params[0]), *gate = static_cast<const float *>(params[1]);
  const float *h = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  ParallelRows(B * T, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *g = gate + (r / T) * D;
      for (int64_t d = 0; d < D; ++d) y[r * D + d] = x[r * D + d] + g[d] * h[r * D + d];
    }
  });
  return 0;
}

// c (M, N, row stride ldc) = a (M, K) · b (K, N), all row-major fp32.
int SgemmNN(const float *a, const float *b, float *c, int64_t M, int64_t N, int64_t K, int64_t ldc) {
#ifdef PIXART_SGEMM
  PIXART_SGEMM(101 /* row-major */, 111, 111, M, N, K, 1.0f, a, K, b, N, 0.0f, c, ldc);
  return 0;
#else
  return dnnl_threadpool_interop_sgemm('N', 'N', M, N, K, 1.0f, a, K, b, N, 0.0f, c, ldc, &Pool());
#endif
}

// y (M, N) += x (M, K) · wᵀ, w (N, K), all row-major fp32.
int AddMatMulTransposed(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K) {
#ifdef PIXART_SGEMM
  PIXART_SGEMM(101 /* row-major */, 111 /* x as is */, 112 /* w transposed */, M, N, K, 1.0f, x, K, w, K, 1.0f, y, N);
  return 0;
#else
  return dnnl_threadpool_interop_sgemm('N', 'T', M, N, K, 1.0f, x, K, w, K, 1.0f, y, N, &Pool());
#endif
}

// inputs: x (..., K), w (N, K)[, bias (N)] float32; output: y (..., N) = x · wᵀ (+ bias) (then tanh-GELU):
// an fp32 Linear. The rows of y start as the bias (or zero) and the sgemm adds x · wᵀ to them (beta 1):
// no separate bias pass, which MindSpore's CPU BiasAdd makes as slow as a tenth of the GEMM.
int F32Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool has_bias,
              bool gelu) {
  const int inputs = has_bias ? 3 : 2;
  if (nparam != inputs + 1 || ndims[1] != 2 || (has_bias && ndims[2] != 1)) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!IsDtype(dtypes[i], "float32")) return 1;
  const int64_t K = shapes[0][ndims[0] - 1], N = shapes[1][0];
  if (shapes[1][1] != K || (has_bias && shapes[2][0] != N)) return 2;
  const int64_t M = N ? Elements(ndims[inputs], shapes[inputs]) / N : 0;  // from y: x has no elements when K is 0
  if (M == 0 || N == 0) return 0;
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const float *bias = has_bias ? static_cast<const float *>(params[2]) : nullptr;
  float *y = static_cast<float *>(params[inputs]);
  ParallelRows(M, N, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (bias != nullptr) {
        std::memcpy(y + m * N, bias, sizeof(float) * N);
      } else {
        std::memset(y + m * N, 0, sizeof(float) * N);
      }
    }
  });
  if (K > 0) {
    const int status = AddMatMulTransposed(x, w, y, M, N, K);
    if (status != 0) return 10 + status;
  }
  if (gelu) ParallelRows(M, N, [&](int64_t m0, int64_t m1) { BiasGeluRows(y + m0 * N, nullptr, m1 - m0, N, true); });
  return 0;
}

extern "C" int F32MatMulBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return F32Linear(nparam, params, ndims, shapes, dtypes, true, false);
}

extern "C" int F32MatMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)stream;
  (void)extra;
  return F32Linear(nparam, params, ndims, shapes, dtypes, false, false);
}

extern "C" int F32MatMulBiasGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return F32Linear(nparam, params, ndims, shapes, dtypes, true, true);
}

// ----------------------------------------------------------------------------- the VAE: convolution, GroupNorm
// MindSpore's CPU Conv2d is fp32 only and its GroupNorm runs at a fraction of memory speed: the
// SDXL decoder spent ~2.5x torch bf16's time on them.

namespace {

// A run of fp32 values stored as the im2col element type: bf16 (round to nearest even) or fp32 as is.
void StoreRun(const float *src, uint16_t *dst, int64_t count) { ToBf16Run(src, dst, count); }
void StoreRun(const float *src, float *dst, int64_t count) { std::memcpy(dst, src, sizeof(float) * count); }
uint16_t StoreOne(float v, uint16_t *) { return ToBf16(v); }
float StoreOne(float v, float *) { return v; }

// Rows [r0, r1) of the im2col matrix of one image x (C, H, W): row r = (c, ky, kx) of a k×k kernel holds, for
// output rows [oy0, oy0 + rows) and every output column, x[c, oy·s + ky - p, ox·s + kx - p] (0 outside), as T.
template <typename T>
void Im2ColRows(const float *x, int64_t H, int64_t W, int64_t k, int64_t stride, int64_t pad, int64_t Wo, int64_t oy0,
                int64_t rows, int64_t r0, int64_t r1, T *cols) {
  const int64_t width = rows * Wo;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r / (k * k), ky = (r / k) % k, kx = r % k;
    for (int64_t j = 0; j < rows; ++j) {
      T *out = cols + r * width + j * Wo;
      const int64_t iy = (oy0 + j) * stride + ky - pad;
      if (iy < 0 || iy >= H) {
        std::memset(out, 0, sizeof(T) * Wo);
        continue;
      }
      const float *in = x + (c * H + iy) * W;
      if (stride == 1) {  // ix = ox + kx - pad lies in [0, W) for ox in [lo, hi): one contiguous run
        const int64_t lo = std::min<int64_t>(Wo, std::max<int64_t>(0, pad - kx));
        const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(Wo, W + pad - kx));
        std::memset(out, 0, sizeof(T) * lo);
        StoreRun(in + lo + kx - pad, out + lo, hi - lo);
        std::memset(out + hi, 0, sizeof(T) * (Wo - hi));
      } else {
        for (int64_t ox = 0; ox < Wo; ++ox) {
          const int64_t ix = ox * stride + kx - pad;
          out[ox] = (ix >= 0 && ix < W) ? StoreOne(in[ix], out) : T(0);
        }
      }
    }
  }
}

template <typename T>
std::vector<T> &ColsBuffer() {  // the im2col chunk of this thread, reused between calls
  thread_local std::vector<T> cols;
  return cols;
}

// inputs: x (N, C, H, W) float32, w (O, C, k, k) of type T (its dtype name w_dtype), b (O) float32, config (2)
// int32 = (stride, padding); output: y (N, O, Ho, Wo) float32. im2col + gemm(w (O, C·k·k), cols (C·k·k, width),
// y rows, width) = w · cols into the output rows, a chunk of output rows at a time (cols hold at most 8 Mi values),
// then the bias.
template <typename T, typename GemmFn>
int Conv2dIm2Col(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, const char *w_dtype,
                 GemmFn gemm) {
  if (nparam != 5 || ndims[0] != 4 || ndims[1] != 4 || ndims[4] != 4 || !IsDtype(dtypes[0], "float32") ||
      !IsDtype(dtypes[1], w_dtype) || !IsDtype(dtypes[2], "float32") || !IsDtype(dtypes[3], "int32") ||
      !IsDtype(dtypes[4], "float32"))
    return 1;
  const int64_t N = shapes[0][0], C = shapes[0][1], H = shapes[0][2], W = shapes[0][3];
  const int64_t O = shapes[1][0], k = shapes[1][2];
  const int32_t *config = static_cast<const int32_t *>(params[3]);
  const int64_t stride = config[0], pad = config[1];
  if (shapes[1][1] != C || shapes[1][3] != k || Elements(ndims[2], shapes[2]) != O || stride < 1 || pad < 0) return 2;
  const int64_t Ho = shapes[4][2], Wo = shapes[4][3];
  if (shapes[4][0] != N || shapes[4][1] != O || Ho != (H + 2 * pad - k) / stride + 1 ||
      Wo != (W + 2 * pad - k) / stride + 1)
    return 3;
  const float *x = static_cast<const float *>(params[0]), *bias = static_cast<const float *>(params[2]);
  const T *w = static_cast<const T *>(params[1]);
  float *y = static_cast<float *>(params[4]);
  const int64_t K = C * k * k, plane = Ho * Wo;
  if (N == 0 || O == 0 || plane == 0) return 0;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(Ho, (int64_t{8} << 20) / (K * Wo)));
  std::vector<T> &buffer = ColsBuffer<T>();
  if (buffer.size() < static_cast<size_t>(K * chunk * Wo)) buffer.resize(static_cast<size_t>(K * chunk * Wo));
  T *cols = buffer.data();
  for (int64_t n = 0; n < N; ++n) {
    const float *image = x + n * C * H * W;
    float *out = y + n * O * plane;
    for (int64_t oy0 = 0; oy0 < Ho; oy0 += chunk) {
      const int64_t rows = std::min(chunk, Ho - oy0), width = rows * Wo;
      ParallelRows(K, width, [&](int64_t r0, int64_t r1) {
        Im2ColRows(image, H, W, k, stride, pad, Wo, oy0, rows, r0, r1, cols);
      });
      const int status = gemm(O, width, K, w, cols, out + oy0 * Wo, plane);
      if (status != 0) return 10 + status;
    }
    ParallelRows(O, plane, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t i = 0; i < plane; ++i) out[o * plane + i] += bias[o];
    });
  }
  return 0;
}

}  // namespace

// The convolution with bf16 weights: bf16 products and fp32 sums (im2col in bf16 + the bf16 GEMM).
// inputs and output as Conv2dIm2Col, w (O, C, k, k) bfloat16.
extern "C" int Bf16Conv2d(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Conv2dIm2Col<uint16_t>(nparam, params, ndims, shapes, dtypes, "bfloat16",
                                [](int64_t O, int64_t width, int64_t K, const uint16_t *w, const uint16_t *cols,
                                   float *out, int64_t ldc) {
                                  return GemmBf16('N', 'N', O, width, K, w, K, cols, width, out, ldc);
                                });
}

// The fp32 convolution: im2col + the sgemm of the fp32 kernels (OpenBLAS where numpy bundles it), which ran
// the SDXL decoder's 3×3 convolutions 1.03-1.23x faster than MindSpore's CPU Conv2D (benchmarks/bench_conv.py).
// inputs and output as Conv2dIm2Col, w (O, C, k, k) float32.
extern "C" int F32Conv2d(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Conv2dIm2Col<float>(nparam, params, ndims, shapes, dtypes, "float32",
                             [](int64_t O, int64_t width, int64_t K, const float *w, const float *cols, float *out,
                                int64_t ldc) { return SgemmNN(w, cols, out, O, width, K, ldc); });
}

namespace {

// Σ x[i] (or Σ (x[i] - mean)²): 16 float lanes per 4096 values (vectorised), the blocks summed in double.
double BlockSum(const float *x, int64_t n, bool squares, float mean) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += 4096) {
    const int64_t e = std::min<int64_t>(n, b + 4096);
    float lanes[16] = {0.0f};
    int64_t i = b;
    for (; i + 16 <= e; i += 16)
      for (int l = 0; l < 16; ++l) {
        const float v = squares ? (x[i + l] - mean) * (x[i + l] - mean) : x[i + l];
        lanes[l] += v;
      }
    double part = 0.0;
    for (int l = 0; l < 16; ++l) part += lanes[l];
    for (; i < e; ++i) part += squares ? static_cast<double>(x[i] - mean) * (x[i] - mean) : x[i];
    total += part;
  }
  return total;
}

// (x - mean)·a + b, then SiLU (v·sigmoid(v)) when asked, over n values.
PIXART_AVX512 void AffineSiluAvx512(const float *x, float *y, int64_t n, float mean, float a, float b, bool silu) {
  int64_t i = 0;
  const __m512 vm = _mm512_set1_ps(mean), va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), va, vb);
    if (silu) v = _mm512_div_ps(v, _mm512_add_ps(one, Exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    _mm512_storeu_ps(y + i, v);
  }
  for (; i < n; ++i) {
    const float v = (x[i] - mean) * a + b;
    y[i] = silu ? v / (1.0f + std::exp(-v)) : v;
  }
}

void AffineSilu(const float *x, float *y, int64_t n, float mean, float a, float b, bool silu) {
  if (HasAvx512()) return AffineSiluAvx512(x, y, n, mean, a, b, silu);
  for (int64_t i = 0; i < n; ++i) {
    const float v = (x[i] - mean) * a + b;
    y[i] = silu ? v / (1.0f + std::exp(-v)) : v;
  }
}

}  // namespace

// inputs: x (N, C, H, W), gamma (C), beta (C) float32, config (3) float32 = (groups, eps, silu 0/1);
// output: GroupNorm(x)·gamma + beta (biased variance, as torch), then SiLU if asked: one pass per group.
extern "C" int GroupNormSilu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5 || ndims[0] < 2) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!IsDtype(dtypes[i], "float32")) return 1;
  const int64_t N = shapes[0][0], C = shapes[0][1], HW = Elements(ndims[0], shapes[0]) / std::max<int64_t>(1, N * C);
  const float *config = static_cast<const float *>(params[3]);
  const int64_t G = static_cast<int64_t>(config[0]);
  const float eps = config[1];
  const bool silu = config[2] != 0.0f;
  if (G < 1 || C % G != 0 || Elements(ndims[1], shapes[1]) != C || Elements(ndims[2], shapes[2]) != C) return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]), *beta = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[4]);
  const int64_t per = C / G, len = per * HW;
  ParallelRows(N * G, len, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const float *in = x + g * len;
      const float mean = static_cast<float>(BlockSum(in, len, false, 0.0f) / std::max<int64_t>(1, len));
      const double var = BlockSum(in, len, true, mean) / std::max<int64_t>(1, len);
      const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
      for (int64_t j = 0; j < per; ++j) {
        const int64_t c = (g % G) * per + j;
        AffineSilu(in + j * HW, y + g * len + j * HW, HW, mean, rstd * gamma[c], beta[c], silu);
      }
    }
  });
  return 0;
}

// ----------------------------------------------------------------------------- T5's gated feed-forward

namespace {

// y = tanh-GELU(y) · g, over rows [0, rows) of N values.
PIXART_AVX512 void GeluTimesRowsAvx512(float *y, const float *g, int64_t count) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = _mm512_loadu_ps(y + i);
    const __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v);
    const __m512 e = Exp512(_mm512_mul_ps(_mm512_set1_ps(-kGeluScale), inner));
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                          _mm512_loadu_ps(g + i)));
  }
  for (; i < count; ++i) {
    const float v = y[i];
    y[i] = v / (1.0f + std::exp(-kGeluScale * (v + 0.044715f * v * v * v))) * g[i];
  }
}

void GeluTimesRows(float *y, const float *g, int64_t count) {
  if (HasAvx512()) return GeluTimesRowsAvx512(y, g, count);
  for (int64_t i = 0; i < count; ++i) {
    const float v = y[i];
    y[i] = v / (1.0f + std::exp(-kGeluScale * (v + 0.044715f * v * v * v))) * g[i];
  }
}

thread_local std::vector<float> tls_gate;  // x · w1ᵀ of the gated kernel, reused between calls

}  // namespace

// inputs: x (..., K) float32, w0 (N, K), w1 (N, K) bfloat16; output: y (..., N) float32 =
// tanh-GELU(x · w0ᵀ) · (x · w1ᵀ), T5 v1.1's gated feed-forward before wo: two GEMMs on one bf16 copy
// of x and one pass for the GELU and the product (instead of eight MindSpore ops over (M, N)).
extern "C" int Bf16GatedGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4 || !IsDtype(dtypes[0], "float32") || !IsDtype(dtypes[1], "bfloat16") ||
      !IsDtype(dtypes[2], "bfloat16") || !IsDtype(dtypes[3], "float32") || ndims[1] != 2 || ndims[2] != 2)
    return 1;
  const int64_t K = shapes[0][ndims[0] - 1], N = shapes[1][0];
  if (shapes[1][1] != K || shapes[2][0] != N || shapes[2][1] != K) return 2;
  const int64_t M = Elements(ndims[0], shapes[0]) / (K ? K : 1);
  if (M == 0 || N == 0) return 0;
  float *y = static_cast<float *>(params[3]);
  if (K == 0) {
    std::memset(y, 0, sizeof(float) * M * N);
    return 0;
  }
  if (tls_x16.size() < static_cast<size_t>(M * K)) tls_x16.resize(static_cast<size_t>(M * K));
  if (tls_gate.size() < static_cast<size_t>(M * N)) tls_gate.resize(static_cast<size_t>(M * N));
  const float *xf = static_cast<const float *>(params[0]);
  uint16_t *x16 = tls_x16.data();
  ParallelRows(M, K, [&](int64_t m0, int64_t m1) { ToBf16Run(xf + m0 * K, x16 + m0 * K, (m1 - m0) * K); });
  int status = Gemm(x16, static_cast<const uint16_t *>(params[1]), y, M, N, K);
  if (status == 0) status = Gemm(x16, static_cast<const uint16_t *>(params[2]), tls_gate.data(), M, N, K);
  if (status != 0) return 10 + status;
  const float *gate = tls_gate.data();
  ParallelRows(M, N, [&](int64_t m0, int64_t m1) { GeluTimesRows(y + m0 * N, gate + m0 * N, (m1 - m0) * N); });
  return 0;
}

// ----------------------------------------------------------------------------- attention
// softmax(q kᵀ · scale + bias) v per head, q (N, T, H·d), k and v (N, S, H·d), out (N, T, H·d): the
// token-major layout of the linear layers around it, so no transposes into and out of heads. Each
// task is a block of query rows of one head: its scores (at most 512 KiB) stay in cache between
// the two GEMMs and the softmax, instead of MindSpore's (N, H, T, S) scores going through memory
// three times. A block's result depends on T and S only, not on the batch.

namespace {

thread_local std::vector<float> tls_scores;

// s·scale + bias -> softmax, over `rows` rows of S scores in place (bias: S values or null).
PIXART_AVX2 void SoftmaxRowsAvx2(float *p, int64_t rows, int64_t S, float scale, const float *bias) {
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    float *row = p + r * S;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= S; j += 8) {
      __m256 s = _mm256_mul_ps(_mm256_loadu_ps(row + j), vscale);
      if (bias) s = _mm256_add_ps(s, _mm256_loadu_ps(bias + j));
      _mm256_storeu_ps(row + j, s);
      vmax = _mm256_max_ps(vmax, s);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float m = *std::max_element(lanes, lanes + 8);
    for (; j < S; ++j) {
      row[j] = row[j] * scale + (bias ? bias[j] : 0.0f);
      m = std::max(m, row[j]);
    }
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= S; j += 8) {
      const __m256 e = Exp256(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
      _mm256_storeu_ps(row + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    _mm256_storeu_ps(lanes, vsum);
    float sum = 0.0f;
    for (float lane : lanes) sum += lane;
    for (; j < S; ++j) {
      row[j] = std::exp(row[j] - m);
      sum += row[j];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (j = 0; j + 8 <= S; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), inv));
    for (; j < S; ++j) row[j] *= 1.0f / sum;
  }
}

void SoftmaxRows(float *p, int64_t rows, int64_t S, float scale, const float *bias) {
  if (HasAvx2()) return SoftmaxRowsAvx2(p, rows, S, scale, bias);
  for (int64_t r = 0; r < rows; ++r) {
    float *row = p + r * S;
    float m = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      row[j] = row[j] * scale + (bias ? bias[j] : 0.0f);
      m = std::max(m, row[j]);
    }
    for (int64_t j = 0; j < S; ++j) sum += (row[j] = std::exp(row[j] - m));
    for (int64_t j = 0; j < S; ++j) row[j] *= 1.0f / sum;
  }
}

int AttentionKernel(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool has_bias,
                    bool bf16 = false) {
  const int expected = has_bias ? 6 : 5;
  if (nparam != expected || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!IsDtype(dtypes[i], "float32")) return 1;
  const int64_t N = shapes[0][0], T = shapes[0][1], C = shapes[0][2], S = shapes[1][1];
  // config: H values, all the scale (its length carries the head count)
  if (ndims[expected - 2] != 1) return 2;
  const int64_t H = shapes[expected - 2][0];
  const float scale = *static_cast<const float *>(params[expected - 2]);
  if (H <= 0 || C % H || shapes[1][0] != N || shapes[2][0] != N || shapes[1][2] != C || shapes[2][1] != S ||
      shapes[2][2] != C)
    return 2;
  if (has_bias && (ndims[3] != 2 || shapes[3][0] != N || shapes[3][1] != S)) return 2;
  const float *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *bias = has_bias ? static_cast<const float *>(params[3]) : nullptr;
  float *out = static_cast<float *>(params[expected - 1]);
  if (N * T * C == 0) return 0;
  if (S == 0) {
    std::memset(out, 0, sizeof(float) * N * T * C);
    return 0;
  }
  const int64_t d = C / H;
#ifdef PIXART_HAS_AMX
  if (bf16 && AmxReady()) {  // a task per head: its K and V are packed once
    Pool().parallel_for(static_cast<int>(std::min<int64_t>(Pool().get_num_threads(), N * H)), [&](int part, int n) {
      for (int64_t task = N * H * part / n; task < N * H * (part + 1) / n; ++task) {
        const int64_t b = task / H, h = task % H;
        Bf16AttentionHead(q + b * T * C + h * d, k + b * S * C + h * d, v + b * S * C + h * d,
                          bias ? bias + b * S : nullptr, out + b * T * C + h * d, T, S, C, d, scale);
      }
    });
    return 0;
  }
#endif
  // query rows per task: scores of at most 128 Ki floats (512 KiB); XL-2 at 512² (S = 1024): 128 rows
  // at 103 GFLOP/s, against 60-88 with 32 rows
  const int64_t block = std::max<int64_t>(8, std::min<int64_t>(T, 131072 / S));
  const int64_t blocks = (T + block - 1) / block, tasks = N * H * blocks;
  std::atomic<int> status{0};
  ThreadPool &pool = Pool();
  const int parts = static_cast<int>(std::min<int64_t>(pool.get_num_threads(), tasks));
  auto run = [&](int part, int nparts) {
    if (tls_scores.size() < static_cast<size_t>(block * S)) tls_scores.resize(static_cast<size_t>(block * S));
    float *scores = tls_scores.data();
    for (int64_t task = tasks * part / nparts; task < tasks * (part + 1) / nparts; ++task) {
      const int64_t n = task / (H * blocks), h = (task / blocks) % H, t0 = (task % blocks) * block;
      const int64_t rows = std::min(block, T - t0);
      const float *qb = q + (n * T + t0) * C + h * d, *kb = k + n * S * C + h * d, *vb = v + n * S * C + h * d;
      // sequential GEMMs (no threadpool): the tasks are the parallelism
      int st = dnnl_threadpool_interop_sgemm('N', 'T', rows, S, d, 1.0f, qb, C, kb, C, 0.0f, scores, S, nullptr);
      if (st == 0) {
        SoftmaxRows(scores, rows, S, scale, bias ? bias + n * S : nullptr);
        st = dnnl_threadpool_interop_sgemm('N', 'N', rows, d, S, 1.0f, scores, S, vb, C, 0.0f,
                                           out + (n * T + t0) * C + h * d, C, nullptr);
      }
      if (st != 0) status.store(10 + st);
    }
  };
  if (parts <= 1)
    run(0, 1);
  else
    pool.parallel_for(parts, run);
  return status.load();
}

}  // namespace

// inputs: q (N, T, H·d), k (N, S, H·d), v (N, S, H·d), config (H) float32 = the scale, H times; output
// (N, T, H·d).
extern "C" int Attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)stream;
  (void)extra;
  return AttentionKernel(nparam, params, ndims, shapes, dtypes, false);
}

// inputs: q, k, v as Attention, key_bias (N, S) added to every query's scores (a padding mask), config.
extern "C" int AttentionBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return AttentionKernel(nparam, params, ndims, shapes, dtypes, true);
}

// As Attention, with bf16 operands and fp32 sums on CPUs with AMX (the fp32 kernel elsewhere): the
// attention of the bf16-GEMM models.
extern "C" int Bf16Attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return AttentionKernel(nparam, params, ndims, shapes, dtypes, false, true);
}

// As AttentionBias, with bf16 operands as Bf16Attention.
extern "C" int Bf16AttentionBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return AttentionKernel(nparam, params, ndims, shapes, dtypes, true, true);
}
