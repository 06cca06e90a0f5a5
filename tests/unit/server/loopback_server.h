// Starts the coordinator's gRPC adapters on a real in-process server on 127.0.0.1 (a free port)
// and connects client stubs to it, for tests that go through the transport.
// Threading: the server runs on gRPC's threads until the returned server is shut down.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "mq/v1/job_service.grpc.pb.h"
#include "mq/v1/worker_service.grpc.pb.h"
#include "server/grpc_services.h"

namespace mq::server {

struct LoopbackServer {
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<mq::v1::JobService::Stub> job_stub;
  std::unique_ptr<mq::v1::WorkerService::Stub> worker_stub;
};

// Serves `jobs` and `workers` (which must outlive the server); the stubs are empty and a test
// failure is recorded when no port could be bound.
inline LoopbackServer StartLoopbackServer(JobServiceImpl* jobs, WorkerServiceImpl* workers) {
  LoopbackServer s;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(jobs);
  builder.RegisterService(workers);
  s.server = builder.BuildAndStart();
  EXPECT_NE(port, 0) << "no loopback port";
  if (port == 0) return s;
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  s.job_stub = mq::v1::JobService::NewStub(channel);
  s.worker_stub = mq::v1::WorkerService::NewStub(channel);
  return s;
}

}  // namespace mq::server
