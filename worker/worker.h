// The worker process's control loop: registers with the coordinator, keeps its lease with
// heartbeats (own thread), long-polls for assignments, runs them one at a time and reports.
//
// Threading: Run() owns the main loop; a heartbeat thread runs beside it. The coordinator may
// restart at any time: calls are retried with backoff and the worker keeps its id, so work in
// flight is reported once the coordinator is back.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "mq/v1/worker_service.grpc.pb.h"
#include "worker/device_info.h"
#include "worker/s3_inputs.h"
#include "worker/worker_metrics.h"

namespace mq::worker {

// Channel arguments of the worker's connection to the coordinator (keepalives, reconnects).
grpc::ChannelArguments CoordinatorChannelArgs();

struct WorkerOptions {
  std::string coordinator;  // HOST:PORT
  std::string name;
  std::string scratch_dir;
  int64_t poll_wait_ms = 5000;
  // Where peers reach this worker's gang rendezvous store when it is rank 0 of a gang.
  std::string gang_host = "127.0.0.1";
  int gang_port = 0;  // 0 = none (the worker then runs no QUANTIZE assignments)
  int64_t gang_join_timeout_ms = 120000;
  // Routed experts solved at once and gang-wide tokens an MoE layer dispatches at once (0 = all;
  // -1 = chosen by the job's plan for this worker's device). A QUANTIZE assignment's settings
  // (its job's plan) take precedence; these apply to jobs planned without settings.
  int64_t experts_per_pass = -1;
  int64_t dispatch_tokens = -1;
  int64_t checkpoint_every = 0;  // steps per hidden-state checkpoint (0 = the cost model's)
  int cpu_threads = 0;  // host threads for tensor work (0: 4 on CUDA, every core on CPU)
  bool overlap_writes = true;  // a layer's write and report beside the next layer's work
  bool prefetch_next_layer = true;  // the next layer's weights into the page cache meanwhile
  bool stage_next_layer = true;     // ... into page-locked memory on a GPU (layer_staging.h)
  bool overlap_transfers = true;  // hidden-state copies on a copy stream (GPU workers)
  // The next layer's weights onto the device while a layer solves, where the job's plan found
  // room (QuantizeSettings.preload_next_layer); false: never, and plans made here say so.
  bool preload_next_layer = true;
  // Layers whose steps are profiled into profile_dir (GangPipelineOptions::profile_layers).
  std::vector<int> profile_layers;
  std::string profile_dir;
};

class Worker {
 public:
  // `channel` reaches the coordinator (common/channel.h: TLS, token or client certificate).
  Worker(WorkerOptions options, DeviceInfo device, WorkerMetrics* metrics,
         std::shared_ptr<grpc::Channel> channel);

  // Runs until `stop` becomes true. Returns the process exit code.
  int Run(const std::atomic<bool>& stop);

 private:
  std::unique_ptr<grpc::ClientContext> Context(int64_t timeout_ms, bool wait_for_ready = true);
  // Registers (again) until it succeeds or `stop`; keeps the previous id if there is one.
  bool Register(const std::atomic<bool>& stop);
  void HeartbeatLoop(const std::atomic<bool>& stop);
  void RunAssignment(const mq::v1::Assignment& assignment, const std::atomic<bool>& stop);
  // Sends the result until the coordinator accepts or rejects it for good.
  void Complete(mq::v1::CompleteAssignmentRequest request, const std::atomic<bool>& stop);
  void Progress(const mq::v1::Assignment& assignment, const std::string& stage, double fraction);
  // QUANTIZE / FINALIZE / EVALUATE: fill `result` (quantized, finalized, evaluated or error);
  // false when abandoned.
  bool RunQuantize(const mq::v1::Assignment& a, mq::v1::CompleteAssignmentRequest* result,
                   const std::atomic<bool>& stop);
  bool RunFinalize(const mq::v1::Assignment& a, mq::v1::CompleteAssignmentRequest* result,
                   const std::atomic<bool>& stop);
  // EVALUATE: measures the output (pipeline/evaluate_job.h) and fills `evaluated` or error.
  // `named`: the spec as the job gave it (before s3:// inputs were staged), for quality.json.
  bool RunEvaluate(const mq::v1::Assignment& a, const mq::v1::JobSpec& named,
                   mq::v1::CompleteAssignmentRequest* result, const std::atomic<bool>& stop);
  // FINALIZE: asks the coordinator to publish the manifest (ReportProgress with publish =
  // true; UNAVAILABLE and the like are retried). OK: write it; ABORTED: the assignment was
  // cancelled or superseded, so write nothing more and abandon it.
  absl::Status RequestPublish(const mq::v1::Assignment& a, const std::atomic<bool>& stop);
  bool Cancelled();

  WorkerOptions options_;
  DeviceInfo device_;
  WorkerMetrics* metrics_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<mq::v1::WorkerService::Stub> stub_;

  std::mutex mu_;
  std::string worker_id_;
  int64_t heartbeat_interval_ms_ = 1000;
  std::string current_assignment_;
  // The running assignment's s3:// output (empty uri: local); set and read by the worker loop.
  S3Output s3_output_;
  std::atomic<bool> cancel_current_{false};
  std::atomic<bool> need_register_{false};
  std::atomic<bool> quit_{false};  // registration refused for good: the process ends
  // The registration's session secret, sent as metadata "mq-worker-session" on every call.
  std::mutex session_mu_;
  std::string session_;
};

}  // namespace mq::worker
