// What the matmul harnesses (matmul_harness.cc, matmul_ab.cc) share: SmolLM2-135M's projection
// shapes, the packed layout's copy of a weight, and a two-thread pool (the calling thread and one
// spinning helper, as XLA's intra-op pool lends the kernels a thread per core on 2 cores).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

namespace harness {

// [N, K] of one layer's float32 projections, in order: qkv fused, o, gate_up fused, down.
constexpr int64_t kProjections[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};

// w [K, N] packed as the kernels read it: [ceil(N / strip), K, strip], the last strip zero-padded.
inline std::vector<float> pack_strips(const std::vector<float>& w, int64_t N, int64_t K, int64_t strip) {
  std::vector<float> p((N + strip - 1) / strip * K * strip, 0.0f);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) p[(n / strip) * K * strip + k * strip + n % strip] = w[k * N + n];
  return p;
}

// One helper thread that spins between jobs; run() deals items from a counter to it and the caller.
struct Pool {
  std::atomic<int> generation{0}, finished{0};
  std::atomic<bool> stop{false};
  std::function<void()> job;
  std::thread helper;

  Pool() {
    helper = std::thread([this] {
      for (int seen = 0; !stop;) {
        if (const int g = generation.load(); g != seen) {
          seen = g;
          job();
          finished.fetch_add(1);
        } else {
          _mm_pause();
        }
      }
    });
  }
  ~Pool() {
    stop = true;
    helper.join();
  }
  // f(i) for every item, or f(i, j) with j the item the same thread claimed to run next (as
  // `run_items` in cpu_kernels/wait.h deals them).
  template <class F>
  void run(int64_t items, F f) {
    std::atomic<int64_t> next{0};
    auto work = [&] {
      if constexpr (std::is_invocable_v<F&, int64_t, int64_t>) {
        for (int64_t i = next.fetch_add(1); i < items;) {
          const int64_t j = next.fetch_add(1);
          f(i, j < items ? j : -1);
          i = j;
        }
      } else {
        for (int64_t i; (i = next.fetch_add(1)) < items;) f(i);
      }
    };
    const int before = finished.load();
    job = work;
    generation.fetch_add(1);
    work();
    while (finished.load() == before) _mm_pause();
  }
};

// A [K, N] float32 problem `p` (F32Problem of any version) run as the FFI handler runs it: where its
// few rows stream, each item sums into its own partial (in `partials`), added up in order at the
// end. run(i, next) runs item i (next: the item the same thread runs after it, or -1).
template <class P, class Run>
void run_f32_problem(Pool& pool, P& p, std::vector<float>& partials, Run run) {
  const int64_t items = p.num_items();
  if (p.streams()) {
    partials.resize(items * p.M * p.N);
    p.partials = partials.data();
  }
  pool.run(items, run);
  if (p.streams()) p.sum_partials(items);
}

}  // namespace harness
