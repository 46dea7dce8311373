// Matrix products for the few rows of a decode step on the CPU, XLA FFI custom calls (see matmul.py):
// weight-only int8 (FastgenInt8Matmul) and float32 (FastgenF32Matmul).
//
// float32: y[M, N] = x[M, K] @ w, w either [K, N] (a projection as the model stores it) or [N, K]
// (the LM head, the embedding's rows). XLA's CPU dot runs these at half the multiply rate or the
// memory bandwidth for 4-256 rows (scripts/bench_f32_matmul.py); here each work item is 64 output columns:
// - w [K, N]: tiles of up to 6 rows x 64 columns held in 24 vector registers, each k broadcasting one
//   value per row against the 64 weights of row k (no horizontal sums); the item's weights stream
//   from memory for the first row tile (asked for a few k ahead) and from cache for the rest;
// - w [N, K]: the dot form below (four columns at a time, vectorised over K);
// - w packed [N / kStrip, K, kStrip] (FastgenF32PackedMatmul, `PackedProblem`): the [K, N] tiles over
//   strips stored contiguously at load time, one work item per strip, at every row count (the model's
//   projections wherever the kernels have tiles: fastgen_jax/weight_layout.py).
// Every path has register tiles for AVX-512 (16 floats a vector, 32 registers) and for AVX2 with
// FMA (8 floats, 16 registers: e.g. the [K, N] tiles are 6 rows x 16 columns there, and a strip that
// more than two row tiles read is first packed into contiguous rows); `kLanes`.
//
// int8:
//
// y[M, N] = (x[M, K] @ q[N, K]^T) * scale[N]: bfloat16 rows times int8 weights with one float32
// scale per output column (per channel), summed in float32, for the rows of a decode step or a small
// fused one. XLA has no such product on the CPU (it would widen the whole matrix first, writing more
// bytes than int8 saves), so this kernel widens the weights in registers or in cache:
// - q is stored [N, K] (each output column's weights contiguous); four columns at a time are dotted
//   with up to six x rows, vectorised over K, one horizontal sum per (row, column) at the end, times
//   the scale;
// - where the CPU has AVX512_BF16 (and K is a multiple of 32), products are bfloat16 pairs summed
//   into float32 lanes (`vdpbf16ps`, twice float32's multiply rate): int8 weights and bfloat16 rows
//   are exact in bfloat16, so each product is exact and only the float32 sums round (vdpbf16ps
//   treats denormal inputs and results as zero: below 1.2e-38, nothing a projection sees). Up to eight rows
//   widen 32 weights at a time in registers (a decode step: bound by the bytes it reads), reading each
//   column's weights in order and asking for them 4 KiB ahead (`group_in_order`); more rows
//   widen a work item's weights once into a per-thread bfloat16 buffer that every row tile then reads
//   from cache (a small fused step: bound by the multiplies, which widening per row tile would double);
// - elsewhere, the rows are widened to float32 once per call and the products are float32 FMAs over
//   16 widened weights at a time;
// - a work item is 64 columns (36 KiB of weights at K = 576), or up to 256 on the direct path
//   (`columns_per_item`); the float32 path's column groups ask for the next group's weights ahead of
//   use (four streams per group, where the hardware prefetcher alone left the kernel at a third of
//   the memory bandwidth);
// - items are dealt out from an atomic counter to XLA's intra-op thread pool and the calling thread.
// q may be a stack [L, N, K] (scale [L, N]) with the layer to use given as an operand, so a scanned
// layer could pass its whole stack and its index instead of a slice, which XLA copies out of the stack
// before a custom call. The model passes slices: at int8's sizes the copy measured no slower
// (scripts/bench_int8_matmul.py, "stack").
// K not a multiple of the vector width (16 floats with AVX-512, 8 otherwise) goes through a plain loop.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define FASTGEN_AVX2 1  // the AVX2 (+ FMA) variants of the paths below
#endif

#include "simd.h"

#ifndef FASTGEN_NO_FFI
#include "wait.h"
#include "xla/ffi/api/ffi.h"
#endif

namespace fastgen_matmul {

// The build's float vector, `kLanes` floats: one zmm register (16) with AVX-512, one ymm (8)
// elsewhere (AVX2; other targets lower it to what they have). Register tiles are sized per width:
// AVX-512 has 32 vector registers, AVX2 16, and a tile that outgrows them spills (the 64-byte tiles
// this file once used everywhere ran at 0.7 GB/s for 8 rows on an AVX2-only EPYC).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef float vfu __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int8_t vfb __attribute__((vector_size(kLanes), aligned(1)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }

// kLanes int8 weights widened to float32.
inline vf widen(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  return reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  return __builtin_convertvector(*reinterpret_cast<const vfb*>(p), vf);
#endif
}

using fastgen_kernels::in_register;  // simd.h

inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

constexpr int64_t kGroup = 4;           // output columns per tile
constexpr int64_t kColumnsPerItem = 64;  // output columns per work item

#if defined(__AVX512F__)
// out[j] = sum(v[j]) (times scale[j] unless scale is null) for four vectors at once: their 16-lane
// sums folded together by shuffles (about a quarter of four separate reductions' work, which at
// K = 576 would cost nearly half as much as the products).
inline void store_sums4(const __m512* v, const float* scale, float* out) {
  // [a0-3 + a8-11, a4-7 + a12-15, b0-3 + b8-11, b4-7 + b12-15], and the same of c and d
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44), _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44), _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
  // one 128-bit block of four partial sums per vector: a, b, c, d
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));  // within each block: (0+2, 1+3, ...)
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));  // lane 0 of each block: its total
  const __m512 sums = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s);
  const __m128 total = _mm512_castps512_ps128(sums);
  _mm_storeu_ps(out, scale ? _mm_mul_ps(total, _mm_loadu_ps(scale)) : total);
}
#endif

// The weights of the dot form, each output column's K weights contiguous ([N, K]): int8 widened to
// float32 with a scale per column, or float32 as they are (no scale).
struct Int8Columns {
  const int8_t* q;
  const float* scale;
  vf at(int64_t i) const { return widen(q + i); }
  float value(int64_t i) const { return static_cast<float>(q[i]); }
  const void* address(int64_t i) const { return q + i; }
};

struct F32Columns {
  const float* w;
  const float* scale = nullptr;
  vf at(int64_t i) const { return load(w + i); }
  float value(int64_t i) const { return w[i]; }
  const void* address(int64_t i) const { return w + i; }
};

// y[m0 : m0 + MR, n : n + 4] for K a multiple of kLanes; with `prefetch`, the next group's weights
// are asked for ahead of use.
template <int MR, class W>
inline void tile(const float* __restrict x, W w, float* __restrict y, int64_t K, int64_t N, int64_t m0,
                 int64_t n, bool prefetch) {
  vf acc[MR][kGroup];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kGroup; ++j) acc[m][j] = vf{};
  const int64_t base = n * K;
  for (int64_t k = 0; k < K; k += kLanes) {
    const vf a = w.at(base + k), b = w.at(base + K + k), c = w.at(base + 2 * K + k), d = w.at(base + 3 * K + k);
    if (prefetch) {
      for (int j = 0; j < kGroup; ++j) __builtin_prefetch(w.address(base + (kGroup + j) * K + k), 0, 0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      vf xv = load(x + (m0 + m) * K + k);
      in_register(xv);
      acc[m][0] += xv * a;
      acc[m][1] += xv * b;
      acc[m][2] += xv * c;
      acc[m][3] += xv * d;
    }
  }
  const float* scale = w.scale ? w.scale + n : nullptr;
  for (int m = 0; m < MR; ++m) {
#if defined(__AVX512F__)
    store_sums4(reinterpret_cast<const __m512*>(acc[m]), scale, y + (m0 + m) * N + n);
#else
    for (int j = 0; j < kGroup; ++j) y[(m0 + m) * N + n + j] = hsum(acc[m][j]) * (scale ? scale[j] : 1.0f);
#endif
  }
}

