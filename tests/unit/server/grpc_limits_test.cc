// The gRPC adapters' bounds, over a real server on loopback: WatchJob streams beyond
// max_watch_streams and PollAssignment long polls beyond max_long_polls are refused with
// RESOURCE_EXHAUSTED naming the flag; open watches get every change and end when the job
// ends; while the coordinator is not serving (its store cannot write) changes answer
// UNAVAILABLE and reads and heartbeats are still answered.

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <thread>

#include "server/grpc_services.h"
#include "tests/unit/server/loopback_server.h"
#include "tests/unit/server/faulty_store.h"

namespace mq::server {
namespace {

class GrpcLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = Coordinator::Recover(&store_, CoordinatorOptions(), nullptr);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
    ServiceLimits limits;
    limits.max_watch_streams = 2;
    limits.max_long_polls = 1;
    jobs_ = std::make_unique<JobServiceImpl>(coordinator_.get(), nullptr, limits);
    workers_ = std::make_unique<WorkerServiceImpl>(coordinator_.get(), nullptr, limits);
    LoopbackServer loopback = StartLoopbackServer(jobs_.get(), workers_.get());
    server_ = std::move(loopback.server);
    ASSERT_NE(loopback.job_stub, nullptr);
    job_stub_ = std::move(loopback.job_stub);
    worker_stub_ = std::move(loopback.worker_stub);
  }

  void TearDown() override {
    jobs_->Shutdown();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  }

  static void Deadline(grpc::ClientContext* ctx, int seconds = 10) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  }

  grpc::Status Submit(std::string* job_id, const std::string& output = "/out/limits") {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    mq::v1::SubmitJobRequest r;
    r.mutable_spec()->set_model_uri("/models/dsv3");
    r.mutable_spec()->set_output_uri(output);
    mq::v1::SubmitJobResponse resp;
    grpc::Status s = job_stub_->SubmitJob(&ctx, r, &resp);
    if (job_id) *job_id = resp.job().job_id();
    return s;
  }

  grpc::Status Register(std::string* worker_id) {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    mq::v1::RegisterWorkerRequest r;
    r.set_name("w1");
    r.mutable_capabilities()->set_device("cpu");
    mq::v1::RegisterWorkerResponse resp;
    grpc::Status s = worker_stub_->RegisterWorker(&ctx, r, &resp);
    if (worker_id) *worker_id = resp.worker_id();
    if (s.ok()) session_ = resp.session();
    return s;
  }

  // Every worker call after registration carries its session.
  void Deadline(grpc::ClientContext* ctx, const std::string& session, int seconds = 10) {
    Deadline(ctx, seconds);
    ctx->AddMetadata("mq-worker-session", session);
  }

  std::string session_;

  FaultyStore store_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<JobServiceImpl> jobs_;
  std::unique_ptr<WorkerServiceImpl> workers_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<mq::v1::JobService::Stub> job_stub_;
  std::unique_ptr<mq::v1::WorkerService::Stub> worker_stub_;
};

