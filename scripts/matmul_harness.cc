// The CPU matmul kernels (cpu_kernels/matmul.cc) outside XLA, on SmolLM2-135M's weights' shapes, timed
// by wall clock on two threads (this one and one spinning helper, as XLA's pool lends the kernels):
// how fast few-row products read the weights, beside a plain sum of the same bytes.
//
//   g++ -O3 -march=native -std=c++17 -ffast-math -fopenmp-simd -pthread scripts/matmul_harness.cc \
//       -o /tmp/matmul_harness && /tmp/matmul_harness
//
// Another version of the kernels (e.g. `git show REV:cpu_kernels/matmul.cc > /tmp/old.cc`) builds with
// -DMATMUL_CC='"/tmp/old.cc"' -Icpu_kernels (for its headers), so two versions can be timed in turns.
// (Two versions timed apart compare the machine's spells as much as the code: scripts/matmul_ab.cc
// times both in one process, their passes in turns.)
// Cases, each best of 20 passes:
// - int8 M: the 30 layers' int8 projections ([N, K]: q/k/v 960 x 576, o 576 x 576, gate/up 3072 x 576,
//   down 576 x 1536) and the 49152 x 576 int8 LM head, at M rows (the int8 kernel);
// - f32 M: the 30 layers' float32 projections ([K, N], M rows, streamed up to 8 rows);
// - f32 head M: the float32 LM head ([N, K] = 49152 x 576);
// - sum: a plain vectorised sum over the int8 case's bytes, in 64 KiB items (the read ceiling).
// Prints ms and GB/s (weight bytes over time) per case. Arguments, if any, keep only the packed case at
// those row counts (e.g. `/tmp/matmul_harness 6 8 12`, quicker for versions timed in turns).
#define FASTGEN_NO_FFI
#ifndef MATMUL_CC
#define MATMUL_CC "../cpu_kernels/matmul.cc"
#endif
#include MATMUL_CC

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "harness_common.h"

using namespace fastgen_matmul;
using harness::Pool;

