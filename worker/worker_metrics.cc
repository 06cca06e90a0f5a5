#include "worker/worker_metrics.h"

namespace mq::worker {

WorkerMetrics::WorkerMetrics(prometheus::Registry& r, const std::string& worker,
                             const std::string& device) {
  prometheus::BuildGauge()
      .Name("mq_worker_info")
      .Help("This worker's name and device; always 1")
      .Register(r)
      .Add({{"worker", worker}, {"device", device}})
      .Set(1);
  assignments = &prometheus::BuildCounter()
                     .Name("mq_worker_assignments_total")
                     .Help("Assignments this worker finished, by kind and result")
                     .Register(r);
  for (const char* kind : {"plan", "quantize", "finalize", "evaluate"}) {
    for (const char* result : {"ok", "failed", "aborted"}) {
      assignments->Add({{"kind", kind}, {"result", result}});
    }
  }
  stage_seconds =
      &prometheus::BuildHistogram()
           .Name("mq_worker_stage_duration_seconds")
           .Help("Seconds per pipeline stage: per plan, per layer and stage, per finalize, per evaluation")
           .Register(r);
  heartbeats = &prometheus::BuildCounter()
                    .Name("mq_worker_heartbeats_total")
                    .Help("Heartbeats the coordinator accepted")
                    .Register(r)
                    .Add({});
  heartbeat_failures = &prometheus::BuildCounter()
                            .Name("mq_worker_heartbeat_failures_total")
                            .Help("Heartbeats that failed")
                            .Register(r)
                            .Add({});
}

void WorkerMetrics::CountAssignment(const std::string& kind, const std::string& result) {
  assignments->Add({{"kind", kind}, {"result", result}}).Increment();
}

void WorkerMetrics::ObserveStage(const std::string& stage, double seconds) {
  stage_seconds->Add({{"stage", stage}}, StageBuckets()).Observe(seconds);
}

void WorkerMetrics::ObserveLayer(const LayerStages& s) {
  ObserveStage("load", s.load);
  ObserveStage("forward", s.forward);
  ObserveStage("hessian", s.hessian);
  ObserveStage("solve", s.solve);
  ObserveStage("propagate", s.propagate);
  ObserveStage("write", s.write);
}

}  // namespace mq::worker
