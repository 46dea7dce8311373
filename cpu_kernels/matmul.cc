// Weight-only int8 matrix products on the CPU, an XLA FFI custom call (see matmul.py).
//
// y[M, N] = (x[M, K] @ q[N, K]^T) * scale[N]: float32 rows times int8 weights with one float32
// scale per output column (per channel), for the few rows of a decode step. A decode step reads
// every weight once and does little with it, so it is bound by the bytes it reads: int8 weights are
// a quarter of float32's. XLA has no such product on the CPU (it would widen the whole matrix to
// float32 first, writing four times the bytes it saves), so this kernel widens 16 weights at a time
// in registers:
// - q is stored [N, K] (each output column's weights contiguous); four columns at a time are dotted
//   with up to six x rows, vectorised over K, each widened weight vector meeting every row of the
//   tile while it is in a register; one horizontal sum per (row, column) at the end, times the scale;
// - a work item is 64 columns (36 KiB of weights at K = 576); each column group asks for the next
//   group's weights ahead of use (four streams per group, where the hardware prefetcher alone
//   left the kernel at a third of the memory bandwidth);
// - items are dealt out from an atomic counter to XLA's intra-op thread pool and the calling thread.
// q may be a stack [L, N, K] (scale [L, N]) with the layer to use given as an operand, so a scanned
// layer could pass its whole stack and its index instead of a slice, which XLA copies out of the stack
// before a custom call. The model passes slices: at int8's sizes the copy measured no slower
// (scripts/bench_int8_matmul.py, "stack").
// K not a multiple of 16 goes through a plain loop.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef FASTGEN_NO_FFI
#include "xla/ffi/api/ffi.h"
#endif

namespace fastgen_matmul {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int8_t v16b __attribute__((vector_size(16), aligned(1)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }

// 16 int8 weights widened to float32.
inline v16 widen(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<v16>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  v16 out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  return __builtin_convertvector(*reinterpret_cast<const v16b*>(p), v16);
#endif
}

inline float hsum(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

constexpr int64_t kGroup = 4;           // output columns per tile
constexpr int64_t kColumnsPerItem = 64;  // output columns per work item

// y[m0 : m0 + MR, n : n + 4] for K a multiple of 16; `ahead` is where the next group's weights are.
template <int MR>
inline void tile(const float* __restrict x, const int8_t* __restrict q, const float* __restrict scale,
                 float* __restrict y, int64_t K, int64_t N, int64_t m0, int64_t n, bool prefetch) {
  v16 acc[MR][kGroup];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kGroup; ++j) acc[m][j] = v16{};
  const int8_t* __restrict w = q + n * K;
  for (int64_t k = 0; k < K; k += 16) {
    const v16 a = widen(w + k), b = widen(w + K + k), c = widen(w + 2 * K + k), d = widen(w + 3 * K + k);
    if (prefetch) {
      for (int j = 0; j < kGroup; ++j) __builtin_prefetch(w + (kGroup + j) * K + k, 0, 0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const v16 xv = load(x + (m0 + m) * K + k);
      acc[m][0] += xv * a;
      acc[m][1] += xv * b;
      acc[m][2] += xv * c;
      acc[m][3] += xv * d;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kGroup; ++j) y[(m0 + m) * N + n + j] = hsum(acc[m][j]) * scale[n + j];
}

// y[:, n] for one column, any K.
inline void column(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t K,
                   int64_t N, int64_t n) {
  const int8_t* w = q + n * K;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) s += xm[k] * static_cast<float>(w[k]);
    y[m * N + n] = s * scale[n];
  }
}

struct Problem {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t M, K, N;

  int64_t num_items() const { return (N + kColumnsPerItem - 1) / kColumnsPerItem; }

  // Columns [item * 64, (item + 1) * 64) of every row.
  void run(int64_t item) const {
    const int64_t n1 = std::min(N, (item + 1) * kColumnsPerItem);
    int64_t n = item * kColumnsPerItem;
    if (K % 16 == 0) {
      for (; n + kGroup <= n1; n += kGroup) {
        const bool ahead = n + 2 * kGroup <= n1;  // the prefetched group lies inside this item
        int64_t m = 0;
#ifdef __AVX512F__
        for (; m + 6 <= M; m += 6) tile<6>(x, q, scale, y, K, N, m, n, ahead && m == 0);
#endif
        for (; m + 3 <= M; m += 3) tile<3>(x, q, scale, y, K, N, m, n, ahead && m == 0);
        for (; m < M; ++m) tile<1>(x, q, scale, y, K, N, m, n, ahead && m == 0);
      }
    }
    for (; n < n1; ++n) column(x, q, scale, y, M, K, N, n);
  }
};

}  // namespace fastgen_matmul

#ifndef FASTGEN_NO_FFI
namespace {

namespace ffi = xla::ffi;
using fastgen_matmul::Problem;

struct Shared {
  Problem problem;
  int64_t items = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable all_done;

  void work() {
    int64_t finished = 0;
    for (int64_t i; (i = next.fetch_add(1)) < items; ++finished) problem.run(i);
    if (finished && done.fetch_add(finished) + finished == items) {
      std::lock_guard<std::mutex> lock(mutex);
      all_done.notify_all();
    }
  }
};

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || (qd.size() != 2 && qd.size() != 3) || sd.size() + 1 != qd.size()) {
    return ffi::Error::InvalidArgument("int8 matmul: x [M, K], q [(L,) N, K], scale [(L,) N], y [M, N]");
  }
  const size_t r = qd.size() - 2;
  const int64_t M = xd[0], K = xd[1], N = qd[r];
  if (qd[r + 1] != K || sd[r] != N || yd[0] != M || yd[1] != N || (r && sd[0] != qd[0])) {
    return ffi::Error::InvalidArgument("int8 matmul: shapes do not match");
  }
  int64_t index = 0;
  if (r) {
    index = layer.typed_data()[0];
    if (index < 0 || index >= qd[0]) return ffi::Error::InvalidArgument("int8 matmul: layer out of range");
  }
  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{x.typed_data(), q.typed_data() + index * N * K, scale.typed_data() + index * N,
                            y->typed_data(), M, K, N};
  shared->items = M ? shared->problem.num_items() : 0;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->work(); });
  shared->work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_done.wait(lock, [&] { return shared->done.load() == shared->items; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastgenInt8Matmul, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q [N, K] or [L, N, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [N] or [L, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer: i32[1], the stack's index
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]
#endif
