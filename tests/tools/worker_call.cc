// mq-worker-call: makes one WorkerService call with the credentials given, the way a process
// that is not mq-worker (an impostor, a stale copy) would, and prints the outcome:
//   line 1: OK or the gRPC code name; line 2: the status message (or nothing);
//   then, on success, key=value lines (register: worker_id, session; poll: assignment_id,
//   job_id, lease_epoch, kind, rank).
// For tests/integration/test_security.py. Exit code 0 whatever the call answered; 2 on a bad
// command line.
//
// usage: mq-worker-call --coordinator HOST:PORT (--insecure | --tls-ca F [--token-file F]
//          [--tls-cert F --tls-key F]) [--session S] CALL [--worker-id ID] [--name N]
//          [--assignment-id A] [--lease-epoch E] [--wait-ms N]
//   CALL: register | heartbeat | poll | complete (reports an error result) | progress

#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <iostream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/channel.h"
#include "common/flags.h"
#include "mq/v1/worker_service.grpc.pb.h"

namespace {

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    default:
      return "OTHER";
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string coordinator, token_file, session, worker_id, name = "impostor", assignment_id;
  int64_t lease_epoch = 0, wait_ms = 0;
  mq::ChannelSecurity security;
  mq::Flags flags;
  flags.String("coordinator", &coordinator, "HOST:PORT");
  flags.String("tls-ca", &security.ca_file, "CA of the coordinator's certificate");
  flags.String("tls-cert", &security.cert_file, "client certificate");
  flags.String("tls-key", &security.key_file, "client key");
  flags.String("token-file", &token_file, "bearer token file");
  flags.Bool("insecure", &security.insecure, "plaintext");
  flags.String("session", &session, "metadata mq-worker-session to send");
  flags.String("worker-id", &worker_id, "worker id");
  flags.String("name", &name, "worker name (register)");
  flags.String("assignment-id", &assignment_id, "assignment (complete, progress)");
  flags.Int("lease-epoch", &lease_epoch, "lease epoch (complete, progress)");
  flags.Int("wait-ms", &wait_ms, "poll wait");
  if (absl::Status s = flags.Parse(argc, argv); !s.ok() || flags.positional().size() != 1) {
    std::fprintf(stderr, "mq-worker-call: %s\n%s",
                 s.ok() ? "exactly one CALL is required" : std::string(s.message()).c_str(),
                 flags.Usage().c_str());
    return 2;
  }
  if (!token_file.empty()) {
    auto token = mq::ReadTokenFile("token-file", token_file);
    if (!token.ok()) {
      std::fprintf(stderr, "mq-worker-call: %s\n", std::string(token.status().message()).c_str());
      return 2;
    }
    security.token = *token;
  }
  auto channel = mq::SecureChannel(coordinator, security, grpc::ChannelArguments());
  if (!channel.ok()) {
    std::fprintf(stderr, "mq-worker-call: %s\n", std::string(channel.status().message()).c_str());
    return 2;
  }
  auto stub = mq::v1::WorkerService::NewStub(*channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  if (!session.empty()) ctx.AddMetadata("mq-worker-session", session);
  const std::string call = flags.positional().front();
  grpc::Status status;
  std::string out;
  if (call == "register") {
    mq::v1::RegisterWorkerRequest request;
    request.set_name(name);
    request.set_worker_id(worker_id);
    request.mutable_capabilities()->set_device("cpu");
    request.mutable_capabilities()->add_capabilities("plan");
    request.mutable_capabilities()->add_capabilities("quantize:gptq");
    request.mutable_capabilities()->add_capabilities("quantize:rtn");
    request.mutable_capabilities()->set_gang_address("127.0.0.1:1");
    mq::v1::RegisterWorkerResponse response;
    status = stub->RegisterWorker(&ctx, request, &response);
    out = absl::StrCat("worker_id=", response.worker_id(), "\nsession=", response.session(), "\n");
  } else if (call == "heartbeat") {
    mq::v1::HeartbeatRequest request;
    request.set_worker_id(worker_id);
    mq::v1::HeartbeatResponse response;
    status = stub->Heartbeat(&ctx, request, &response);
  } else if (call == "poll") {
    mq::v1::PollAssignmentRequest request;
    request.set_worker_id(worker_id);
    request.set_wait_ms(wait_ms);
    mq::v1::PollAssignmentResponse response;
    status = stub->PollAssignment(&ctx, request, &response);
    const mq::v1::Assignment& a = response.assignment();
    out = absl::StrCat("assignment_id=", a.assignment_id(), "\njob_id=", a.job_id(),
                       "\nlease_epoch=", a.lease_epoch(), "\nkind=", a.kind(), "\nrank=", a.rank(),
                       "\n");
  } else if (call == "complete") {
    mq::v1::CompleteAssignmentRequest request;
    request.set_worker_id(worker_id);
    request.set_assignment_id(assignment_id);
    request.set_lease_epoch(lease_epoch);
    request.set_error("fabricated failure from mq-worker-call");
    mq::v1::CompleteAssignmentResponse response;
    status = stub->CompleteAssignment(&ctx, request, &response);
  } else if (call == "progress") {
    mq::v1::ReportProgressRequest request;
    request.set_worker_id(worker_id);
    request.set_assignment_id(assignment_id);
    request.set_lease_epoch(lease_epoch);
    request.set_stage("fabricated");
    mq::v1::ReportProgressResponse response;
    status = stub->ReportProgress(&ctx, request, &response);
  } else {
    std::fprintf(stderr,
                 "mq-worker-call: CALL \"%s\": must be register, heartbeat, poll, "
                 "complete or progress\n",
                 call.c_str());
    return 2;
  }
  std::cout << CodeName(status.error_code()) << "\n" << status.error_message() << "\n";
  if (status.ok()) std::cout << out;
  return 0;
}