// y[:, n] for one column, any K.
template <class W>
inline void column(const float* x, W w, float* y, int64_t M, int64_t K, int64_t N, int64_t n) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) s += xm[k] * w.value(n * K + k);
    y[m * N + n] = s * (w.scale ? w.scale[n] : 1.0f);
  }
}

// Columns [n0, n1) of every row in the dot form: groups of four columns by tiles of 6, 3 and 1 rows
// (AVX-512) or 2 and 1 (8 accumulators and 4 weights of AVX2's 16 registers), then the columns past
// the last group one at a time.
template <class W>
void dot_columns(const float* x, W w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (K % kLanes == 0) {
    for (; n + kGroup <= n1; n += kGroup) {
      const bool ahead = n + 2 * kGroup <= n1;  // the prefetched group lies inside this item
      int64_t m = 0;
#ifdef __AVX512F__
      for (; m + 6 <= M; m += 6) tile<6>(x, w, y, K, N, m, n, ahead && m == 0);
      for (; m + 3 <= M; m += 3) tile<3>(x, w, y, K, N, m, n, ahead && m == 0);
#else
      for (; m + 2 <= M; m += 2) tile<2>(x, w, y, K, N, m, n, ahead && m == 0);
#endif
      for (; m < M; ++m) tile<1>(x, w, y, K, N, m, n, ahead && m == 0);
    }
  }
  for (; n < n1; ++n) column(x, w, y, M, K, N, n);
}

// Up to this many rows, the dot form ([N, K] weights: int8 widened to bfloat16, or float32) reads
// each column's weights in order (`group_in_order`). 8 rather than 6: at 8 rows
// the int8 projections took 11.5-11.7 ms in order against 15.4-21.4 buffered, the float32 head
// 5.4-6.5 against 6.6-6.8 by column-group tiles (`scripts/matmul_harness.cc`, two rounds).
constexpr int64_t kDirectRows = 8;
// How far ahead of its reads that path asks for weights (`prefetchnta`: into L1 without displacing
// the caches' other contents).
constexpr int64_t kAheadBytes = 4096;

// Output columns per work item. The in-order path (few rows, bound by reading the weights) takes long
// runs of contiguous columns: 256-column items read SmolLM2's one-row int8 projections at 33-34 GB/s
// where 64-column ones read at 24-30 (a standalone harness, 2 cores), as long as every thread still
// gets about four items; otherwise 64 (the int8 buffered path's per-thread bfloat16 copy of an item
// stays in L2).
inline int64_t columns_per_item(int64_t M, int64_t N, int64_t workers, bool in_order) {
  if (!in_order || M > kDirectRows) return kColumnsPerItem;
  const int64_t even = N / (4 * std::max<int64_t>(1, workers)) / kGroup * kGroup;
  return std::clamp<int64_t>(even, kColumnsPerItem, 4 * kColumnsPerItem);
}

#if defined(__AVX512F__)
// How the in-order path reads one kind of weights: `kWidth` of them per vector, loaded (or widened)
// by `weights`, multiplied into float32 sums by `madd`. float32 [N, K] (the LM head): plain loads and
// FMAs. (int8 widened to bfloat16 pairs, `Bf16Lanes`, where the CPU has AVX512_BF16.)
struct F32Lanes {
  using X = float;  // the rows' type
  using W = float;  // the weights' type
  static constexpr int64_t kWidth = 16;
  static __m512 weights(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 madd(__m512 acc, const float* x, __m512 w) { return _mm512_fmadd_ps(_mm512_loadu_ps(x), w, acc); }
};

// y[0 : MR, n : n + 4] = x[0 : MR, :] @ w[n : n + 4, :]^T (times scale[n : n + 4] unless null), the
// weights [N, K] (w points at column n, K a multiple of kWidth): each column's K weights read in
// order, two accumulators per row (even and odd vectors), then the next column (the four columns of
// a group are contiguous, so an item reads one run of memory), asking for the weights kAheadBytes
// ahead. Reading four columns side by side instead measured 15-18 GB/s for SmolLM2's int8
// projections at one row where this ran at 26-33 (a plain sum of the same bytes 30-38), and the
// float32 LM head at one row took 5.1-7.6 ms that way against 3.3-3.7 (XLA's dot about 5.4; a
// standalone harness on 2 cores).
template <int MR, class Lanes>
inline void group_in_order(const typename Lanes::X* __restrict x, const typename Lanes::W* __restrict w,
                           const float* __restrict scale, float* __restrict y, int64_t K, int64_t N, int64_t n) {
  constexpr int64_t kStep = 2 * Lanes::kWidth, kBytes = kStep * sizeof(typename Lanes::W);
  __m512 sums[MR][4];
  for (int j = 0; j < 4; ++j) {
    const typename Lanes::W* wj = w + j * K;
    __m512 a[MR], b[MR];
    for (int m = 0; m < MR; ++m) a[m] = b[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + kStep <= K; k += kStep) {
      const char* ahead = reinterpret_cast<const char*>(wj + k) + kAheadBytes;
      for (int64_t line = 0; line < kBytes; line += 64) __builtin_prefetch(ahead + line, 0, 0);
      const auto w0 = Lanes::weights(wj + k), w1 = Lanes::weights(wj + k + Lanes::kWidth);
      for (int m = 0; m < MR; ++m) {
        a[m] = Lanes::madd(a[m], x + m * K + k, w0);
        b[m] = Lanes::madd(b[m], x + m * K + k + Lanes::kWidth, w1);
      }
    }
    if (k < K) {  // K % kStep == kWidth
      const auto w0 = Lanes::weights(wj + k);
      for (int m = 0; m < MR; ++m) a[m] = Lanes::madd(a[m], x + m * K + k, w0);
    }
    for (int m = 0; m < MR; ++m) sums[m][j] = _mm512_add_ps(a[m], b[m]);
  }
  for (int m = 0; m < MR; ++m) store_sums4(sums[m], scale ? scale + n : nullptr, y + m * N + n);
}
#elif defined(FASTGEN_AVX2)
// AVX2's in-order path (float32 [N, K] weights only, as the int8 kernel's in-order lanes need
// AVX512_BF16): the same reading order as AVX-512's, in 16 vector registers.
struct F32Lanes {
  using X = float;
  using W = float;
};

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[r * N] = x[r, :] . wj (times `scale`) for R <= 4 rows: two accumulators per row (even and odd
// vectors), so even one row has two FMA chains; with `ahead`, wj's next weights are asked for
// kAheadBytes ahead, one cache line per step.
template <int R>
inline void rows_of_column(const float* __restrict x, const float* __restrict wj, float scale,
                           float* __restrict y, int64_t K, int64_t N, bool ahead) {
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (ahead) __builtin_prefetch(reinterpret_cast<const char*>(wj + k) + kAheadBytes, 0, 0);
    const __m256 w0 = _mm256_loadu_ps(wj + k), w1 = _mm256_loadu_ps(wj + k + 8);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), w0, a[r]);
      b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k + 8), w1, b[r]);
    }
  }
  if (k < K) {  // K % 16 == 8
    const __m256 w0 = _mm256_loadu_ps(wj + k);
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), w0, a[r]);
  }
  for (int r = 0; r < R; ++r) y[r * N] = hsum8(_mm256_add_ps(a[r], b[r])) * scale;
}

