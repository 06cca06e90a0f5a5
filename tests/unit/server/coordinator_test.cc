// The coordinator's state machine in-process, with a fake clock and a store shared across
// "restarts": leases, reassignment, fencing, idempotent reports, cancellation, recovery.

#include "server/coordinator.h"

#include <gtest/gtest.h>

#include "mq/v1/job_service.pb.h"

namespace mq::server {
namespace {

using mq::v1::JobState;

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = NewInMemoryStore();
    Restart();
  }

  void Restart() {
    coordinator_.reset();
    CoordinatorOptions options;
    options.lease_ms = 1000;
    options.heartbeat_interval_ms = 100;
    options.monotonic_ms = [this] { return now_; };
    options.wall_ms = [this] { return 1700000000000 + now_; };
    auto c = Coordinator::Recover(store_.get(), options, nullptr);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
  }

  std::string Register(const std::string& name, const std::string& id = "") {
    mq::v1::RegisterWorkerRequest r;
    r.set_name(name);
    r.set_worker_id(id);
    r.mutable_capabilities()->set_device("cpu");
    r.mutable_capabilities()->add_capabilities("plan");
    auto resp = coordinator_->RegisterWorker(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp->worker_id();
  }

  std::string Submit(const std::string& key = "") {
    mq::v1::SubmitJobRequest r;
    r.mutable_spec()->set_model_uri("/models/dsv3");
    r.mutable_spec()->set_output_uri("/out/dsv3-w4");
    r.set_idempotency_key(key);
    auto resp = coordinator_->SubmitJob(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp->job().job_id();
  }

  mq::v1::Assignment Poll(const std::string& worker_id) {
    mq::v1::PollAssignmentRequest r;
    r.set_worker_id(worker_id);
    auto resp = coordinator_->PollAssignment(r, now_);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp->assignment();
  }

  absl::Status Complete(const std::string& worker_id, const mq::v1::Assignment& a,
                        int problems = 0) {
    mq::v1::CompleteAssignmentRequest r;
    r.set_worker_id(worker_id);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch());
    mq::v1::InspectReport* plan = r.mutable_plan();
    for (int i = 0; i < 4; ++i) plan->add_layers()->set_index(i);
    for (int i = 0; i < problems; ++i) {
      plan->add_problems()->set_message("problem " + std::to_string(i));
    }
    return coordinator_->CompleteAssignment(r).status();
  }

  mq::v1::GetJobResponse Get(const std::string& job_id) {
    mq::v1::GetJobRequest r;
    r.set_job_id(job_id);
    r.set_include_events(true);
    auto resp = coordinator_->GetJob(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return *resp;
  }

  void Heartbeat(const std::string& worker_id) {
    mq::v1::HeartbeatRequest r;
    r.set_worker_id(worker_id);
    ASSERT_TRUE(coordinator_->Heartbeat(r).ok());
  }

  int64_t now_ = 0;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Coordinator> coordinator_;
};

TEST_F(CoordinatorTest, SubmitFillsDefaultsAndQueues) {
  const std::string id = Submit();
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job.spec().method(), mq::v1::METHOD_GPTQ);
  EXPECT_EQ(job.spec().bits(), 4);
  EXPECT_EQ(job.spec().group_size(), 128);
  EXPECT_TRUE(job.spec().symmetric());
  EXPECT_TRUE(job.spec().act_order());
  EXPECT_EQ(job.spec().gang_size(), 1);
  EXPECT_EQ(job.spec().max_attempts(), 3);
  EXPECT_DOUBLE_EQ(job.spec().damping(), 0.01);
  EXPECT_EQ(job.spec().calibration().num_samples(), 512);
  EXPECT_EQ(job.spec().calibration().max_sequence_length(), 4096);
}

TEST_F(CoordinatorTest, PlanFlowEndsWithMissingCapability) {
  const std::string w = Register("w1");
  const std::string id = Submit();
  coordinator_->Tick();
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_PLANNING);
  auto a = Poll(w);
  ASSERT_EQ(a.job_id(), id);
  EXPECT_EQ(a.kind(), mq::v1::ASSIGNMENT_KIND_PLAN);
  EXPECT_EQ(a.spec().model_uri(), "/models/dsv3");
  EXPECT_TRUE(Poll(w).assignment_id().empty());  // delivered once
  ASSERT_TRUE(Complete(w, a).ok());
  auto job = Get(id);
  EXPECT_EQ(job.job().state(), mq::v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.job().missing_capability(), "quantize:gptq");
  EXPECT_EQ(job.job().progress().layers_total(), 4);
  ASSERT_EQ(job.attempts_size(), 1);
  EXPECT_EQ(job.attempts(0).state(), mq::v1::ATTEMPT_STATE_SUCCEEDED);
  // A repeated report is idempotent.
  EXPECT_TRUE(Complete(w, a).ok());
  EXPECT_EQ(Get(id).job().event_count(), job.job().event_count());
}

