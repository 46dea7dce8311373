// How a custom call's calling thread waits for the XLA pool's helpers sharing its work items.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

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

}  // namespace fastgen_kernels
