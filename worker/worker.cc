#include "worker/worker.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/util.h"
#include "worker/plan_convert.h"

namespace mq::worker {
namespace {

bool Retryable(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::DEADLINE_EXCEEDED ||
         code == grpc::StatusCode::RESOURCE_EXHAUSTED || code == grpc::StatusCode::INTERNAL ||
         code == grpc::StatusCode::UNKNOWN || code == grpc::StatusCode::CANCELLED;
}

void SleepMs(int64_t ms, const std::atomic<bool>& stop) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (!stop && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min<int64_t>(ms, 50)));
  }
}

// Calls `call` until it returns OK or a status that retrying cannot change, backing off from
// 200 ms to 2 s between tries (the coordinator may be restarting). Returns the last status;
// CANCELLED when `stop` was set first.
template <typename Call>
grpc::Status CallUntilSettled(const std::atomic<bool>& stop, const std::string& what, Call call) {
  int64_t backoff = 200;
  while (!stop) {
    grpc::Status s = call();
    if (s.ok() || !Retryable(s.error_code())) return s;
    LogLine("worker", "WARN",
            what + ": coordinator unavailable (" + s.error_message() + "); retrying");
    SleepMs(backoff, stop);
    backoff = std::min<int64_t>(backoff * 2, 2000);
  }
  return grpc::Status(grpc::StatusCode::CANCELLED, "stopping");
}

// Fault injection (off unless the variable is set): milliseconds to stall inside a PLAN
// assignment before inspecting, so tests can kill processes while work is in flight.
int64_t FaultPlanDelayMs() {
  const char* v = std::getenv("MQ_FAULT_PLAN_DELAY_MS");
  return v ? std::atoll(v) : 0;
}

std::string KindName(mq::v1::AssignmentKind k) {
  return k == mq::v1::ASSIGNMENT_KIND_QUANTIZE ? "quantize" : "plan";
}

}  // namespace

Worker::Worker(WorkerOptions options, DeviceInfo device, WorkerMetrics* metrics)
    : options_(std::move(options)), device_(std::move(device)), metrics_(metrics) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
  args.SetMaxReceiveMessageSize(64 << 20);
  channel_ =
      grpc::CreateCustomChannel(options_.coordinator, grpc::InsecureChannelCredentials(), args);
  stub_ = mq::v1::WorkerService::NewStub(channel_);
}

std::unique_ptr<grpc::ClientContext> Worker::Context(int64_t timeout_ms, bool wait_for_ready) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  ctx->set_wait_for_ready(wait_for_ready);
  return ctx;
}

bool Worker::Register(const std::atomic<bool>& stop) {
  mq::v1::RegisterWorkerRequest request;
  request.set_name(options_.name);
  mq::v1::WorkerCapabilities* caps = request.mutable_capabilities();
  caps->set_device(device_.device);
  caps->set_device_name(device_.device_name);
  caps->set_device_memory_bytes(device_.device_memory_bytes);
  caps->set_host_memory_bytes(device_.host_memory_bytes);
  caps->set_cpu_cores(device_.cpu_cores);
  caps->set_hostname(device_.hostname);
  caps->add_capabilities("plan");
  caps->set_version(Version());
  caps->set_scratch_dir(options_.scratch_dir);
  caps->set_scratch_free_bytes(device_.scratch_free_bytes);
  mq::v1::RegisterWorkerResponse response;
  grpc::Status s = CallUntilSettled(stop, "register", [&] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      request.set_worker_id(worker_id_);
    }
    auto ctx = Context(10000);
    return stub_->RegisterWorker(ctx.get(), request, &response);
  });
  if (!s.ok()) {
    if (!stop) LogLine("worker", "ERROR", "registration refused: " + s.error_message());
    return false;
  }
  std::lock_guard<std::mutex> lock(mu_);
  worker_id_ = response.worker_id();
  heartbeat_interval_ms_ = response.heartbeat_interval_ms();
  need_register_ = false;
  LogLine("worker", "INFO",
          absl::StrCat("registered as ", worker_id_, " (", options_.name, ", ", device_.device,
                       ") with ", options_.coordinator, ", lease ", response.lease_ms(), " ms"));
  return true;
}

void Worker::HeartbeatLoop(const std::atomic<bool>& stop) {
  while (!stop) {
    int64_t interval;
    mq::v1::HeartbeatRequest request;
    {
      std::lock_guard<std::mutex> lock(mu_);
      interval = heartbeat_interval_ms_;
      request.set_worker_id(worker_id_);
      request.set_assignment_id(current_assignment_);
    }
    mq::v1::HeartbeatResponse response;
    auto ctx = Context(std::max<int64_t>(interval, 1000), /*wait_for_ready=*/false);
    grpc::Status s = stub_->Heartbeat(ctx.get(), request, &response);
    if (s.ok()) {
      metrics_->heartbeats->Increment();
      for (const std::string& id : response.cancel_assignment_ids()) {
        std::lock_guard<std::mutex> lock(mu_);
        if (id == current_assignment_) {
          cancel_current_ = true;
          LogLine("worker", "WARN", "coordinator cancelled assignment " + id);
        }
      }
    } else {
      metrics_->heartbeat_failures->Increment();
      if (s.error_code() == grpc::StatusCode::NOT_FOUND) need_register_ = true;
    }
    SleepMs(interval, stop);
  }
}