// y[0 : MR, n : n + 4] = x[0 : MR, :] @ w[n : n + 4, :]^T (w points at column n, K a multiple of 8):
// one column after another, in passes of at most four rows; a fifth to eighth row reads the column
// again from L1 (its 2.3 KiB at K = 576) rather than holding more sums than AVX2 has registers.
template <int MR, class Lanes>
inline void group_in_order(const float* __restrict x, const float* __restrict w, const float* __restrict scale,
                           float* __restrict y, int64_t K, int64_t N, int64_t n) {
  for (int j = 0; j < 4; ++j) {
    const float* wj = w + j * K;
    const float s = scale ? scale[n + j] : 1.0f;
    rows_of_column<(MR < 4 ? MR : 4)>(x, wj, s, y + n + j, K, N, true);
    if constexpr (MR > 4) rows_of_column<MR - 4>(x + 4 * K, wj, s, y + 4 * N + n + j, K, N, false);
  }
}
#endif

#if defined(__AVX512F__) || defined(FASTGEN_AVX2)
// Columns [n0, n1) of M <= kDirectRows rows: groups of four read in order, then `tail(n)` for each
// column past the last group.
template <class Lanes, class Tail>
inline void columns_in_order(const typename Lanes::X* x, const typename Lanes::W* w, const float* scale, float* y,
                             int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, Tail tail) {
  int64_t n = n0;
  for (; n + kGroup <= n1; n += kGroup) {
    const typename Lanes::W* wn = w + n * K;
    switch (M) {
      case 1: group_in_order<1, Lanes>(x, wn, scale, y, K, N, n); break;
      case 2: group_in_order<2, Lanes>(x, wn, scale, y, K, N, n); break;
      case 3: group_in_order<3, Lanes>(x, wn, scale, y, K, N, n); break;
      case 4: group_in_order<4, Lanes>(x, wn, scale, y, K, N, n); break;
      case 5: group_in_order<5, Lanes>(x, wn, scale, y, K, N, n); break;
      case 6: group_in_order<6, Lanes>(x, wn, scale, y, K, N, n); break;
      case 7: group_in_order<7, Lanes>(x, wn, scale, y, K, N, n); break;
      default: group_in_order<8, Lanes>(x, wn, scale, y, K, N, n); break;
    }
  }
  for (; n < n1; ++n) tail(n);
}
#endif

// ---------------------------------------------------------------- float32, weights [K, N]

constexpr int64_t kAheadK = 8;  // how many weight rows ahead the first row tile asks for

// Weight rows [begin, end) of the strip a thread multiplies next (`next`: its first column in row 0;
// null: none), asked for into L2 one row at a time, one row every `every` weight rows of the current
// tile, so the next strip's reads overlap this strip's multiplies (`rows_kn`).
struct NextStrip {
  const float* next = nullptr;
  int64_t begin = 0, end = 0, every = 1;
};

// y[m0 : m0 + MR, n : n + kLanes NV] = x[m0 : m0 + MR, :] @ strip (y [M, N]), the strip's weight rows
// `ldw` floats apart (w[:, n : n + kLanes NV] of w [K, N]: strip = w + n, ldw = N; or a packed copy).
template <int MR, int NV>
inline void tile_kn(const float* __restrict x, const float* __restrict strip, int64_t ldw, float* __restrict y,
                    int64_t K, int64_t N, int64_t m0, int64_t n, bool prefetch, NextStrip ahead) {
  vf acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = vf{};
  const float* __restrict row = strip;
  const float* __restrict xr = x + m0 * K;
  const float* asked = ahead.next ? ahead.next + ahead.begin * N : nullptr;
  const float* const asked_end = ahead.next ? ahead.next + ahead.end * N : nullptr;
  int64_t countdown = ahead.every;
  for (int64_t k = 0; k < K; ++k, row += ldw) {
    vf wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load(row + kLanes * j);
    if (prefetch && k + kAheadK < K) {
      for (int j = 0; j < NV; ++j) __builtin_prefetch(row + kAheadK * ldw + kLanes * j, 0, 1);
    }
    if (asked != asked_end && --countdown == 0) {
      countdown = ahead.every;
      for (int j = 0; j < NV; ++j) __builtin_prefetch(asked + kLanes * j, 0, 2);
      asked += N;
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const vf xv = vf{} + xr[m * K + k];
      for (int j = 0; j < NV; ++j) acc[m][j] += xv * wv[j];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) store(y + (m0 + m) * N + n + kLanes * j, acc[m][j]);
}

// Rows [0, M) of columns [n, n + kLanes NV): the fewest tiles of at most six rows, their sizes within one
// of each other (8 rows as 4 + 4, not 6 + 2: a small tile loads as many weights for fewer products).
// The first tile reads the strip from memory (asking a few rows ahead) and the others from cache;
// with `next` (the first column of the strip this thread multiplies next, or null) the tiles after
// the first ask for that strip's rows, spread evenly over their weight rows, so its reads run while
// these tiles multiply instead of stalling the next strip's first tile.
template <int NV>
inline void rows_kn(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n,
                    const float* next) {
  const int64_t tiles = (M + 5) / 6, base = tiles ? M / tiles : 0, larger = tiles ? M % tiles : 0;
  const int64_t askers = std::max<int64_t>(1, tiles - 1), share = std::max<int64_t>(1, (K + askers - 1) / askers);
  const float* strip = w + n;
  int64_t ldw = N;
#ifdef FASTGEN_AVX2
  // Many row tiles: the strip copied once into contiguous rows, which the tiles then read from cache
  // in order (in place, each of its K rows of 64 bytes lies N floats from the last: a page apiece).
  thread_local std::vector<float> packed;
  if (tiles > 2) {
    constexpr int64_t kWidth = kLanes * NV;
    packed.resize(K * kWidth);
    for (int64_t k = 0; k < K; ++k) {
      if (k + kAheadK < K) __builtin_prefetch(strip + (k + kAheadK) * N, 0, 1);
      for (int j = 0; j < NV; ++j) store(packed.data() + k * kWidth + kLanes * j, load(strip + k * N + kLanes * j));
    }
    strip = packed.data();
    ldw = kWidth;
  }
#endif
  for (int64_t t = 0, m = 0; t < tiles; ++t) {
    const int64_t rows = base + (t < larger);
    const bool first = t == 0;
    NextStrip ahead;
    if (next && (t > 0 || tiles == 1)) {
      const int64_t i = tiles == 1 ? 0 : t - 1;
      ahead = {next, std::min(K, i * share), std::min(K, (i + 1) * share), std::max<int64_t>(1, K / share)};
    }
    switch (rows) {
      case 6: tile_kn<6, NV>(x, strip, ldw, y, K, N, m, n, first && ldw == N, ahead); break;
      case 5: tile_kn<5, NV>(x, strip, ldw, y, K, N, m, n, first && ldw == N, ahead); break;
      case 4: tile_kn<4, NV>(x, strip, ldw, y, K, N, m, n, first && ldw == N, ahead); break;
      case 3: tile_kn<3, NV>(x, strip, ldw, y, K, N, m, n, first && ldw == N, ahead); break;
      case 2: tile_kn<2, NV>(x, strip, ldw, y, K, N, m, n, first && ldw == N, ahead); break;
      default: tile_kn<1, NV>(x, strip, ldw, y, K, N, m, n, first && ldw == N, ahead); break;
    }
    m += rows;
  }
}

// Weight vectors per row of a [K, N] strip: 64 columns with AVX-512 (6 x 4 sums of its 32
// registers), 16 with AVX2 (6 x 2 of 16).
constexpr int kStripVectors = kLanes == 16 ? 4 : 2;
constexpr int64_t kStrip = kLanes * kStripVectors;

// Columns [n0, n1) of every row (w [K, N]): kStrip at a time, then kLanes, then one at a time.
// `next_n`: the first column this thread multiplies after these (-1: none), asked for while the
// last strip runs.
inline void kn_columns(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                       int64_t n1, int64_t next_n = -1) {
  int64_t n = n0;
  for (; n + kStrip <= n1; n += kStrip) {
    const int64_t after = n + 2 * kStrip <= n1 ? n + kStrip : next_n;
    rows_kn<kStripVectors>(x, w, y, M, K, N, n, after >= 0 && after + kStrip <= N ? w + after : nullptr);
  }
  for (; n + kLanes <= n1; n += kLanes) rows_kn<1>(x, w, y, M, K, N, n, nullptr);
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[k * N + n];
      y[m * N + n] = s;
    }
  }
}