TEST_F(CoordinatorTest, ProblemsFailTheJob) {
  const std::string w = Register("w1");
  const std::string id = Submit();
  coordinator_->Tick();
  ASSERT_TRUE(Complete(w, Poll(w), /*problems=*/5).ok());
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_FAILED);
  EXPECT_NE(job.message().find("found 5 problems"), std::string::npos) << job.message();
  EXPECT_EQ(job.missing_capability(), "");
}

TEST_F(CoordinatorTest, SilentWorkerLosesItsWorkToAnother) {
  const std::string w1 = Register("w1");
  now_ += 10;
  const std::string w2 = Register("w2");
  const std::string id = Submit();
  coordinator_->Tick();
  auto a1 = Poll(w1);
  ASSERT_EQ(a1.job_id(), id);
  // w2 keeps heartbeating, w1 goes silent.
  for (int i = 0; i < 10; ++i) {
    now_ += 100;
    Heartbeat(w2);
    coordinator_->Tick();
  }
  now_ += 100;
  Heartbeat(w2);
  coordinator_->Tick();
  auto workers = coordinator_->ListWorkers();
  for (const auto& w : workers.workers()) {
    EXPECT_EQ(w.state(), w.worker().worker_id() == w1 ? mq::v1::WORKER_STATE_DEAD
                                                      : mq::v1::WORKER_STATE_BUSY);
  }
  auto a2 = Poll(w2);
  ASSERT_EQ(a2.job_id(), id);
  EXPECT_EQ(a2.attempt(), 2);
  // The zombie's late report is fenced off.
  absl::Status stale = Complete(w1, a1);
  EXPECT_EQ(stale.code(), absl::StatusCode::kAborted) << stale;
  ASSERT_TRUE(Complete(w2, a2).ok());
  auto job = Get(id);
  ASSERT_EQ(job.attempts_size(), 2);
  EXPECT_EQ(job.attempts(0).state(), mq::v1::ATTEMPT_STATE_ABORTED);
  EXPECT_EQ(job.attempts(1).state(), mq::v1::ATTEMPT_STATE_SUCCEEDED);
  // The zombie heartbeats again: it is alive and idle, and told to drop its old assignment.
  mq::v1::HeartbeatRequest hb;
  hb.set_worker_id(w1);
  hb.set_assignment_id(a1.assignment_id());
  auto resp = coordinator_->Heartbeat(hb);
  ASSERT_TRUE(resp.ok());
  ASSERT_EQ(resp->cancel_assignment_ids_size(), 1);
  EXPECT_EQ(resp->cancel_assignment_ids(0), a1.assignment_id());
}

TEST_F(CoordinatorTest, AttemptsAreBounded) {
  const std::string id = Submit();
  for (int attempt = 1; attempt <= 3; ++attempt) {
    const std::string w = Register("w" + std::to_string(attempt));
    coordinator_->Tick();
    ASSERT_EQ(Poll(w).attempt(), attempt);
    now_ += 2000;  // silent past the lease
    coordinator_->Tick();
  }
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_FAILED);
  EXPECT_NE(job.message().find("gave up after 3 attempts"), std::string::npos) << job.message();
  // Resume gives a fresh budget.
  mq::v1::ResumeJobRequest r;
  r.set_job_id(id);
  ASSERT_TRUE(coordinator_->ResumeJob(r).ok());
  const std::string w = Register("fresh");
  coordinator_->Tick();
  EXPECT_EQ(Poll(w).attempt(), 4);
}

