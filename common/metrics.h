// The process's one Prometheus registry and its /metrics HTTP endpoint.
//
// Families are created once at start-up by their owners (see server/coordinator_metrics.h and
// worker/worker_metrics.h) and then updated from any thread; prometheus-cpp metrics are
// thread-safe. HELP strings must be single-line ASCII (prometheus-cpp does not escape them).
#pragma once

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>

#include "absl/status/status.h"

namespace mq {

class MetricsRegistry {
 public:
  MetricsRegistry();

  prometheus::Registry& registry() { return *registry_; }

  // Serves /metrics on `listen` ("HOST:PORT"; port 0 picks a free one). Returns an error
  // naming the address when it cannot bind.
  absl::Status Serve(const std::string& listen);
  // The bound port after Serve, or 0.
  int port() const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

// Buckets for durations of seconds to hours (stages, layers).
prometheus::Histogram::BucketBoundaries StageBuckets();
// Buckets for sub-second operations (RPCs, synced writes).
prometheus::Histogram::BucketBoundaries FastBuckets();

}  // namespace mq