// ---------------------------------------------------- float32, weights [K, N], a few rows

// A few rows barely reuse a weight, so the product is as fast as the weights can be read. A tile's
// 64-column strip reads 256 bytes of each weight row, one row after another N floats apart: every
// k starts a new stream and, past N = 1024, a new page. That ran at 9-17 GB/s where reading the
// same bytes in order ran at 19-26 (a standalone harness on this machine's 2 cores). So a few rows
// split K instead: K is cut into up to kStreamChunks runs of whole weight rows (each contiguous in
// memory), a work item each, read in order kStreamK rows at a time into the run's own partial
// [M, N]; the partials are added in order at the end, so the result does not depend on which
// thread took which run (the same bits every call). Eight runs let the calling thread take a late
// helper's share. A group of 8 weight rows is 8 vectors: 8 of AVX2's 16 registers (8-float vectors
// there), 8 of AVX-512's 32.
constexpr int64_t kStreamK = 8;
constexpr int64_t kStreamChunks = 8;

// y[m0 : m0 + MR, n0 : n1] += x[m0 : m0 + MR, k : k + KB] @ w[k : k + KB, n0 : n1], kLanes columns at a
// time (n1 - n0 a multiple of kLanes). With `ahead`, each 16 columns ask for the same columns of the next KB
// weight rows into L2 (`prefetcht2`): the KB rows are KB streams N floats apart, which the hardware
// prefetcher alone left at 16-19 ms for SmolLM2's one-row projections where asking ahead took
// 13.2-13.9 (4 rows: 19-25 -> 15.1-15.3; 8 rows: 27-29 -> 23-25; a standalone harness, 2 cores).
template <int MR, int KB>
inline void stream_group(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K,
                         int64_t N, int64_t k, int64_t n0, int64_t n1, bool ahead) {
  const float* __restrict wk = w + k * N;
  for (int64_t c = n0; c < n1; c += kLanes) {
    vf wv[KB];
    for (int j = 0; j < KB; ++j) wv[j] = load(wk + j * N + c);
    if (ahead) {
      for (int j = 0; j < KB; ++j) __builtin_prefetch(wk + (KB + j) * N + c, 0, 1);
    }
    for (int m = 0; m < MR; ++m) {
      const float* xm = x + m * K + k;
      vf a = load(y + m * N + c), b = vf{};
      for (int j = 0; j < KB; j += 2) a += xm[j] * wv[j];
      for (int j = 1; j < KB; j += 2) b += xm[j] * wv[j];
      store(y + m * N + c, a + b);
    }
  }
}

// Rows m0 .. m0 + rows (at most 4) of one group of KB weight rows; the first rows ask ahead.
template <int KB>
inline void stream_row_group(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t k,
                             int64_t m0, int64_t rows, int64_t n0, int64_t n1) {
  x += m0 * K;
  y += m0 * N;
  const bool ahead = m0 == 0;
  switch (rows) {
    case 1: return stream_group<1, KB>(x, w, y, K, N, k, n0, n1, ahead);
    case 2: return stream_group<2, KB>(x, w, y, K, N, k, n0, n1, ahead);
    case 3: return stream_group<3, KB>(x, w, y, K, N, k, n0, n1, ahead);
    default: return stream_group<4, KB>(x, w, y, K, N, k, n0, n1, ahead);
  }
}

// y[0 : MR, n0 : n1] += x[0 : MR, k : k + KB] @ w[k : k + KB, n0 : n1] (n1 - n0 a multiple of kLanes),
// kLanes NV columns at a time summed in registers over the KB weight rows, then kLanes at a time: each
// weight vector is loaded once for all MR rows, and each partial sum read and written once per KB
// weight rows. Each block asks for its columns of the next KB weight rows into L2.
template <int MR, int NV, int KB>
inline void stream_block(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K,
                         int64_t N, int64_t k, int64_t n0, int64_t n1, bool ahead) {
  const float* __restrict wk = w + k * N;
  const float* __restrict xk = x + k;
  int64_t c = n0;
  for (; c + kLanes * NV <= n1; c += kLanes * NV) {
    vf acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = load(y + m * N + c + kLanes * v);
#pragma GCC unroll 16
    for (int j = 0; j < KB; ++j) {
      vf wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load(wk + j * N + c + kLanes * v);
      if (ahead) {
        for (int v = 0; v < NV; ++v) __builtin_prefetch(wk + (KB + j) * N + c + kLanes * v, 0, 1);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const vf xv = vf{} + xk[m * K + j];
        for (int v = 0; v < NV; ++v) acc[m][v] += xv * wv[v];
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) store(y + m * N + c + kLanes * v, acc[m][v]);
  }
  if (c < n1) stream_block<MR, 1, KB>(x, w, y, K, N, k, c, n1, ahead);
}

// Five to eight rows (as many accumulators as leave room for the weights in the vector registers:
// 32 with AVX-512, 16 with AVX2).
template <int KB>
inline void stream_rows_block(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t k,
                              int64_t n1) {
  constexpr bool kWide = kLanes == 16;
  switch (M) {
    case 5: return stream_block<5, kWide ? 4 : 2, KB>(x, w, y, K, N, k, 0, n1, true);
    case 6: return stream_block<6, kWide ? 4 : 2, KB>(x, w, y, K, N, k, 0, n1, true);
    case 7: return stream_block<7, kWide ? 3 : 1, KB>(x, w, y, K, N, k, 0, n1, true);
    default: return stream_block<8, kWide ? 3 : 1, KB>(x, w, y, K, N, k, 0, n1, true);
  }
}

// y[M, N] += x[:, k0 : k1] @ w[k0 : k1, :], reading those weight rows in order; each group of
// kStreamK weight rows serves up to four rows of x one 16-column vector at a time, or five to eight
// rows in register blocks (`stream_block`). 5-8 rows used to take the group twice, four rows at a
// time, each pass reading and writing every partial sum: 8-row projections of SmolLM2's 30 layers
// took 26.1-34.3 ms that way against 22.9-28.6 in blocks (`scripts/matmul_harness.cc`, five rounds
// in turns); whole decode steps of 8 sequences 43.2-46.4 ms against 37.5-39.0 in three rounds, and
// mixed in five later ones (docs/benchmarks/cpu_step_profile.md).
inline void stream_kn(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t k0,
                      int64_t k1) {
  const int64_t n16 = N / kLanes * kLanes;
  int64_t k = k0;
  if (M > 4 && M <= 8) {
    for (; k + kStreamK <= k1; k += kStreamK) stream_rows_block<kStreamK>(x, w, y, M, K, N, k, n16);
  }
  for (; k + kStreamK <= k1; k += kStreamK) {
    for (int64_t m = 0; m < M; m += 4) stream_row_group<kStreamK>(x, w, y, K, N, k, m, std::min<int64_t>(4, M - m), 0, n16);
  }
  for (; k < k1; ++k) {
    for (int64_t m = 0; m < M; m += 4) stream_row_group<1>(x, w, y, K, N, k, m, std::min<int64_t>(4, M - m), 0, n16);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n16; n < N; ++n) {
      float s = y[m * N + n];
      for (k = k0; k < k1; ++k) s += x[m * K + k] * w[k * N + n];
      y[m * N + n] = s;
    }
  }
}

