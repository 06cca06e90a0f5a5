// Work spread over a few threads, header-only (no library, no protobuf, no torch: used by the
// S3 client, the worker's model readers and its output code).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <system_error>
#include <thread>
#include <vector>

namespace mq {

// Runs `work` on up to `threads` threads at once, the calling thread among them, and returns once
// every run has returned. `work` takes its items itself (e.g. from an atomic counter) until none
// are left, so a thread that cannot be started only leaves more to the others: the calling
// thread always runs it.
template <typename Work>
void RunOnThreads(size_t threads, const Work& work) {
  std::vector<std::thread> started;
  for (size_t t = 1; t < threads; ++t) {
    try {
      started.emplace_back(work);
    } catch (const std::system_error&) {
      break;
    }
  }
  work();
  for (std::thread& t : started) t.join();
}

// Calls fn(i) once for every i in [0, count), on up to `threads` threads (RunOnThreads), each
// thread taking the next index until none is left; returns once every call has returned.
template <typename Fn>
void ForEachIndexOnThreads(size_t count, size_t threads, const Fn& fn) {
  std::atomic<size_t> next{0};
  RunOnThreads(std::min(count, threads), [&] {
    for (size_t i = next++; i < count; i = next++) fn(i);
  });
}

}  // namespace mq
