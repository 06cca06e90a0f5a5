// The coordinator's Prometheus families (names listed in tests/deploy/metrics.txt).
// Created once at start-up; updated from any thread (SetJobProgress serializes itself).
#pragma once

#include <array>
#include <map>
#include <mutex>
#include <string>

#include "common/metrics.h"
#include "mq/v1/state.pb.h"

namespace mq::server {

struct CoordinatorMetrics {
  explicit CoordinatorMetrics(prometheus::Registry& registry);

  // mq_jobs{state}: index by mq::v1::JobState (1..8).
  std::array<prometheus::Gauge*, 9> jobs{};
  prometheus::Counter* jobs_submitted = nullptr;
  prometheus::Counter* jobs_succeeded = nullptr;
  prometheus::Counter* jobs_failed = nullptr;
  prometheus::Counter* jobs_cancelled = nullptr;
  prometheus::Counter* job_attempts = nullptr;
  prometheus::Counter* layers_committed = nullptr;
  prometheus::Counter* attempts_uncounted = nullptr;
  prometheus::Counter* gangs_shrunk = nullptr;
  // mq_workers{state}: idle and busy count workers heard from (registered, heartbeat or poll)
  // since this coordinator started; unknown counts workers recovered from the state store
  // that have not been heard from yet (alive or not: they become idle/busy when they call,
  // or are declared lost when their lease runs out). Dead workers are in none.
  prometheus::Gauge* workers_idle = nullptr;
  prometheus::Gauge* workers_busy = nullptr;
  prometheus::Gauge* workers_unknown = nullptr;
  prometheus::Counter* workers_lost = nullptr;
  prometheus::Family<prometheus::Counter>* assignments = nullptr;  // {kind, result}
  prometheus::Family<prometheus::Counter>* grpc_handled = nullptr;  // {grpc_method, grpc_code}
  prometheus::Family<prometheus::Histogram>* grpc_seconds = nullptr;  // {grpc_method}
  prometheus::Histogram* store_write_seconds = nullptr;
  prometheus::Gauge* ready = nullptr;
  prometheus::Counter* store_write_failures = nullptr;
  prometheus::Gauge* watch_streams = nullptr;  // open WatchJob streams
  prometheus::Gauge* long_polls = nullptr;     // PollAssignment calls waiting for work
  prometheus::Histogram* quality_kl_mean = nullptr;
  prometheus::Histogram* quality_top1 = nullptr;
  prometheus::Family<prometheus::Counter>* quality_gate = nullptr;  // {result}

  // mq_job_layers{kind}: summed over the jobs in running or finalizing.
  prometheus::Gauge* job_layers_committed = nullptr;
  prometheus::Gauge* job_layers_total = nullptr;

  void CountAssignment(const std::string& kind, const std::string& result);

  // An evaluation's result: mq_job_quality_kl_mean and mq_job_quality_top1_agreement observe
  // it (when something was measured), mq_job_quality_gate_total{result} counts gated jobs
  // (passed / failed).
  void ObserveQuality(const mq::v1::QualityReport& quality, bool gated, bool passed);

  // Sets mq_job_progress_ratio{job_id} to committed/total layers for exactly the jobs in
  // `progress` (job id -> ratio in [0, 1]): series of jobs not in it are removed, so the
  // label set stays bounded by the jobs in progress.
  void SetJobProgress(const std::map<std::string, double>& progress);

 private:
  prometheus::Family<prometheus::Gauge>* job_progress_ = nullptr;  // {job_id}
  std::mutex progress_mu_;
  std::map<std::string, prometheus::Gauge*> progress_series_;  // guarded by progress_mu_
};

}  // namespace mq::server