// A float32 product. w [N, K], and more than `stream_rows` rows of w [K, N]: columns [item * 64,
// (item + 1) * 64) of every row per work item, written to y. At most `stream_rows` rows of w [K, N]:
// weight rows [item * chunk_k(), (item + 1) * chunk_k()) per item, summed into the partial
// `partials[item]` [M, N]; the caller then adds them up in order (`sum_partials`).
struct F32Problem {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N;
  bool nk;              // w is [N, K] (else [K, N])
  int64_t stream_rows;  // the most rows that stream (w [K, N] only)
  float* partials = nullptr;
  int64_t columns = kColumnsPerItem;  // output columns per item when not streaming (`columns_per_item`)

  // w [N, K] read column by column (few rows, K a multiple of kLanes, AVX-512 or AVX2).
  bool in_order() const {
#if defined(__AVX512F__) || defined(FASTGEN_AVX2)
    return nk && M <= kDirectRows && K % kLanes == 0;
#else
    return false;
#endif
  }

  bool streams() const { return !nk && M <= stream_rows; }

  // Weight rows per streamed item: whole groups of kStreamK, at most kStreamChunks items.
  int64_t chunk_k() const {
    const int64_t groups = (K + kStreamK - 1) / kStreamK;
    return std::max<int64_t>(1, (groups + kStreamChunks - 1) / kStreamChunks) * kStreamK;
  }

  int64_t num_items() const {
    if (streams()) return (K + chunk_k() - 1) / chunk_k();
    return (N + columns - 1) / columns;
  }

  // `next`: the item this thread runs after this one (-1: none; see `run_items`).
  void run(int64_t item, int64_t next = -1) const {
    if (streams()) {
      float* acc = partials + item * M * N;
      std::fill(acc, acc + M * N, 0.0f);
      const int64_t k0 = item * chunk_k();
      return stream_kn(x, w, acc, M, K, N, k0, std::min(K, k0 + chunk_k()));
    }
    const int64_t n0 = item * columns, n1 = std::min(N, n0 + columns);
#if defined(__AVX512F__) || defined(FASTGEN_AVX2)
    if (in_order()) {
      return columns_in_order<F32Lanes>(x, w, nullptr, y, M, K, N, n0, n1,
                                        [&](int64_t n) { column(x, F32Columns{w}, y, M, K, N, n); });
    }
#endif
    if (nk) return dot_columns(x, F32Columns{w}, y, M, K, N, n0, n1);
    kn_columns(x, w, y, M, K, N, n0, n1, next >= 0 ? next * columns : -1);
  }

  // y = partials[0] + partials[1] + ... (of `items`), in that order, once every item is done.
  void sum_partials(int64_t items) const {
    const int64_t size = M * N;
    if (items == 0) return std::fill(y, y + size, 0.0f);
    std::copy(partials, partials + size, y);
    for (int64_t t = 1; t < items; ++t) {
      const float* p = partials + t * size;
      for (int64_t i = 0; i < size; ++i) y[i] += p[i];
    }
  }
};

// ------------------------------------------------ float32, weights packed [N / kStrip, K, kStrip]

// A [K, N] weight as the CPU kernels read it best: its columns cut into strips of kStrip (the
// [K, N] tiles' width), each strip's K rows stored one after another, so a strip is one contiguous
// run of K * kStrip floats; the last strip's missing columns are zeros. `fastgen_jax.weight_layout`
// packs the layer stacks once at load time. In place, a strip's K rows of 64 bytes lie N floats apart
// (a page apiece at N = 3072): the tiles either waited on those scattered reads or copied the strip
// first (`rows_kn`). Packed, every row count goes by the same tiles of up to six rows, reading each
// strip in order; so a row's result does not depend on the other rows of the slab.
// `scripts/matmul_harness.cc`, SmolLM2's 30 layers from memory on a 2-core AVX2 EPYC: see
// docs/benchmarks/cpu_step_profile.md.
struct PackedProblem {
  const float* x;
  const float* w;  // [strips, K, kStrip]
  float* y;        // [M, N]
  int64_t M, K, N;
  int64_t blocks = 1;  // row blocks per strip (`split_rows`): a work item is (strip, row block)

  int64_t strips() const { return (N + kStrip - 1) / kStrip; }
  int64_t items() const { return strips() * blocks; }
  int64_t block_rows() const { return (M + blocks - 1) / blocks; }

  // Row blocks per strip, so that the threads' shares come out even: each strip's rows split into
  // blocks of whole 6-row tiles (at least 16 rows: fewer run as two tiles in turns, which at 24 rows
  // in two blocks took 1.05x one block's time), the count that minimises the rows the busiest worker
  // multiplies, at least enough for about four items a worker (e.g. a 576-wide projection's 36
  // strips on a 32-core machine). On 2 cores a 576-wide projection's 9 strips left one thread 5 and
  // the other 4 (the call 5/4.5 of an even share); 2 blocks a strip give each 9. A row's result is
  // the same bits in any block.
  void split_rows(int64_t workers) {
    workers = std::max<int64_t>(1, workers);
    const int64_t n = strips(), most = std::max<int64_t>(1, M / 16);
    const auto tiled = [&](int64_t b) { return ((M + b - 1) / b + 5) / 6 * 6; };  // a block's rows
    const auto busiest = [&](int64_t b) { return ((n * b + workers - 1) / workers) * tiled(b); };
    int64_t best = std::clamp<int64_t>((4 * workers + n - 1) / std::max<int64_t>(1, n), 1, most);
    for (int64_t b = best + 1; b <= std::min<int64_t>(most, best + workers); ++b) {
      if (busiest(b) < busiest(best)) best = b;
    }
    const int64_t rows = tiled(best);
    blocks = rows ? (M + rows - 1) / rows : 1;
  }

  // Item `item`: one strip's block of rows. `next`: the item this thread runs after this one (-1:
  // none), whose strip is asked for while this one's later row tiles run from cache (the first tile
  // waits on this strip's own reads).
  void run(int64_t item, int64_t next = -1) const {
    const int64_t strip = item / blocks, r0 = item % blocks * block_rows(), r1 = std::min(M, r0 + block_rows());
    const int64_t next_strip = next >= 0 && next / blocks != strip ? next / blocks : -1;
    const float* sw = w + strip * K * kStrip;
    // Three row tiles or more: their later tiles ask for the whole next strip. Fewer rows read the
    // weights about as fast as they multiply them, and the hardware prefetcher follows each strip's
    // run; it is only asked for the next strip's first lines (asking for all of it measured no
    // faster at 1-8 rows in the harness, 16-32 rows 17-20% faster with it).
    const bool ask = next_strip >= 0 && r1 - r0 > kPairRows;
    if (next_strip >= 0 && !ask) {
      for (int64_t i = 0; i < 8 && i * 16 < K * kStrip; ++i) __builtin_prefetch(w + next_strip * K * kStrip + i * 16, 0, 1);
    }
    const float* ahead = ask ? w + next_strip * K * kStrip : nullptr;
    const int64_t n = strip * kStrip, width = std::min(kStrip, N - n);
    if (width == kStrip) return tiles(sw, y + r0 * N + n, N, r0, r1, ahead);
    // a last strip narrower than kStrip: its tiles write a [rows, kStrip] scratch, the columns kept
    thread_local std::vector<float> scratch;
    scratch.resize((r1 - r0) * kStrip);
    tiles(sw, scratch.data(), kStrip, r0, r1, ahead);
    for (int64_t m = r0; m < r1; ++m) std::copy_n(scratch.data() + (m - r0) * kStrip, width, y + m * N + n);
  }

