// Thin gRPC adapters binding mq.v1.JobService and mq.v1.WorkerService to the Coordinator.
// They translate deadlines, map absl::Status with ToGrpcStatus and record RPC metrics; no
// logic lives here. Thread-safe (the Coordinator is).
//
// Bounded work per client: no client can hold the sync server's threads.
// - WatchJob uses the callback API: an open watch holds no thread. One pump thread follows the
//   coordinator's change counter and writes each open watch the job's new snapshot, at most one
//   write in flight per stream. At most `max_watch_streams` are open; beyond that WatchJob
//   answers RESOURCE_EXHAUSTED.
// - PollAssignment (a long poll, normally one per worker) and InspectModel (waits for a worker)
//   hold a sync thread while they wait: at most `max_long_polls` and kMaxInspections of them at
//   once, RESOURCE_EXHAUSTED beyond. Together they stay well under the server's thread cap, so
//   short RPCs (Heartbeat, ReportLayer, GetJob, ...) are always answered.
// - Changes (submit, cancel, resume, register, reports) answer UNAVAILABLE while the
//   coordinator is not serving (Coordinator::CheckServing).
//
// Every call is authenticated and authorized first (server/auth): UNAUTHENTICATED or
// PERMISSION_DENIED before any handler runs; worker calls also pass
// Coordinator::AuthorizeWorker. A null Authenticator means --insecure (everyone anonymous).
#pragma once

#include <atomic>
#include <memory>

#include "mq/v1/job_service.grpc.pb.h"
#include "mq/v1/worker_service.grpc.pb.h"
#include "server/auth/authenticator.h"
#include "server/coordinator.h"

namespace mq::server {

struct ServiceLimits {
  int max_watch_streams = 4096;
  int max_long_polls = 256;
};

// Concurrent InspectModel calls (each may wait minutes for a worker).
inline constexpr int kMaxInspections = 32;

class WatchPump;

class JobServiceImpl final
    : public mq::v1::JobService::WithCallbackMethod_WatchJob<mq::v1::JobService::Service> {
 public:
  JobServiceImpl(Coordinator* coordinator, CoordinatorMetrics* metrics,
                 ServiceLimits limits = ServiceLimits(), const Authenticator* auth = nullptr);
  ~JobServiceImpl() override;

  grpc::Status SubmitJob(grpc::ServerContext* ctx, const mq::v1::SubmitJobRequest* request,
                         mq::v1::SubmitJobResponse* response) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const mq::v1::GetJobRequest* request,
                      mq::v1::GetJobResponse* response) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const mq::v1::ListJobsRequest* request,
                        mq::v1::ListJobsResponse* response) override;
  grpc::ServerWriteReactor<mq::v1::WatchJobResponse>* WatchJob(
      grpc::CallbackServerContext* ctx, const mq::v1::WatchJobRequest* request) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const mq::v1::CancelJobRequest* request,
                         mq::v1::CancelJobResponse* response) override;
  grpc::Status ResumeJob(grpc::ServerContext* ctx, const mq::v1::ResumeJobRequest* request,
                         mq::v1::ResumeJobResponse* response) override;
  grpc::Status InspectModel(grpc::ServerContext* ctx, const mq::v1::InspectModelRequest* request,
                            mq::v1::InspectModelResponse* response) override;
  grpc::Status ListWorkers(grpc::ServerContext* ctx, const mq::v1::ListWorkersRequest* request,
                           mq::v1::ListWorkersResponse* response) override;

  // Ends open watches with UNAVAILABLE and refuses new ones; call before Server::Shutdown.
  void Shutdown();

 private:
  Coordinator* coordinator_;
  CoordinatorMetrics* metrics_;
  const Authenticator* auth_;
  std::unique_ptr<WatchPump> watches_;
  std::atomic<int> inspections_{0};
};

class WorkerServiceImpl final : public mq::v1::WorkerService::Service {
 public:
  WorkerServiceImpl(Coordinator* coordinator, CoordinatorMetrics* metrics,
                    ServiceLimits limits = ServiceLimits(), const Authenticator* auth = nullptr)
      : coordinator_(coordinator), metrics_(metrics), limits_(limits), auth_(auth) {}

  grpc::Status RegisterWorker(grpc::ServerContext* ctx,
                              const mq::v1::RegisterWorkerRequest* request,
                              mq::v1::RegisterWorkerResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const mq::v1::HeartbeatRequest* request,
                         mq::v1::HeartbeatResponse* response) override;
  grpc::Status PollAssignment(grpc::ServerContext* ctx,
                              const mq::v1::PollAssignmentRequest* request,
                              mq::v1::PollAssignmentResponse* response) override;
  grpc::Status ReportProgress(grpc::ServerContext* ctx,
                              const mq::v1::ReportProgressRequest* request,
                              mq::v1::ReportProgressResponse* response) override;
  grpc::Status CompleteAssignment(grpc::ServerContext* ctx,
                                  const mq::v1::CompleteAssignmentRequest* request,
                                  mq::v1::CompleteAssignmentResponse* response) override;
  grpc::Status ReportLayer(grpc::ServerContext* ctx, const mq::v1::ReportLayerRequest* request,
                           mq::v1::ReportLayerResponse* response) override;

 private:
  Coordinator* coordinator_;
  CoordinatorMetrics* metrics_;
  ServiceLimits limits_;
  const Authenticator* auth_;
  std::atomic<int> long_polls_{0};
};

}  // namespace mq::server
