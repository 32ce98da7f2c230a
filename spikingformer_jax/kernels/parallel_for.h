// ParallelFor over XLA's intra-op thread pool, shared by the kernels of this folder.
#ifndef SPIKINGFORMER_JAX_KERNELS_PARALLEL_FOR_H_
#define SPIKINGFORMER_JAX_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace spikingformer_kernels {

// Runs body(chunk) for chunk in [0, n) on the caller and the pool's threads; returns when all are done.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const std::function<void(int64_t)>* fn = &body;
  const int64_t n_total = n;
  auto work = [state, fn, n_total]() {
    for (int64_t i; (i = state->next.fetch_add(1, std::memory_order_relaxed)) < n_total;) {
      (*fn)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  // A helper that starts after every chunk is taken finds none and only touches `state` (kept alive by
  // its own copy), never `body`.
  while (state->done.load(std::memory_order_acquire) < n_total) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }
}

}  // namespace spikingformer_kernels

#endif  // SPIKINGFORMER_JAX_KERNELS_PARALLEL_FOR_H_
