// The process's one Prometheus registry and its /metrics HTTP endpoint.
//
// The endpoint is a small HTTP/1.1 server of our own (one thread, one connection at a time,
// `GET /metrics` in the Prometheus text format, anything else 404), not prometheus-cpp's
// civetweb exposer: civetweb fails to start ("null context") in processes that load the torch
// wheel's libtorch, which every mq-worker does.
//
// Families are created once at start-up by their owners (see server/coordinator_metrics.h and
// worker/worker_metrics.h) and then updated from any thread; prometheus-cpp metrics are
// thread-safe. HELP strings must be single-line ASCII (prometheus-cpp does not escape them).
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"

namespace mq {

class MetricsRegistry {
 public:
  MetricsRegistry();
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  prometheus::Registry& registry() { return *registry_; }

  // Serves /metrics on `listen` ("HOST:PORT"; port 0 picks a free one). Returns an error
  // naming the address when it cannot bind.
  absl::Status Serve(const std::string& listen);
  // The bound port after Serve, or 0.
  int port() const;

 private:
  void ServeLoop();
  void Answer(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Buckets for durations of seconds to hours (stages, layers).
prometheus::Histogram::BucketBoundaries StageBuckets();
// Buckets for sub-second operations (RPCs, synced writes).
prometheus::Histogram::BucketBoundaries FastBuckets();

}  // namespace mq
