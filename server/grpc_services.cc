#include "server/grpc_services.h"

#include <chrono>

#include "common/status.h"
#include "common/util.h"

namespace mq::server {
namespace {

// Milliseconds (monotonic) until the RPC's deadline, capped at `cap_ms`.
int64_t DeadlineMs(grpc::ServerContext* ctx, const Coordinator* c, int64_t cap_ms) {
  const auto left = ctx->deadline() - std::chrono::system_clock::now();
  int64_t left_ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count();
  if (left_ms > cap_ms || left_ms < 0) left_ms = left_ms < 0 ? 0 : cap_ms;
  return c->options().monotonic_ms() + left_ms;
}

// Upper-case gRPC code names, as go-grpc-prometheus labels them ("OK", "INVALID_ARGUMENT").
const char* CodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {
      "OK",        "CANCELLED",         "UNKNOWN",          "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",   "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",      "UNAVAILABLE",      "DATA_LOSS",
      "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

// Runs `fn` (returning absl::StatusOr<Response>), fills `response`, records metrics.
template <typename Response, typename Fn>
grpc::Status Handle(CoordinatorMetrics* metrics, const char* method, Response* response, Fn fn) {
  const auto start = std::chrono::steady_clock::now();
  auto result = fn();
  grpc::Status status;
  if (result.ok()) {
    *response = *std::move(result);
  } else {
    status = ToGrpcStatus(result.status());
  }
  if (metrics) {
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    metrics->grpc_handled
        ->Add({{"grpc_method", method},
               {"grpc_code", CodeName(status.error_code())}})
        .Increment();
    metrics->grpc_seconds->Add({{"grpc_method", method}}, FastBuckets()).Observe(secs);
  }
  return status;
}

}  // namespace

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext*, const mq::v1::SubmitJobRequest* r,
                                       mq::v1::SubmitJobResponse* out) {
  return Handle(metrics_, "SubmitJob", out, [&] { return coordinator_->SubmitJob(*r); });
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext*, const mq::v1::GetJobRequest* r,
                                    mq::v1::GetJobResponse* out) {
  return Handle(metrics_, "GetJob", out, [&] { return coordinator_->GetJob(*r); });
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext*, const mq::v1::ListJobsRequest* r,
                                      mq::v1::ListJobsResponse* out) {
  return Handle(metrics_, "ListJobs", out, [&] { return coordinator_->ListJobs(*r); });
}

grpc::Status JobServiceImpl::WatchJob(grpc::ServerContext* ctx, const mq::v1::WatchJobRequest* r,
                                      grpc::ServerWriter<mq::v1::WatchJobResponse>* writer) {
  mq::v1::WatchJobResponse ignored;
  return Handle(metrics_, "WatchJob", &ignored, [&]() -> absl::StatusOr<mq::v1::WatchJobResponse> {
    int64_t next_seq = 0;
    while (true) {
      const uint64_t seen = coordinator_->change_counter();
      auto snapshot = coordinator_->JobSnapshot(r->job_id(), next_seq);
      if (!snapshot.ok()) return snapshot.status();
      next_seq = snapshot->job().event_count();
      if (!writer->Write(*snapshot)) return absl::CancelledError("the watcher went away");
      const mq::v1::JobState state = snapshot->job().state();
      if (state == mq::v1::JOB_STATE_SUCCEEDED || state == mq::v1::JOB_STATE_FAILED ||
          state == mq::v1::JOB_STATE_CANCELLED) {
        return mq::v1::WatchJobResponse();
      }
      // Wait for a change, checking for cancellation and shutdown every second.
      uint64_t now_seen = seen;
      while (now_seen == seen) {
        if (ctx->IsCancelled()) return absl::CancelledError("the watcher went away");
        if (shutting_down_) return absl::UnavailableError("the coordinator is shutting down");
        now_seen = coordinator_->WaitForChange(seen, DeadlineMs(ctx, coordinator_, 1000));
      }
    }
  });
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext*, const mq::v1::CancelJobRequest* r,
                                       mq::v1::CancelJobResponse* out) {
  return Handle(metrics_, "CancelJob", out, [&] { return coordinator_->CancelJob(*r); });
}

grpc::Status JobServiceImpl::ResumeJob(grpc::ServerContext*, const mq::v1::ResumeJobRequest* r,
                                       mq::v1::ResumeJobResponse* out) {
  return Handle(metrics_, "ResumeJob", out, [&] { return coordinator_->ResumeJob(*r); });
}

grpc::Status JobServiceImpl::InspectModel(grpc::ServerContext* ctx,
                                          const mq::v1::InspectModelRequest* r,
                                          mq::v1::InspectModelResponse* out) {
  return Handle(metrics_, "InspectModel", out, [&] {
    return coordinator_->InspectModel(*r, DeadlineMs(ctx, coordinator_, 600000));
  });
}

grpc::Status JobServiceImpl::ListWorkers(grpc::ServerContext*, const mq::v1::ListWorkersRequest*,
                                         mq::v1::ListWorkersResponse* out) {
  return Handle(metrics_, "ListWorkers", out,
                [&]() -> absl::StatusOr<mq::v1::ListWorkersResponse> {
                  return coordinator_->ListWorkers();
                });
}

grpc::Status WorkerServiceImpl::RegisterWorker(grpc::ServerContext*,
                                               const mq::v1::RegisterWorkerRequest* r,
                                               mq::v1::RegisterWorkerResponse* out) {
  return Handle(metrics_, "RegisterWorker", out, [&] { return coordinator_->RegisterWorker(*r); });
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext*, const mq::v1::HeartbeatRequest* r,
                                          mq::v1::HeartbeatResponse* out) {
  return Handle(metrics_, "Heartbeat", out, [&] { return coordinator_->Heartbeat(*r); });
}

grpc::Status WorkerServiceImpl::PollAssignment(grpc::ServerContext* ctx,
                                               const mq::v1::PollAssignmentRequest* r,
                                               mq::v1::PollAssignmentResponse* out) {
  return Handle(metrics_, "PollAssignment", out, [&] {
    return coordinator_->PollAssignment(*r, DeadlineMs(ctx, coordinator_, 60000));
  });
}

grpc::Status WorkerServiceImpl::ReportProgress(grpc::ServerContext*,
                                               const mq::v1::ReportProgressRequest* r,
                                               mq::v1::ReportProgressResponse* out) {
  return Handle(metrics_, "ReportProgress", out, [&] { return coordinator_->ReportProgress(*r); });
}

grpc::Status WorkerServiceImpl::CompleteAssignment(grpc::ServerContext*,
                                                   const mq::v1::CompleteAssignmentRequest* r,
                                                   mq::v1::CompleteAssignmentResponse* out) {
  return Handle(metrics_, "CompleteAssignment", out,
                [&] { return coordinator_->CompleteAssignment(*r); });
}

grpc::Status WorkerServiceImpl::ReportLayer(grpc::ServerContext*,
                                            const mq::v1::ReportLayerRequest* r,
                                            mq::v1::ReportLayerResponse* out) {
  return Handle(metrics_, "ReportLayer", out, [&] { return coordinator_->ReportLayer(*r); });
}

}  // namespace mq::server