bool Worker::Cancelled() { return cancel_current_.load(); }

void Worker::Progress(const mq::v1::Assignment& a, const std::string& stage, double fraction) {
  mq::v1::ReportProgressRequest request;
  {
    std::lock_guard<std::mutex> lock(mu_);
    request.set_worker_id(worker_id_);
  }
  request.set_assignment_id(a.assignment_id());
  request.set_lease_epoch(a.lease_epoch());
  request.set_stage(stage);
  request.set_fraction(fraction);
  mq::v1::ReportProgressResponse response;
  auto ctx = Context(2000, /*wait_for_ready=*/false);
  grpc::Status s = stub_->ReportProgress(ctx.get(), request, &response);
  if (s.error_code() == grpc::StatusCode::ABORTED || response.cancel()) cancel_current_ = true;
}

void Worker::Complete(mq::v1::CompleteAssignmentRequest request, const std::atomic<bool>& stop) {
  const std::string what = "report " + request.assignment_id();
  grpc::Status s = CallUntilSettled(stop, what, [&] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      request.set_worker_id(worker_id_);
    }
    mq::v1::CompleteAssignmentResponse response;
    auto ctx = Context(10000);
    return stub_->CompleteAssignment(ctx.get(), request, &response);
  });
  if (!s.ok() && !stop) {
    LogLine(
        "worker", "WARN",
        absl::StrCat("result for ", request.assignment_id(), " not accepted: ", s.error_message()));
  }
}

void Worker::RunAssignment(const mq::v1::Assignment& a, const std::atomic<bool>& stop) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    current_assignment_ = a.assignment_id();
  }
  cancel_current_ = false;
  const std::string kind = KindName(a.kind());
  LogLine(
      "worker", "INFO",
      absl::StrCat("running ", kind, " assignment ", a.assignment_id(),
                   a.job_id().empty() ? "" : " of job " + a.job_id(), " attempt ", a.attempt()));
  mq::v1::CompleteAssignmentRequest result;
  result.set_assignment_id(a.assignment_id());
  result.set_lease_epoch(a.lease_epoch());
  bool aborted = false;
  if (a.kind() == mq::v1::ASSIGNMENT_KIND_PLAN) {
    const auto start = std::chrono::steady_clock::now();
    const int64_t delay = FaultPlanDelayMs();
    for (int64_t waited = 0; waited < delay && !stop && !Cancelled(); waited += 100) {
      if (waited % 1000 == 0) Progress(a, "waiting (fault injection)", double(waited) / delay);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    aborted = stop || Cancelled();
    if (!aborted) {
      Progress(a, "reading config, index and safetensors headers", 0);
      model::InspectReport report = model::InspectCheckpoint(ToInspectRequest(a.spec()));
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      metrics_->ObserveStage("plan", secs);
      *result.mutable_plan() = ToProto(report);
      result.mutable_plan()->set_seconds(secs);
      {
        std::lock_guard<std::mutex> lock(mu_);
        result.mutable_plan()->set_worker_id(worker_id_);
      }
    }
  } else {
    result.set_error(
        absl::StrCat("this mq-worker (", Version(), ") cannot run ", kind, " assignments"));
  }
  if (aborted) {
    metrics_->CountAssignment(kind, "aborted");
    LogLine("worker", "INFO", "assignment " + a.assignment_id() + " abandoned");
  } else {
    Complete(result, stop);
    metrics_->CountAssignment(kind, result.has_plan() ? "ok" : "failed");
    LogLine("worker", "INFO", "assignment " + a.assignment_id() + " done");
  }
  std::lock_guard<std::mutex> lock(mu_);
  current_assignment_.clear();
}

int Worker::Run(const std::atomic<bool>& stop) {
  if (!Register(stop)) return stop ? 0 : 1;
  std::thread heartbeats([&] { HeartbeatLoop(stop); });
  int64_t backoff = 200;
  while (!stop) {
    if (need_register_ && !Register(stop)) break;
    mq::v1::PollAssignmentRequest request;
    {
      std::lock_guard<std::mutex> lock(mu_);
      request.set_worker_id(worker_id_);
    }
    request.set_wait_ms(options_.poll_wait_ms);
    mq::v1::PollAssignmentResponse response;
    auto ctx = Context(options_.poll_wait_ms + 5000);
    grpc::Status s = stub_->PollAssignment(ctx.get(), request, &response);
    if (!s.ok()) {
      if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
        need_register_ = true;
      } else {
        SleepMs(backoff, stop);
        backoff = std::min<int64_t>(backoff * 2, 2000);
      }
      continue;
    }
    backoff = 200;
    if (response.has_assignment()) RunAssignment(response.assignment(), stop);
  }
  heartbeats.join();
  return 0;
}

}  // namespace mq::worker