namespace {

// The int8 problem's items: 64 columns each in older versions, `columns_per_item` where it exists.
template <class P>
auto set_columns(P& p, int) -> decltype(p.columns, void()) {
  p.columns = columns_per_item(p.M, p.N, 2, p.bf16);
}
template <class P>
void set_columns(P&, long) {}

template <class P>
auto set_f32_columns(P& p, int) -> decltype(p.in_order(), void()) {
  p.columns = columns_per_item(p.M, p.N, 2, p.in_order());
}
template <class P>
void set_f32_columns(P&, long) {}

// p.run(i, next) where the kernels take the next item (this tree), else p.run(i) (older versions).
template <class P>
auto run_f32(const P& p, int64_t i, int64_t next, int) -> decltype(p.run(i, next), void()) {
  p.run(i, next);
}
template <class P>
void run_f32(const P& p, int64_t i, int64_t, long) {
  p.run(i);
}

template <class Weights>
int64_t f32_bytes_of(const Weights& f32) {
  int64_t bytes = 0;
  for (const auto& w : f32) bytes += w.size() * 4;
  return bytes;
}

template <class F>
double best_ms(F pass) {
  double best = 1e30;
  for (int rep = 0; rep < 20; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    pass();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Rows split as the engine's call splits them on two workers, where this version can (`split_rows`).
template <class P>
auto split_rows(P& p, int) -> decltype(p.split_rows(2), void()) {
  p.split_rows(2);
}
template <class P>
void split_rows(P&, long) {}

template <class Weights, class Shapes>
auto run_packed(const Weights& f32, const Shapes& nk, const std::vector<float>& x, std::vector<float>& y, Pool& pool,
                const std::vector<int>& rows, int) -> decltype(PackedProblem{}, void()) {
  std::vector<std::vector<float>> packed;
  for (int64_t i = 0; i < static_cast<int64_t>(f32.size()); ++i) {
    packed.push_back(harness::pack_strips(f32[i], nk[i % 4][0], nk[i % 4][1], kStrip));
  }
  for (int M : rows) {
    const double ms = best_ms([&] {
      for (int64_t i = 0; i < static_cast<int64_t>(packed.size()); ++i) {
        PackedProblem p{x.data(), packed[i].data(), y.data(), M, nk[i % 4][1], nk[i % 4][0]};
        split_rows(p, 0);
        pool.run(p.items(), [&](int64_t it, int64_t next) { run_f32(p, it, next, 0); });
      }
    });
    std::printf("%-10s %3d rows  %8.2f ms  %6.1f GB/s\n", "f32 packed", M, ms, f32_bytes_of(f32) / ms / 1e6);
  }
}
template <class Weights, class Shapes>
void run_packed(const Weights&, const Shapes&, const std::vector<float>&, std::vector<float>&, Pool&,
                const std::vector<int>&, long) {}
// The float32 LM head ([vocab, hidden] = [N, K]) packed as its [K, N] (fastgen_jax.weight_layout), where
// this version has the packed kernel: beside "f32 head", its [N, K] dot form.
template <class Head>
auto head_packed(const Head& head32, int64_t vocab, int64_t hidden, const std::vector<float>& x,
                 std::vector<float>& y, Pool& pool, int) -> decltype(PackedProblem{}, void()) {
  std::vector<float> kn(hidden * vocab);
  for (int64_t n = 0; n < vocab; ++n)
    for (int64_t k = 0; k < hidden; ++k) kn[k * vocab + n] = head32[n * hidden + k];
  const std::vector<float> packed = harness::pack_strips(kn, vocab, hidden, kStrip);
  for (int M : {1, 4, 8, 16, 32}) {
    const double ms = best_ms([&] {
      PackedProblem p{x.data(), packed.data(), y.data(), M, hidden, vocab};
      split_rows(p, 0);
      pool.run(p.items(), [&](int64_t it, int64_t next) { run_f32(p, it, next, 0); });
    });
    std::printf("%-10s %3d rows  %8.2f ms  %6.1f GB/s\n", "f32 head packed", M, ms, vocab * hidden * 4 / ms / 1e6);
  }
}
template <class Head>
void head_packed(const Head&, int64_t, int64_t, const std::vector<float>&, std::vector<float>&, Pool&, long) {}

struct Int8Matrix {
  std::vector<int8_t> q;
  std::vector<float> scale;
  int64_t N, K;
};

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(0);
  const int64_t layers = 30, vocab = 49152, hidden = 576;
  const auto& nk = harness::kProjections;  // [N, K] per projection
  std::vector<Int8Matrix> int8;
  std::vector<std::vector<float>> f32;  // [K, N]
  for (int64_t l = 0; l < layers; ++l) {
    for (const auto& s : nk) {
      Int8Matrix m{std::vector<int8_t>(s[0] * s[1]), std::vector<float>(s[0], 0.01f), s[0], s[1]};
      for (auto& v : m.q) v = static_cast<int8_t>(rng());
      int8.push_back(std::move(m));
      std::vector<float> w(s[0] * s[1]);
      for (auto& v : w) v = static_cast<float>(rng() % 255) * 1e-3f;
      f32.push_back(std::move(w));
    }
  }
  Int8Matrix head{std::vector<int8_t>(vocab * hidden), std::vector<float>(vocab, 0.01f), vocab, hidden};
  for (auto& v : head.q) v = static_cast<int8_t>(rng());
  int8.push_back(std::move(head));
  std::vector<float> head32(vocab * hidden);
  for (auto& v : head32) v = static_cast<float>(rng() % 255) * 1e-3f;

  int64_t int8_bytes = 0, f32_bytes = 0;
  for (const auto& m : int8) int8_bytes += m.q.size();
  for (const auto& w : f32) f32_bytes += w.size() * 4;
  std::vector<uint16_t> xb(32 * 1536, 0x3f80);  // bfloat16 1.0
  std::vector<float> x(256 * 1536, 1.0f), y(256 * vocab), partials;
  Pool pool;

  std::vector<int> only;
  for (int a = 1; a < argc; ++a) only.push_back(std::atoi(argv[a]));
  if (!only.empty()) return run_packed(f32, nk, x, y, pool, only, 0), 0;
  auto report = [](const char* name, int rows, double ms, int64_t bytes) {
    std::printf("%-10s %3d rows  %8.2f ms  %6.1f GB/s\n", name, rows, ms, bytes / ms / 1e6);
  };
  report("sum", 0, best_ms([&] {
           for (const auto& m : int8) {
             const int64_t n = m.q.size(), items = (n + 65535) / 65536;
             std::atomic<int64_t> sink{0};
             pool.run(items, [&](int64_t i) {
               const int8_t* p = m.q.data() + i * 65536;
               const int64_t end = std::min<int64_t>(65536, n - i * 65536);
#if defined(__AVX512F__)
               __m512i acc = _mm512_setzero_si512();
               for (int64_t k = 0; k + 64 <= end; k += 64) acc = _mm512_add_epi8(acc, _mm512_loadu_si512(p + k));
               sink.fetch_add(_mm512_reduce_add_epi32(acc));
#else
               __m256i acc = _mm256_setzero_si256();
               for (int64_t k = 0; k + 32 <= end; k += 32) {
                 acc = _mm256_add_epi8(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k)));
               }
               sink.fetch_add(_mm256_extract_epi32(acc, 0) + _mm256_extract_epi32(acc, 7));
#endif
             });
           }
         }),
         int8_bytes);
  for (int M : {1, 4, 8, 16}) {
    report("int8", M, best_ms([&] {
             for (const auto& m : int8) {
               Problem p{xb.data(), x.data(), m.q.data(), m.scale.data(), y.data(), M, m.K, m.N, kBf16Products};
               set_columns(p, 0);
               pool.run(p.num_items(), [&](int64_t i) { p.run(i); });
             }
           }),
           int8_bytes);
  }
  for (int M : {1, 2, 4, 6, 8, 16, 32, 64, 256}) {
    report("f32", M, best_ms([&] {
             for (int64_t i = 0; i < static_cast<int64_t>(f32.size()); ++i) {
               const auto& s = nk[i % 4];
               F32Problem p{x.data(), f32[i].data(), y.data(), M, s[1], s[0], false, 8};
               harness::run_f32_problem(pool, p, partials, [&](int64_t it, int64_t next) { run_f32(p, it, next, 0); });
             }
           }),
           f32_bytes);
  }
  // the same weights packed [N / kStrip, K, kStrip] (fastgen_jax.weight_layout), where this version has it
  run_packed(f32, nk, x, y, pool, {1, 2, 4, 6, 8, 10, 12, 16, 32, 64, 256}, 0);
  for (int M : {1, 4, 8, 16, 32}) {
    report("f32 head", M, best_ms([&] {
             F32Problem p{x.data(), head32.data(), y.data(), M, hidden, vocab, true, 8};
             set_f32_columns(p, 0);
             pool.run(p.num_items(), [&](int64_t i) { p.run(i); });
           }),
           vocab * hidden * 4);
  }
  head_packed(head32, vocab, hidden, x, y, pool, 0);
}
