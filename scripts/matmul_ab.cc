// Two versions of the CPU matmul kernels (cpu_kernels/matmul.cc) timed in one process, their passes
// in turns: SmolLM2-135M's 30 layers' float32 projections at the given row counts, on two threads
// (this one and one spinning helper, as XLA's pool lends the kernels).
//
//   git show REV:cpu_kernels/matmul.cc > /tmp/old.cc
//   g++ -O3 -march=native -std=c++17 -ffast-math -fopenmp-simd -pthread -Icpu_kernels -DOLD_CC='"/tmp/old.cc"' scripts/matmul_ab.cc -o /tmp/matmul_ab
//   /tmp/matmul_ab 8 32 256            # packed weights ([strips, K, strip]; the model's, both builds)
//   /tmp/matmul_ab --kn --reps=31 1 8 256  # weights as stored ([K, N], F32Problem; up to 8 rows stream)
//   /tmp/matmul_ab --layouts 1 8 256   # this tree's packed path (new) against its [K, N] one (old)
//
// Rows up to kMaxRows (1024). With --layouts the two sum in different orders below 9 rows (the [K, N]
// path splits K there), so the check reports the largest difference relative to the output's scale.
// This machine's speed moves by 30-50% over minutes (its neighbours), so builds timed one after the
// other (`matmul_harness.cc` in turns) compare spells as much as code. Here each repetition times one
// pass of each version, in alternating order, and the report gives each version's best and median
// and the median of the repetitions' new/old ratios; a version against itself gave 0.96-1.05. Then
// it runs each projection once more through both and compares their outputs' bytes: "same bits", or
// how many projections differ. NEW_CC defaults to this tree's kernels.
#define FASTGEN_NO_FFI
#ifndef NEW_CC
#define NEW_CC "../cpu_kernels/matmul.cc"
#endif
#ifndef OLD_CC
#error "build with -DOLD_CC='\"/path/to/old/matmul.cc\"' (see the header)"
#endif
#define fastgen_matmul matmul_new
#include NEW_CC
#undef fastgen_matmul
#define fastgen_matmul matmul_old
#include OLD_CC
#undef fastgen_matmul

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "harness_common.h"

