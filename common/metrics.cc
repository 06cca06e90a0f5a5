#include "common/metrics.h"

#include <exception>

#include "common/util.h"

namespace mq {

MetricsRegistry::MetricsRegistry() : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::BuildGauge()
      .Name("mq_build_info")
      .Help("mq build information; always 1")
      .Register(*registry_)
      .Add({{"version", std::string(Version())}})
      .Set(1);
}

absl::Status MetricsRegistry::Serve(const std::string& listen) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(listen, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError("--metrics-listen = \"" + listen +
                                      "\": cannot serve metrics there: " + e.what());
  }
  exposer_->RegisterCollectable(registry_, "/metrics");
  return absl::OkStatus();
}

int MetricsRegistry::port() const {
  if (!exposer_) return 0;
  auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

prometheus::Histogram::BucketBoundaries StageBuckets() {
  return {0.01, 0.1, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200};
}

prometheus::Histogram::BucketBoundaries FastBuckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30};
}

}  // namespace mq
