// How a custom call shares its work items with XLA's intra-op thread pool, and how its calling
// thread waits for the pool's helpers.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#if defined(__linux__)
#include <sched.h>
#endif
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>

namespace fastgen_kernels {

// Returns once finished() holds. The caller has done its own share by now and each helper holds at
// most one item (tens of microseconds at decode sizes): spinning that long beats sleeping on the
// condition variable and being woken (one-row int8 projections of a SmolLM2 step, 121 calls: 9.6 ->
// 8.4 ms). A helper that was descheduled is waited for asleep after 50 us; helpers notify `done`
// under `mutex` when the last item finishes.
template <typename Finished>
void wait_for_helpers(Finished finished, std::mutex& mutex, std::condition_variable& done) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  while (!finished() && std::chrono::steady_clock::now() < give_up) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  std::unique_lock<std::mutex> lock(mutex);
  done.wait(lock, finished);
}

// Items 0 .. items - 1 dealt from an atomic counter to the pool's helpers and the calling thread.
// A `run` that takes two arguments gets each item with the one its thread has already claimed to run
// after it (one item claimed ahead). A helper that starts after the work is gone only touches this
// (kept alive by its shared_ptr).
template <typename Run>
struct Items {
  Run run;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable all_done;

  Items(Run r, int64_t n) : run(std::move(r)), items(n) {}

  void work() {
    int64_t finished = 0;
    if constexpr (std::is_invocable_v<Run&, int64_t, int64_t>) {
      // run(i, j): j is the item this thread claimed to run next (-1: none), so i can ask for its data.
      for (int64_t i = next.fetch_add(1); i < items; ++finished) {
        const int64_t j = next.fetch_add(1);
        run(i, j < items ? j : -1);
        i = j;
      }
    } else {
      for (int64_t i; (i = next.fetch_add(1)) < items; ++finished) run(i);
    }
    if (finished && done.fetch_add(finished) + finished == items) {
      std::lock_guard<std::mutex> lock(mutex);
      all_done.notify_all();
    }
  }
};

// The cores this process may run on: its affinity mask where Linux gives one (taskset, a cpuset
// container; XLA sizes its pool by the same mask), else the machine's.
inline int64_t usable_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// run(i) for every item i, on `pool` (an xla::ffi::ThreadPool) and this thread; returns when all are
// done. `run` must stay valid to call until then (it is copied into the shared state). At most one
// thread per core works: XLA's pool has as many threads as cores, and the calling thread is not one
// of them, so pool + caller oversubscribed the cores (W0's engine run on a 2-core AVX2 EPYC, in
// turns: 22.1 / 18.6 s with three workers, 17.7 / 17.1 s with two).
template <typename Pool, typename Run>
void run_items(Pool& pool, int64_t items, Run run) {
  if (items <= 0) return;
  auto shared = std::make_shared<Items<Run>>(std::move(run), items);
  static const int64_t cores = usable_cores();
  const int64_t helpers = std::min<int64_t>({static_cast<int64_t>(pool.num_threads()), items - 1, cores - 1});
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->work(); });
  shared->work();
  wait_for_helpers([&] { return shared->done.load() == items; }, shared->mutex, shared->all_done);
}

}  // namespace fastgen_kernels
