// Thin gRPC adapters binding mq.v1.JobService and mq.v1.WorkerService to the Coordinator.
// They translate deadlines, map absl::Status with ToGrpcStatus and record RPC metrics; no
// logic lives here. Thread-safe (the Coordinator is).
#pragma once

#include "mq/v1/job_service.grpc.pb.h"
#include "mq/v1/worker_service.grpc.pb.h"
#include "server/coordinator.h"

namespace mq::server {

class JobServiceImpl final : public mq::v1::JobService::Service {
 public:
  JobServiceImpl(Coordinator* coordinator, CoordinatorMetrics* metrics)
      : coordinator_(coordinator), metrics_(metrics) {}

  grpc::Status SubmitJob(grpc::ServerContext* ctx, const mq::v1::SubmitJobRequest* request,
                         mq::v1::SubmitJobResponse* response) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const mq::v1::GetJobRequest* request,
                      mq::v1::GetJobResponse* response) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const mq::v1::ListJobsRequest* request,
                        mq::v1::ListJobsResponse* response) override;
  grpc::Status WatchJob(grpc::ServerContext* ctx, const mq::v1::WatchJobRequest* request,
                        grpc::ServerWriter<mq::v1::WatchJobResponse>* writer) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const mq::v1::CancelJobRequest* request,
                         mq::v1::CancelJobResponse* response) override;
  grpc::Status ResumeJob(grpc::ServerContext* ctx, const mq::v1::ResumeJobRequest* request,
                         mq::v1::ResumeJobResponse* response) override;
  grpc::Status InspectModel(grpc::ServerContext* ctx, const mq::v1::InspectModelRequest* request,
                            mq::v1::InspectModelResponse* response) override;
  grpc::Status ListWorkers(grpc::ServerContext* ctx, const mq::v1::ListWorkersRequest* request,
                           mq::v1::ListWorkersResponse* response) override;

  // Ends open watches promptly at shutdown.
  void Shutdown() { shutting_down_ = true; }

 private:
  Coordinator* coordinator_;
  CoordinatorMetrics* metrics_;
  std::atomic<bool> shutting_down_{false};
};

class WorkerServiceImpl final : public mq::v1::WorkerService::Service {
 public:
  WorkerServiceImpl(Coordinator* coordinator, CoordinatorMetrics* metrics)
      : coordinator_(coordinator), metrics_(metrics) {}

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
};

}  // namespace mq::server