  // acc[m] += x[m, k] * the strip's weight row k, for the tile's MR rows
  template <int MR>
  static inline void multiply_row(vf (&acc)[MR][kStripVectors], const float* __restrict sw,
                                  const float* __restrict xr, int64_t K, int64_t k) {
    vf wv[kStripVectors];
    for (int j = 0; j < kStripVectors; ++j) {
      wv[j] = load(sw + k * kStrip + kLanes * j);
      in_register(wv[j]);  // else GCC folds the load into every row's FMA
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const vf xv = vf{} + xr[m * K + k];
      for (int j = 0; j < kStripVectors; ++j) acc[m][j] += xv * wv[j];
    }
  }

  // How many weight rows ahead a strip's first tile asks for its own strip, where the
  // later tiles do not ask for the next one (12 rows or fewer). The hardware prefetcher alone left
  // the multiplies and the reads in turn: in the harness 4 rows took 17.6 ms against 14.8 for one,
  // 8 rows 26.1; asking 4-16 lines ahead, 13.8-15.2 and 17.9-19.5 (best of six rounds each).
  static constexpr int64_t kSelfAhead = 8;

  // Every cache line of one strip row (kStrip floats: four lines with AVX-512, one with AVX2) asked
  // for, at locality kLocality. Always inlined: GCC deems a function holding only prefetches pure.
  template <int kLocality>
  [[gnu::always_inline]] static inline void ask_row(const float* row) {
    for (int64_t line = 0; line < kStrip / 16; ++line) __builtin_prefetch(row + 16 * line, 0, kLocality);
  }

  // o[0 : MR, 0 : kStrip] (ldo floats a row) = xr[0 : MR, :] @ the strip. With `ask` (not null), the
  // weight rows [0, ask_rows) of the next strip (0 < ask_rows <= K) are asked for into L2, spread
  // evenly over this strip's K rows (a fixed-point position, so the loop has no branch for it);
  // `self_ahead`: the strip's own rows asked for kSelfAhead rows ahead, every line of them (AVX-512's
  // rows are four lines: asking for the first only left one row's projections at 1.12-1.13x the
  // time). Each case is one loop with nothing nested in it: with the asking between runs of rows (an
  // inner loop), GCC kept AVX-512's 24 sums on the stack, every FMA reading and writing memory, and
  // 16-256 rows took 2.3-2.6x as long as before that change (`scripts/matmul_ab.cc` on a Zen 4 EPYC);
  // this form matches that earlier time there (0.95-1.10) and, built for AVX2, times 0.88-1.02 of the
  // run loop.
  template <int MR>
  void tile(const float* __restrict sw, const float* __restrict xr, float* __restrict o, int64_t ldo,
            const float* __restrict ask, int64_t ask_rows, bool self_ahead) const {
    vf acc[MR][kStripVectors];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < kStripVectors; ++j) acc[m][j] = vf{};
    if (ask != nullptr) {
      const uint64_t step = (static_cast<uint64_t>(ask_rows) << 32) / K;
      uint64_t position = 0;
      for (int64_t k = 0; k < K; ++k, position += step) {
        ask_row<1>(ask + (position >> 32) * kStrip);
        multiply_row<MR>(acc, sw, xr, K, k);
      }
    } else if (self_ahead) {
      for (int64_t k = 0; k < K; ++k) {
        ask_row<0>(sw + std::min(k + kSelfAhead, K - 1) * kStrip);
        multiply_row<MR>(acc, sw, xr, K, k);
      }
    } else {
      for (int64_t k = 0; k < K; ++k) multiply_row<MR>(acc, sw, xr, K, k);
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < kStripVectors; ++j) store(o + m * ldo + kLanes * j, acc[m][j]);
  }

  // Two tiles' worth of rows (7-12) in one pass over the strip. Run one after the other, the first
  // tile waited on the strip's reads and the second then multiplied it from cache while memory idled:
  // 8 rows took 1.3-1.6x one row's time in the harness. Here the tiles take turns every kPairChunk
  // weight rows, their sums kept in L1 between turns, and the first asks for its rows kPairAhead
  // ahead, every line of them (8 rows 18.3-23.2 ms against 20.4-24.4 on an AVX2 Zen 3, six rounds in
  // turns). Each row still sums its products in k order: the same bits as one tile. AVX-512's rows are
  // four lines: asking for all four, 16 rows ahead, instead of the first, 32 ahead, took 0.92-0.95 of
  // the time at 7-9 rows and 0.86 at 10 (`scripts/matmul_ab.cc` on a Zen 4, medians of 11 passes).
  static constexpr int64_t kPairChunk = 8, kPairAhead = 16;

  // The most rows `tile_pair` takes: more rows run as at least three tiles whose later ones ask for
  // the next strip. On a Zen 4 (`scripts/matmul_ab.cc`, the 30 layers' projections, medians of 9-11
  // passes in turns) three tiles took 0.84-0.99 of the pair's time at 7-10 rows built for AVX2 and
  // 0.76-0.87 at 11-12; with AVX-512 the pair stays ahead (three tiles 1.10-1.19x its time at 7-9
  // rows, 1.10 at 11, even at 12).
  static constexpr int64_t kPairRows = kLanes == 16 ? 12 : 6;

  // rows [0, MR) of xr over weight rows [k0, k0 + kc), their sums loaded from and stored to `acc`
  template <int MR>
  static void chunk(const float* __restrict sw, const float* __restrict xr, int64_t K, float* __restrict acc,
                    int64_t k0, int64_t kc, int64_t ahead) {
    vf a[MR][kStripVectors];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < kStripVectors; ++j) a[m][j] = load(acc + m * kStrip + kLanes * j);
    for (int64_t k = k0; k < k0 + kc; ++k) {
      if (ahead) ask_row<0>(sw + std::min(k + ahead, K - 1) * kStrip);
      multiply_row<MR>(a, sw, xr, K, k);
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < kStripVectors; ++j) store(acc + m * kStrip + kLanes * j, a[m][j]);
  }

  // o[0 : MA + MB, 0 : kStrip] (ldo floats a row) = xr[0 : MA + MB, :] @ the strip
  template <int MA, int MB>
  void tile_pair(const float* __restrict sw, const float* __restrict xr, float* __restrict o, int64_t ldo) const {
    alignas(64) float acc[(MA + MB) * kStrip] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kPairChunk) {
      const int64_t kc = std::min(kPairChunk, K - k0);
      chunk<MA>(sw, xr, K, acc, k0, kc, kPairAhead);
      chunk<MB>(sw, xr + MA * K, K, acc + MA * kStrip, k0, kc, 0);
    }
    for (int m = 0; m < MA + MB; ++m) std::copy_n(acc + m * kStrip, kStrip, o + m * ldo);
  }

  // Rows [r0, r1) into out (row r0 first, ldo floats a row): the fewest tiles of at most six rows
  // (at least three past kPairRows), their sizes within one of each other. The tiles after the first
  // share the asking for `ahead` (the next strip, K * kStrip floats), spread evenly over their weight
  // rows; a lone tile asks for all of it.
  void tiles(const float* sw, float* out, int64_t ldo, int64_t r0, int64_t r1, const float* ahead) const {
    const int64_t rows_all = r1 - r0;
    const int64_t count = rows_all > kPairRows ? std::max<int64_t>(3, (rows_all + 5) / 6) : (rows_all + 5) / 6;
    const int64_t base = count ? rows_all / count : 0, larger = count ? rows_all % count : 0;
    if constexpr (kPairRows > 6) {  // (AVX2 builds never pair: count is 1 or at least 3 there)
      if (count == 2) {  // 7-kPairRows rows: the two tiles in turns (`tile_pair`), the larger first
        const float* xr = x + r0 * K;
        switch (rows_all) {
          case 7: return tile_pair<4, 3>(sw, xr, out, ldo);
          case 8: return tile_pair<4, 4>(sw, xr, out, ldo);
          case 9: return tile_pair<5, 4>(sw, xr, out, ldo);
          case 10: return tile_pair<5, 5>(sw, xr, out, ldo);
          case 11: return tile_pair<6, 5>(sw, xr, out, ldo);
          default: return tile_pair<6, 6>(sw, xr, out, ldo);
        }
      }
    }
    const int64_t askers = std::max<int64_t>(1, count - 1), share = (K + askers - 1) / askers;
    for (int64_t t = 0, m = 0; t < count; ++t) {
      const int64_t rows = base + (t < larger);
      const int64_t i = count == 1 ? 0 : t - 1;
      const int64_t first = std::min(K, i * share);
      const int64_t take = ahead == nullptr || (t == 0 && count > 1) ? 0 : std::min(K, first + share) - first;
      const float* ask = take > 0 ? ahead + first * kStrip : nullptr;
      const float* xr = x + (r0 + m) * K;
      float* o = out + m * ldo;
      const bool self_ahead = t == 0 && !ahead;
      switch (rows) {
        case 6: tile<6>(sw, xr, o, ldo, ask, take, self_ahead); break;
        case 5: tile<5>(sw, xr, o, ldo, ask, take, self_ahead); break;
        case 4: tile<4>(sw, xr, o, ldo, ask, take, self_ahead); break;
        case 3: tile<3>(sw, xr, o, ldo, ask, take, self_ahead); break;
        case 2: tile<2>(sw, xr, o, ldo, ask, take, self_ahead); break;
        default: tile<1>(sw, xr, o, ldo, ask, take, self_ahead); break;
      }
      m += rows;
    }
  }
};

