// The coordinator's Prometheus families (names listed in tests/deploy/metrics.txt).
// Created once at start-up; updated from any thread.
#pragma once

#include <array>
#include <string>

#include "common/metrics.h"

namespace mq::server {

struct CoordinatorMetrics {
  explicit CoordinatorMetrics(prometheus::Registry& registry);

  // mq_jobs{state}: index by mq::v1::JobState (1..7).
  std::array<prometheus::Gauge*, 8> jobs{};
  prometheus::Counter* jobs_submitted = nullptr;
  prometheus::Counter* jobs_succeeded = nullptr;
  prometheus::Counter* jobs_failed = nullptr;
  prometheus::Counter* jobs_cancelled = nullptr;
  prometheus::Counter* job_attempts = nullptr;
  prometheus::Counter* layers_committed = nullptr;
  prometheus::Counter* attempts_uncounted = nullptr;
  prometheus::Counter* gangs_shrunk = nullptr;
  prometheus::Gauge* workers_idle = nullptr;
  prometheus::Gauge* workers_busy = nullptr;
  prometheus::Counter* workers_lost = nullptr;
  prometheus::Family<prometheus::Counter>* assignments = nullptr;  // {kind, result}
  prometheus::Family<prometheus::Counter>* grpc_handled = nullptr;  // {grpc_method, grpc_code}
  prometheus::Family<prometheus::Histogram>* grpc_seconds = nullptr;  // {grpc_method}
  prometheus::Histogram* store_write_seconds = nullptr;
  prometheus::Gauge* ready = nullptr;
  prometheus::Counter* store_write_failures = nullptr;
  prometheus::Gauge* watch_streams = nullptr;  // open WatchJob streams
  prometheus::Gauge* long_polls = nullptr;     // PollAssignment calls waiting for work

  void CountAssignment(const std::string& kind, const std::string& result);
};

}  // namespace mq::server