TEST_F(GrpcLimitsTest, WatchesBeyondTheLimitAreRefusedAndOpenOnesFollowTheJob) {
  std::string job_id;
  ASSERT_TRUE(Submit(&job_id).ok());
  mq::v1::WatchJobRequest request;
  request.set_job_id(job_id);
  grpc::ClientContext ctx1, ctx2, ctx3;
  for (auto* ctx : {&ctx1, &ctx2, &ctx3}) Deadline(ctx, 30);
  auto w1 = job_stub_->WatchJob(&ctx1, request);
  auto w2 = job_stub_->WatchJob(&ctx2, request);
  mq::v1::WatchJobResponse update;
  ASSERT_TRUE(w1->Read(&update));
  EXPECT_EQ(update.job().state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_GE(update.events_size(), 1);
  ASSERT_TRUE(w2->Read(&update));

  auto w3 = job_stub_->WatchJob(&ctx3, request);
  EXPECT_FALSE(w3->Read(&update));
  grpc::Status refused = w3->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.error_message().find("--max-watch-streams"), std::string::npos)
      << refused.error_message();

  // A change reaches both open watches, with only the new events; the end closes them OK.
  grpc::ClientContext cancel_ctx;
  Deadline(&cancel_ctx);
  mq::v1::CancelJobRequest cancel;
  cancel.set_job_id(job_id);
  mq::v1::CancelJobResponse cancelled;
  ASSERT_TRUE(job_stub_->CancelJob(&cancel_ctx, cancel, &cancelled).ok());
  for (auto* w : {w1.get(), w2.get()}) {
    mq::v1::JobState last = mq::v1::JOB_STATE_UNSPECIFIED;
    while (w->Read(&update)) {
      last = update.job().state();
      for (const auto& e : update.events()) EXPECT_GE(e.seq(), 1);
    }
    EXPECT_EQ(last, mq::v1::JOB_STATE_CANCELLED);
    EXPECT_TRUE(w->Finish().ok());
  }
}

TEST_F(GrpcLimitsTest, LongPollsBeyondTheLimitAreRefused) {
  std::string worker_id;
  ASSERT_TRUE(Register(&worker_id).ok());
  mq::v1::PollAssignmentRequest poll;
  poll.set_worker_id(worker_id);
  poll.set_wait_ms(3000);
  auto first = std::async(std::launch::async, [&] {
    grpc::ClientContext ctx;
    Deadline(&ctx, session_);
    mq::v1::PollAssignmentResponse resp;
    return worker_stub_->PollAssignment(&ctx, poll, &resp);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the first poll is waiting
  grpc::ClientContext ctx;
  Deadline(&ctx, session_);
  mq::v1::PollAssignmentResponse resp;
  grpc::Status second = worker_stub_->PollAssignment(&ctx, poll, &resp);
  EXPECT_EQ(second.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(second.error_message().find("--max-long-polls"), std::string::npos)
      << second.error_message();
  EXPECT_TRUE(first.get().ok());
  // The slot is free again.
  grpc::ClientContext again_ctx;
  Deadline(&again_ctx, session_);
  poll.set_wait_ms(0);
  EXPECT_TRUE(worker_stub_->PollAssignment(&again_ctx, poll, &resp).ok());
}

TEST_F(GrpcLimitsTest, NotServingRefusesChangesAndAnswersReads) {
  std::string job_id, worker_id;
  ASSERT_TRUE(Submit(&job_id).ok());
  ASSERT_TRUE(Register(&worker_id).ok());
  store_.failing = true;
  grpc::Status s = Submit(nullptr, "/out/limits-2");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(s.error_message().find("state store write failed: IO error: No space left on device"),
            std::string::npos)
      << s.error_message();
  // Refused in the adapter, before the coordinator: registering is a change.
  EXPECT_EQ(Register(nullptr).error_code(), grpc::StatusCode::UNAVAILABLE);
  grpc::ClientContext get_ctx;
  Deadline(&get_ctx);
  mq::v1::GetJobRequest get;
  get.set_job_id(job_id);
  mq::v1::GetJobResponse job;
  EXPECT_TRUE(job_stub_->GetJob(&get_ctx, get, &job).ok());
  grpc::ClientContext hb_ctx;
  Deadline(&hb_ctx, session_);
  mq::v1::HeartbeatRequest hb;
  hb.set_worker_id(worker_id);
  mq::v1::HeartbeatResponse beat;
  EXPECT_TRUE(worker_stub_->Heartbeat(&hb_ctx, hb, &beat).ok());

  store_.failing = false;
  for (int i = 0; i < 30 && !coordinator_->serving(); ++i) {
    coordinator_->Tick();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(coordinator_->serving());
  EXPECT_TRUE(Submit(nullptr, "/out/limits-3").ok());
}

}  // namespace
}  // namespace mq::server