#if defined(__AVX512BF16__)
constexpr bool kBf16Products = true;

inline __m512bh as_bf16(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// 32 int8 weights as bfloat16 (exact).
inline __m512bh widen_bf16(const int8_t* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);  // lo's 16 values first
}

inline __m512bh load_bf16(const uint16_t* p) { return as_bf16(_mm512_loadu_si512(p)); }

// Column j's 32 weights at k, widened from int8 in registers (few rows: the weights' bytes bound the step).
struct FromInt8 {
  const int8_t* w;
  int64_t K;
  __m512bh operator()(int j, int64_t k) const { return widen_bf16(w + j * K + k); }
};

// ... or read from a bfloat16 copy in cache (more rows: widened once, read by every row tile).
struct FromBuffer {
  const uint16_t* w;
  int64_t K;
  __m512bh operator()(int j, int64_t k) const { return load_bf16(w + j * K + k); }
};

// y[m0 : m0 + MR, n : n + NC].
template <int MR, int NC, class Weights>
inline void tile_bf16(const uint16_t* __restrict x, Weights w, const float* __restrict scale,
                      float* __restrict y, int64_t K, int64_t N, int64_t m0, int64_t n) {
  __m512 acc[MR][NC];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NC; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[NC];
    for (int j = 0; j < NC; ++j) wv[j] = w(j, k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      __m512bh xv = load_bf16(x + (m0 + m) * K + k);
      in_register(xv);
      for (int j = 0; j < NC; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    if constexpr (NC == 4) {
      store_sums4(acc[m], scale + n, y + (m0 + m) * N + n);
    } else {
      for (int j = 0; j < NC; ++j) y[(m0 + m) * N + n + j] = _mm512_reduce_add_ps(acc[m][j]) * scale[n + j];
    }
  }
}

// Rows [m0, m1) of columns [n, n + NC): tiles of six rows, then one tile of the rest.
template <int NC, class Weights>
inline void rows_bf16(const uint16_t* x, Weights w, const float* scale, float* y, int64_t K, int64_t N,
                      int64_t m0, int64_t m1, int64_t n) {
  int64_t m = m0;
  for (; m + 6 <= m1; m += 6) tile_bf16<6, NC>(x, w, scale, y, K, N, m, n);
  switch (m1 - m) {
    case 5: return tile_bf16<5, NC>(x, w, scale, y, K, N, m, n);
    case 4: return tile_bf16<4, NC>(x, w, scale, y, K, N, m, n);
    case 3: return tile_bf16<3, NC>(x, w, scale, y, K, N, m, n);
    case 2: return tile_bf16<2, NC>(x, w, scale, y, K, N, m, n);
    case 1: return tile_bf16<1, NC>(x, w, scale, y, K, N, m, n);
    default: return;
  }
}


// int8 weights widened to bfloat16 in registers, 32 per vector, multiplied in pairs into float32
// lanes (`vdpbf16ps`): the in-order path's int8 lanes (see `group_in_order`).
struct Bf16Lanes {
  using X = uint16_t;  // bfloat16 rows
  using W = int8_t;
  static constexpr int64_t kWidth = 32;
  static __m512bh weights(const int8_t* p) { return widen_bf16(p); }
  static __m512 madd(__m512 acc, const uint16_t* x, __m512bh w) { return _mm512_dpbf16_ps(acc, load_bf16(x), w); }
};
#else
constexpr bool kBf16Products = false;
#endif

struct Problem {
  const uint16_t* xb;  // bfloat16 rows (the bf16 path)
  const float* x;      // the same rows as float32 (the float32 path)
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t M, K, N;
  bool bf16;  // kBf16Products and K % 32 == 0
  int64_t columns = kColumnsPerItem;  // output columns per work item (`columns_per_item`)

  int64_t num_items() const { return (N + columns - 1) / columns; }

  // Columns [item * columns, (item + 1) * columns) of every row.
  void run(int64_t item) const {
    const int64_t n0 = item * columns, n1 = std::min(N, n0 + columns);
#if defined(__AVX512BF16__)
    if (bf16) return run_bf16(n0, n1);
#endif
    dot_columns(x, Int8Columns{q, scale}, y, M, K, N, n0, n1);
  }

#if defined(__AVX512BF16__)
  void run_bf16(int64_t n0, int64_t n1) const {
    if (M <= kDirectRows) return direct_bf16(n0, n1);
    // The item's columns are contiguous in q: widen them once into this thread's buffer.
    thread_local std::vector<uint16_t> buffer;
    buffer.resize((n1 - n0) * K);
    const int8_t* src = q + n0 * K;
    for (int64_t i = 0; i < (n1 - n0) * K; i += 32) {
      if (i % 64 == 0) __builtin_prefetch(src + i + kAheadBytes, 0, 0);
      _mm512_storeu_si512(buffer.data() + i, reinterpret_cast<__m512i>(widen_bf16(src + i)));
    }
    columns_bf16(n0, n1, [&](int64_t n) { return FromBuffer{buffer.data() + (n - n0) * K, K}; });
  }

  // Up to kDirectRows rows: groups of four columns read in order, then the rest one at a time.
  void direct_bf16(int64_t n0, int64_t n1) const {
    columns_in_order<Bf16Lanes>(xb, q, scale, y, M, K, N, n0, n1, [&](int64_t n) {
      rows_bf16<1>(xb, FromInt8{q + n * K, K}, scale, y, K, N, 0, M, n);
    });
  }

  // Columns [n0, n1) of every row, four at a time, then one at a time; weights(n) reads from column
  // n on.
  template <class Weights>
  void columns_bf16(int64_t n0, int64_t n1, Weights weights) const {
    int64_t n = n0;
    for (; n + kGroup <= n1; n += kGroup) rows_bf16<kGroup>(xb, weights(n), scale, y, K, N, 0, M, n);
    for (; n < n1; ++n) rows_bf16<1>(xb, weights(n), scale, y, K, N, 0, M, n);
  }
#endif
};

}  // namespace fastgen_matmul

