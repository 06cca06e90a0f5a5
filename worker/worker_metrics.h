// The worker's Prometheus families (names listed in tests/deploy/metrics.txt).
// Created once at start-up; updated from any thread.
#pragma once

#include <string>

#include "common/metrics.h"

namespace mq::worker {

struct WorkerMetrics {
  WorkerMetrics(prometheus::Registry& registry, const std::string& worker,
                const std::string& device);

  prometheus::Family<prometheus::Counter>* assignments = nullptr;     // {kind, result}
  prometheus::Family<prometheus::Histogram>* stage_seconds = nullptr;  // {stage}
  prometheus::Counter* heartbeats = nullptr;
  prometheus::Counter* heartbeat_failures = nullptr;

  void CountAssignment(const std::string& kind, const std::string& result);
  void ObserveStage(const std::string& stage, double seconds);
};

}  // namespace mq::worker
