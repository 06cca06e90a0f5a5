#include "server/coordinator_metrics.h"

#include "mq/v1/state.pb.h"

namespace mq::server {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

CoordinatorMetrics::CoordinatorMetrics(prometheus::Registry& r) {
  auto& jobs_family = BuildGauge().Name("mq_jobs").Help("Jobs by state").Register(r);
  const std::array<const char*, 9> names = {"",          "queued",    "planning",
                                            "running",   "finalizing", "succeeded",
                                            "failed",    "cancelled",  "evaluating"};
  for (size_t s = 1; s < names.size(); ++s) jobs[s] = &jobs_family.Add({{"state", names[s]}});
  jobs_submitted = &BuildCounter()
                        .Name("mq_jobs_submitted_total")
                        .Help("Jobs created by SubmitJob")
                        .Register(r)
                        .Add({});
  auto& finished = BuildCounter()
                       .Name("mq_jobs_finished_total")
                       .Help("Jobs that reached a terminal state, by result")
                       .Register(r);
  jobs_succeeded = &finished.Add({{"result", "succeeded"}});
  jobs_failed = &finished.Add({{"result", "failed"}});
  jobs_cancelled = &finished.Add({{"result", "cancelled"}});
  job_attempts = &BuildCounter()
                      .Name("mq_job_attempts_total")
                      .Help("Attempts started across all jobs")
                      .Register(r)
                      .Add({});
  layers_committed = &BuildCounter()
                          .Name("mq_layers_committed_total")
                          .Help("Pipeline steps (decoder layers) committed across all jobs")
                          .Register(r)
                          .Add({});
  attempts_uncounted =
      &BuildCounter()
           .Name("mq_job_attempts_uncounted_total")
           .Help("Attempts ended by infrastructure that did not count against max_attempts")
           .Register(r)
           .Add({});
  gangs_shrunk = &BuildCounter()
                      .Name("mq_gangs_shrunk_total")
                      .Help("Quantize attempts started on a gang smaller than the job asked for")
                      .Register(r)
                      .Add({});
  auto& workers = BuildGauge()
                      .Name("mq_workers")
                      .Help(
                          "Workers not declared dead, by state (unknown: recovered from the "
                          "state store, not heard from since the coordinator started)")
                      .Register(r);
  workers_idle = &workers.Add({{"state", "idle"}});
  workers_busy = &workers.Add({{"state", "busy"}});
  workers_unknown = &workers.Add({{"state", "unknown"}});
  workers_lost = &BuildCounter()
                      .Name("mq_workers_lost_total")
                      .Help("Workers declared dead after their lease expired")
                      .Register(r)
                      .Add({});
  assignments = &BuildCounter()
                     .Name("mq_assignments_total")
                     .Help("Assignments that ended, by kind and result")
                     .Register(r);
  for (const char* kind : {"plan", "quantize", "finalize", "evaluate"}) {
    for (const char* result : {"ok", "failed", "reassigned", "aborted"}) {
      assignments->Add({{"kind", kind}, {"result", result}});
    }
  }
  grpc_handled = &BuildCounter()
                      .Name("mq_grpc_server_handled_total")
                      .Help("RPCs completed by the coordinator, by method and status code")
                      .Register(r);
  grpc_seconds = &BuildHistogram()
                      .Name("mq_grpc_server_handling_seconds")
                      .Help("Time to handle an RPC, by method")
                      .Register(r);
  store_write_seconds = &BuildHistogram()
                             .Name("mq_state_store_write_duration_seconds")
                             .Help("Duration of synced state store batch writes")
                             .Register(r)
                             .Add({}, FastBuckets());
  ready = &BuildGauge()
               .Name("mq_coordinator_ready")
               .Help("1 when the coordinator has recovered its state and serves requests")
               .Register(r)
               .Add({});
  store_write_failures = &BuildCounter()
                              .Name("mq_state_store_write_failures_total")
                              .Help(
                                  "State store writes that failed (the coordinator then stops "
                                  "serving until a probe write succeeds)")
                              .Register(r)
                              .Add({});
  watch_streams =
      &BuildGauge().Name("mq_watch_streams").Help("Open WatchJob streams").Register(r).Add({});
  long_polls = &BuildGauge()
                    .Name("mq_long_polls")
                    .Help("PollAssignment calls waiting for work")
                    .Register(r)
                    .Add({});
  quality_kl_mean =
      &BuildHistogram()
           .Name("mq_job_quality_kl_mean")
           .Help("Mean per-token KL(original || quantized) in nats measured by each evaluation")
           .Register(r)
           .Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                                                            0.1, 0.2, 0.5, 1, 2, 5});
  quality_top1 =
      &BuildHistogram()
           .Name("mq_job_quality_top1_agreement")
           .Help("Top-1 next-token agreement with the original measured by each evaluation")
           .Register(r)
           .Add({}, prometheus::Histogram::BucketBoundaries{0.5, 0.7, 0.8, 0.9, 0.95, 0.98,
                                                            0.99, 0.995, 0.999, 1});
  quality_gate = &BuildCounter()
                      .Name("mq_job_quality_gate_total")
                      .Help("Evaluations of jobs with a quality gate, by result")
                      .Register(r);
  for (const char* result : {"passed", "failed"}) quality_gate->Add({{"result", result}});
  auto& job_layers =
      BuildGauge()
          .Name("mq_job_layers")
          .Help("Decoder layers of the running and finalizing jobs, committed and in total")
          .Register(r);
  job_layers_committed = &job_layers.Add({{"kind", "committed"}});
  job_layers_total = &job_layers.Add({{"kind", "total"}});
  job_progress_ = &BuildGauge()
                       .Name("mq_job_progress_ratio")
                       .Help(
                           "Committed over total decoder layers of each running or finalizing "
                           "job; the series is removed when the job leaves those states")
                       .Register(r);
}

void CoordinatorMetrics::SetJobProgress(const std::map<std::string, double>& progress) {
  std::lock_guard<std::mutex> lock(progress_mu_);
  for (auto it = progress_series_.begin(); it != progress_series_.end();) {
    if (progress.count(it->first)) {
      ++it;
      continue;
    }
    job_progress_->Remove(it->second);
    it = progress_series_.erase(it);
  }
  for (const auto& [job_id, ratio] : progress) {
    prometheus::Gauge*& g = progress_series_[job_id];
    if (!g) g = &job_progress_->Add({{"job_id", job_id}});
    g->Set(ratio);
  }
}

void CoordinatorMetrics::ObserveQuality(const mq::v1::QualityReport& quality, bool gated,
                                        bool passed) {
  if (quality.not_measured().empty()) {
    quality_kl_mean->Observe(quality.kl_mean());
    quality_top1->Observe(quality.top1_agreement());
  }
  if (gated) quality_gate->Add({{"result", passed ? "passed" : "failed"}}).Increment();
}

void CoordinatorMetrics::CountAssignment(const std::string& kind, const std::string& result) {
  assignments->Add({{"kind", kind}, {"result", result}}).Increment();
}

}  // namespace mq::server