TEST_F(CoordinatorTest, RestartKeepsJobsWorkersAndLiveAssignments) {
  const std::string w = Register("w1");
  const std::string id = Submit("key-1");
  coordinator_->Tick();
  auto a = Poll(w);
  const auto before = Get(id);
  const int64_t epoch = coordinator_->epoch();
  Restart();
  EXPECT_EQ(coordinator_->epoch(), epoch + 1);
  auto after = Get(id);
  EXPECT_EQ(after.job().SerializeAsString(), before.job().SerializeAsString());
  ASSERT_EQ(after.events_size(), before.events_size());
  // The worker (same id) reports the work it was doing; nothing is redone.
  Heartbeat(w);
  ASSERT_TRUE(Complete(w, a).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FAILED);
  EXPECT_EQ(Get(id).job().attempt(), 1);
  // Idempotency keys survive too.
  mq::v1::SubmitJobRequest again;
  again.mutable_spec()->set_model_uri("/models/dsv3");
  again.mutable_spec()->set_output_uri("/out/dsv3-w4");
  again.set_idempotency_key("key-1");
  auto resp = coordinator_->SubmitJob(again);
  ASSERT_TRUE(resp.ok());
  EXPECT_FALSE(resp->created());
  EXPECT_EQ(resp->job().job_id(), id);
}

TEST_F(CoordinatorTest, WorkerThatNeverReturnsAfterRestartIsExpired) {
  const std::string w = Register("w1");
  const std::string id = Submit();
  coordinator_->Tick();
  Poll(w);
  Restart();
  now_ += 1500;
  coordinator_->Tick();
  auto job = Get(id);
  EXPECT_EQ(job.job().state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job.attempts(0).state(), mq::v1::ATTEMPT_STATE_ABORTED);
}

TEST_F(CoordinatorTest, CancelStopsTheWorkersAssignment) {
  const std::string w = Register("w1");
  const std::string id = Submit();
  coordinator_->Tick();
  auto a = Poll(w);
  mq::v1::CancelJobRequest c;
  c.set_job_id(id);
  ASSERT_TRUE(coordinator_->CancelJob(c).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(coordinator_->CancelJob(c).status().code(), absl::StatusCode::kFailedPrecondition);
  mq::v1::HeartbeatRequest hb;
  hb.set_worker_id(w);
  hb.set_assignment_id(a.assignment_id());
  auto resp = coordinator_->Heartbeat(hb);
  ASSERT_TRUE(resp.ok());
  EXPECT_EQ(resp->cancel_assignment_ids_size(), 1);
  EXPECT_EQ(Complete(w, a).code(), absl::StatusCode::kAborted);
}

TEST_F(CoordinatorTest, UnknownIdsAreNotFound) {
  mq::v1::GetJobRequest g;
  g.set_job_id("j-00000000000000000000000000");
  EXPECT_EQ(coordinator_->GetJob(g).status().code(), absl::StatusCode::kNotFound);
  mq::v1::HeartbeatRequest hb;
  hb.set_worker_id("w-00000000000000000000000000");
  EXPECT_EQ(coordinator_->Heartbeat(hb).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, InspectionWithoutWorkersIsUnavailable) {
  mq::v1::InspectModelRequest r;
  r.set_model_uri("/models/x");
  auto resp = coordinator_->InspectModel(r, now_ + 100);
  EXPECT_EQ(resp.status().code(), absl::StatusCode::kUnavailable) << resp.status();
}

TEST_F(CoordinatorTest, ListJobsPagesNewestFirst) {
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    ids.push_back(Submit());
    now_ += 2;
  }
  mq::v1::ListJobsRequest r;
  r.set_page_size(2);
  std::vector<std::string> seen;
  while (true) {
    auto resp = coordinator_->ListJobs(r);
    ASSERT_TRUE(resp.ok());
    for (const auto& j : resp->jobs()) seen.push_back(j.job_id());
    if (resp->next_page_token().empty()) break;
    r.set_page_token(resp->next_page_token());
  }
  std::reverse(ids.begin(), ids.end());
  EXPECT_EQ(seen, ids);
}

}  // namespace
}  // namespace mq::server