namespace {

using harness::Pool;
constexpr int kMaxRows = 1024;  // the most rows timed (the engine's default token budget is 512)

// One pass of one version (its Packed and F32 problems) over every projection at M rows into y.
template <class Packed, class F32>
void pass(Pool& pool, bool kn, int64_t M, const std::vector<std::vector<float>>& packed,
          const std::vector<std::vector<float>>& plain, const int64_t (&nk)[4][2], const float* x, float* y,
          size_t first = 0, size_t last = SIZE_MAX) {
  for (size_t i = first; i < std::min(last, packed.size()); ++i) {
    const int64_t N = nk[i % 4][0], K = nk[i % 4][1];
    if (kn) {
      F32 p{x, plain[i].data(), y, M, K, N, false, 8};
      thread_local std::vector<float> partials;
      harness::run_f32_problem(pool, p, partials, [&](int64_t it, int64_t next) { p.run(it, next); });
    } else {
      Packed p{x, packed[i].data(), y, M, K, N};
      p.split_rows(2);  // as the engine's call does on two workers
      pool.run(p.items(), [&](int64_t it, int64_t next) { p.run(it, next); });
    }
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  static_assert(matmul_new::kStrip == matmul_old::kStrip, "both versions must pack strips alike");
  constexpr int64_t kStrip = matmul_new::kStrip;
  const auto& nk = harness::kProjections;  // [N, K] per projection
  bool kn = false, layouts = false;  // --layouts: this tree's packed weights (new) against [K, N] (old)
  int reps = 15;
  std::vector<int> rows;
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--kn")) {
      kn = true;
    } else if (!std::strcmp(argv[a], "--layouts")) {
      layouts = true;
    } else if (!std::strncmp(argv[a], "--reps=", 7)) {
      reps = std::atoi(argv[a] + 7);
    } else if (argv[a][0] == '-') {
      std::fprintf(stderr, "unknown flag %s; usage: %s [--kn] [--reps=N] ROWS...\n", argv[a], argv[0]);
      return 2;
    } else {
      rows.push_back(std::atoi(argv[a]));
    }
  }
  for (const int m : rows) {
    if (m <= 0 || m > kMaxRows) {
      std::fprintf(stderr, "rows must be 1-%d, got %d\n", kMaxRows, m);
      return 2;
    }
  }
  if (kn && layouts) {
    std::fprintf(stderr, "--kn and --layouts exclude each other (--layouts times both layouts)\n");
    return 2;
  }
  if (reps <= 0 || rows.empty()) {
    std::fprintf(stderr, "usage: %s [--kn | --layouts] [--reps=N] ROWS...\n", argv[0]);
    return 2;
  }
  std::mt19937 rng(0);
  std::vector<std::vector<float>> packed, plain;  // packed [strips, K, kStrip]; plain [K, N]
  for (int layer = 0; layer < 30; ++layer) {
    for (const auto& s : nk) {
      const int64_t N = s[0], K = s[1];
      std::vector<float> w(K * N);
      for (auto& v : w) v = static_cast<float>(rng() % 255) * 1e-3f;
      packed.push_back(harness::pack_strips(w, N, K, kStrip));
      if (kn || layouts) plain.push_back(std::move(w));
    }
  }
  std::vector<float> x(kMaxRows * 1536), y_new(kMaxRows * 3072), y_old(kMaxRows * 3072);
  for (auto& v : x) v = static_cast<float>(rng() % 255) * 1e-3f - 0.1f;
  Pool pool;
  for (const int M : rows) {
    const auto run_new = [&](float* y, size_t first = 0, size_t last = SIZE_MAX) {
      pass<matmul_new::PackedProblem, matmul_new::F32Problem>(pool, kn, M, packed, plain, nk, x.data(), y, first, last);
    };
    const auto run_old = [&](float* y, size_t first = 0, size_t last = SIZE_MAX) {
      if (layouts) return pass<matmul_new::PackedProblem, matmul_new::F32Problem>(pool, true, M, packed, plain, nk, x.data(), y, first, last);
      pass<matmul_old::PackedProblem, matmul_old::F32Problem>(pool, kn, M, packed, plain, nk, x.data(), y, first, last);
    };
    std::vector<double> t_new, t_old, ratio;
    // a pass of each first: the outputs' pages faulted in, the caches warm
    run_new(y_new.data());
    run_old(y_old.data());
    for (int r = 0; r < reps; ++r) {
      for (int turn = 0; turn < 2; ++turn) {
        const bool is_new = (turn + r) % 2 == 0;
        const auto t0 = std::chrono::steady_clock::now();
        if (is_new) {
          run_new(y_new.data());
        } else {
          run_old(y_old.data());
        }
        (is_new ? t_new : t_old).push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      ratio.push_back(t_new.back() / t_old.back());
    }
    // every projection once more through both, their outputs compared byte for byte (two layouts sum
    // in different orders: their largest difference relative to the output's largest magnitude)
    int differ = 0;
    double worst = 0.0;
    for (size_t i = 0; i < packed.size(); ++i) {
      run_new(y_new.data(), i, i + 1);
      run_old(y_old.data(), i, i + 1);
      const int64_t size = M * nk[i % 4][0];
      differ += std::memcmp(y_new.data(), y_old.data(), size * sizeof(float)) != 0;
      float diff = 0.0f, scale = 1e-30f;
      for (int64_t j = 0; j < size; ++j) {
        diff = std::max(diff, std::abs(y_new[j] - y_old[j]));
        scale = std::max(scale, std::abs(y_old[j]));
      }
      worst = std::max(worst, static_cast<double>(diff / scale));
    }
    char verdict[64];
    if (differ) {
      std::snprintf(verdict, sizeof verdict, "%d of %zu projections differ (at most %.1e)", differ, packed.size(), worst);
    } else {
      std::snprintf(verdict, sizeof verdict, "same bits");
    }
    std::printf("%3d rows: new best %7.1f median %7.1f ms | old best %7.1f median %7.1f ms | new/old median %.3f | %s\n",
                M, *std::min_element(t_new.begin(), t_new.end()), median(t_new),
                *std::min_element(t_old.begin(), t_old.end()), median(t_old), median(ratio), verdict);
  }
}