#ifndef FASTGEN_NO_FFI
namespace {

namespace ffi = xla::ffi;
using fastgen_matmul::F32Problem;
using fastgen_matmul::Problem;
using fastgen_matmul::kStrip;
using fastgen_matmul::PackedProblem;

// Which matrix of a stack [L, ...] to read: 0 without a stack, else layer[0], checked to be in [0, L).
ffi::Error stack_index(const std::string& kernel, bool stacked, ffi::Buffer<ffi::S32>& layer, int64_t depth,
                       int64_t* index) {
  *index = 0;
  if (!stacked) return ffi::Error::Success();
  if (layer.element_count() < 1) return ffi::Error::InvalidArgument(kernel + ": no layer index");
  *index = layer.typed_data()[0];
  if (*index < 0 || *index >= depth) return ffi::Error::InvalidArgument(kernel + ": layer out of range");
  return ffi::Error::Success();
}

// How many leading rows of x [M, ...] to compute: rows[0] clamped to [0, M] (M without a value). The
// rows below are padding of the step's slab: their results are zeros, at no cost.
int64_t real_rows(ffi::Buffer<ffi::S32>& rows, int64_t M) {
  if (rows.element_count() < 1) return M;
  return std::clamp<int64_t>(rows.typed_data()[0], 0, M);
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S8> q,
                ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows_in,
                ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || (qd.size() != 2 && qd.size() != 3) || sd.size() + 1 != qd.size()) {
    return ffi::Error::InvalidArgument("int8 matmul: x [M, K], q [(L,) N, K], scale [(L,) N], y [M, N]");
  }
  const size_t r = qd.size() - 2;
  const int64_t rows_given = xd[0], K = xd[1], N = qd[r];
  if (qd[r + 1] != K || sd[r] != N || yd[0] != rows_given || yd[1] != N || (r && sd[0] != qd[0])) {
    return ffi::Error::InvalidArgument("int8 matmul: shapes do not match");
  }
  int64_t index;
  if (auto error = stack_index("int8 matmul", r, layer, qd[0], &index); !error.success()) return error;
  const int64_t M = real_rows(rows_in, rows_given);
  std::fill(y->typed_data() + M * N, y->typed_data() + rows_given * N, 0.0f);
  std::vector<float> rows;  // x as float32, for the float32 path
  const uint16_t* xb = x.typed_data();
  const bool bf16 = fastgen_matmul::kBf16Products && K % 32 == 0;
  if (!bf16) {  // bfloat16 bits are a float32's upper half
    rows.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) {
      const uint32_t bits = static_cast<uint32_t>(xb[i]) << 16;
      std::memcpy(&rows[i], &bits, 4);
    }
  }
  const Problem problem{xb, rows.data(), q.typed_data() + index * N * K, scale.typed_data() + index * N,
                        y->typed_data(), M, K, N, bf16,
                        fastgen_matmul::columns_per_item(M, N, pool.num_threads() + 1, bf16)};
  fastgen_kernels::run_items(pool, M ? problem.num_items() : 0, [problem](int64_t i) { problem.run(i); });
  return ffi::Error::Success();
}

// x [M, K] @ w -> y [M, N], w [K, N] or (w_nk) [N, K]; or w a stack [L, ...] of either, of which
// layer `layer` is read in place.
ffi::Error F32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows_in, bool w_nk, int64_t stream_rows,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || (wd.size() != 2 && wd.size() != 3) || yd.size() != 2) {
    return ffi::Error::InvalidArgument("float32 matmul: x [M, K], w [(L,) K, N] or [(L,) N, K], y [M, N]");
  }
  const size_t r = wd.size() - 2;
  const int64_t rows_given = xd[0], K = xd[1], N = w_nk ? wd[r] : wd[r + 1];
  if ((w_nk ? wd[r + 1] : wd[r]) != K || yd[0] != rows_given || yd[1] != N) {
    return ffi::Error::InvalidArgument("float32 matmul: shapes do not match");
  }
  int64_t index;
  if (auto error = stack_index("float32 matmul", r, layer, wd[0], &index); !error.success()) return error;
  const int64_t M = real_rows(rows_in, rows_given);
  std::fill(y->typed_data() + M * N, y->typed_data() + rows_given * N, 0.0f);
  F32Problem problem{x.typed_data(), w.typed_data() + index * K * N, y->typed_data(), M, K, N, w_nk, stream_rows};
  problem.columns = fastgen_matmul::columns_per_item(M, N, pool.num_threads() + 1, problem.in_order());
  const int64_t items = M ? problem.num_items() : 0;
  thread_local std::vector<float> partials;  // this (XLA's calling) thread's, kept between calls
  if (problem.streams()) {
    partials.resize(items * M * N);
    problem.partials = partials.data();
  }
  fastgen_kernels::run_items(pool, items, [problem](int64_t i, int64_t next) { problem.run(i, next); });
  if (problem.streams()) problem.sum_partials(items);
  return ffi::Error::Success();
}

// x [M, K] @ w -> y [M, N], w packed [(L,) ceil(N / kStrip), K, kStrip] (`PackedProblem`), layer
// `layer` of a stack read in place.
ffi::Error F32PackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows_in, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || (wd.size() != 3 && wd.size() != 4) || yd.size() != 2) {
    return ffi::Error::InvalidArgument("packed float32 matmul: x [M, K], w [(L,) strips, K, width], y [M, N]");
  }
  const size_t r = wd.size() - 3;
  const int64_t rows_given = xd[0], K = xd[1], N = yd[1];
  if (wd[r + 2] != kStrip) {
    return ffi::Error::InvalidArgument("packed float32 matmul: strips of " + std::to_string(wd[r + 2]) +
                                       " columns, this build's are " + std::to_string(kStrip));
  }
  if (wd[r + 1] != K || yd[0] != rows_given || wd[r] != (N + kStrip - 1) / kStrip) {
    return ffi::Error::InvalidArgument("packed float32 matmul: shapes do not match");
  }
  int64_t index;
  if (auto error = stack_index("packed float32 matmul", r, layer, wd[0], &index); !error.success()) return error;
  const int64_t M = real_rows(rows_in, rows_given);
  std::fill(y->typed_data() + M * N, y->typed_data() + rows_given * N, 0.0f);
  PackedProblem problem{x.typed_data(), w.typed_data() + index * wd[r] * K * kStrip, y->typed_data(), M, K, N};
  problem.split_rows(std::min<int64_t>(pool.num_threads() + 1, fastgen_kernels::usable_cores()));
  fastgen_kernels::run_items(pool, M && K ? problem.items() : 0,
                             [problem](int64_t i, int64_t next) { problem.run(i, next); });
  if (K == 0) std::fill(y->typed_data(), y->typed_data() + M * N, 0.0f);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastgenInt8Matmul, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q [N, K] or [L, N, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [N] or [L, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer: i32[1], the stack's index
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: i32[1], x's real rows
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastgenF32Matmul, F32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [(L,) K, N] or [(L,) N, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer: i32[1], the stack's index
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: i32[1], x's real rows
                                  .Attr<bool>("w_nk")
                                  .Attr<int64_t>("stream_rows")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastgenF32PackedMatmul, F32PackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [(L,) strips, K, kStrip]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer: i32[1], the stack's index
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: i32[1], x's real rows
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]

// The packed layout's strip width in this build (float32 columns): `cpu_kernels.build` asks it.
extern "C" int64_t fastgen_packed_strip() { return fastgen_matmul::kStrip; }
#endif
