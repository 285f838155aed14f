// bf16 GEMM and a fast bf16 -> fp32 upcast for MindSpore's CPU backend, as ops.Custom AOT kernels.
//
// MindSpore 2.7 has no CPU bf16 MatMul, and its CPU bf16 -> fp32 Cast runs at a fraction of memory
// speed. Both are plain loops or library calls here:
//   * Bf16MatMul: y (M, N) fp32 = x (M, K) · w (N, K)ᵀ with x fp32 (rounded to bf16 here, round to
//     nearest even like torch) or bf16, w bf16, fp32 accumulation. The GEMM is oneDNN's
//     gemm_bf16bf16f32 from the libdnnl.so.2 that ships inside MindSpore (its AVX512-BF16 / AMX
//     kernels), so nothing beyond MindSpore and a C++ compiler is needed.
//   * Bf16ToF32: exact upcast (a 16-bit shift), for fp32 compute on bf16-stored weights.
// MindSpore's bundled oneDNN is built with the THREADPOOL runtime: its BLAS calls take a
// threadpool object, which ThreadPool below provides (a fixed set of worker threads).
//
// AOT kernel ABI (MindSpore ops.Custom, func_type="aot"): params = inputs then outputs; return 0 on
// success. pixart_bf16_selftest() is a plain C entry point for the loader's self-check.

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
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
      for (int i = 0; i < n; ++i) fn(i, n);
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
  void RunShare() {
    tls_in_pool = true;
    for (int i = next_.fetch_add(1); i < job_n_; i = next_.fetch_add(1)) (*job_)(i, job_n_);
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

void ToBf16Array(const float *src, uint16_t *dst, int64_t count) {
  ParallelRanges(count, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = ToBf16(src[i]);
  });
}

int64_t Elements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

// y = x · wᵀ, x (M, K) bf16, w (N, K) bf16, y (M, N) fp32 row-major.
int Gemm(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
  return dnnl_threadpool_interop_gemm_bf16bf16f32('N', 'T', M, N, K, 1.0f, x, K, w, K, 0.0f, y, N, &Pool());
}

}  // namespace

// inputs: x (..., K) float32 or bfloat16, w (N, K) bfloat16; output: y (..., N) float32.
extern "C" int Bf16MatMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[1] != 2 || std::strcmp(dtypes[1], "bfloat16") != 0 ||
      std::strcmp(dtypes[2], "float32") != 0)
    return 1;
  const int64_t K = shapes[0][ndims[0] - 1], N = shapes[1][0];
  if (shapes[1][1] != K) return 2;
  const int64_t M = Elements(ndims[0], shapes[0]) / (K ? K : 1);
  const uint16_t *w = static_cast<const uint16_t *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  if (M == 0 || N == 0) return 0;
  if (K == 0) {
    std::memset(y, 0, sizeof(float) * M * N);
    return 0;
  }
  if (std::strcmp(dtypes[0], "bfloat16") == 0) return Gemm(static_cast<const uint16_t *>(params[0]), w, y, M, N, K);
  if (std::strcmp(dtypes[0], "float32") != 0) return 3;
  std::vector<uint16_t> x16(static_cast<size_t>(M * K));
  ToBf16Array(static_cast<const float *>(params[0]), x16.data(), M * K);
  return Gemm(x16.data(), w, y, M, N, K);
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
