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

  // One layer's seconds in each stage of the gang pipeline, as this rank measured them.
  struct LayerStages {
    double load = 0, forward = 0, hessian = 0, solve = 0, propagate = 0, write = 0;
  };

  void CountAssignment(const std::string& kind, const std::string& result);
  // mq_worker_stage_duration_seconds{stage}: stage is plan, load, forward, hessian, solve,
  // propagate, write or finalize (tests/deploy/metrics.txt).
  void ObserveStage(const std::string& stage, double seconds);
  // One observation per pipeline stage (load ... write) for one layer this rank ran.
  void ObserveLayer(const LayerStages& seconds);
};

}  // namespace mq::worker
