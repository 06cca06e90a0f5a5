// The coordinator when its store cannot write (disk full, I/O error): it stops serving
// changes at the first failed write, keeps answering reads and heartbeats, leaves leases and
// scheduling alone, and once the store writes again reloads its state from the store and serves
// again with nothing acknowledged lost.

#include <gtest/gtest.h>

#include <atomic>

#include "server/coordinator.h"
#include "tests/unit/server/faulty_store.h"

namespace mq::server {
namespace {

class StoreFaultsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CoordinatorOptions options;
    options.lease_ms = 1000;
    options.heartbeat_interval_ms = 100;
    options.monotonic_ms = [this] { return now_; };
    options.wall_ms = [this] { return 1700000000000 + now_; };
    auto c = Coordinator::Recover(&store_, options, nullptr);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
  }

  absl::StatusOr<mq::v1::SubmitJobResponse> Submit(const std::string& out) {
    mq::v1::SubmitJobRequest r;
    r.mutable_spec()->set_model_uri("/models/dsv3");
    r.mutable_spec()->set_output_uri(out);
    return coordinator_->SubmitJob(r);
  }

  std::string Register(const std::string& name) {
    mq::v1::RegisterWorkerRequest r;
    r.set_name(name);
    r.mutable_capabilities()->set_device("cpu");
    r.mutable_capabilities()->add_capabilities("plan");
    auto resp = coordinator_->RegisterWorker(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? resp->worker_id() : "";
  }

  mq::v1::Assignment Poll(const std::string& worker_id) {
    mq::v1::PollAssignmentRequest r;
    r.set_worker_id(worker_id);
    auto resp = coordinator_->PollAssignment(r, now_);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? resp->assignment() : mq::v1::Assignment();
  }

  mq::v1::JobRecord Job(const std::string& id) {
    mq::v1::GetJobRequest r;
    r.set_job_id(id);
    auto resp = coordinator_->GetJob(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? resp->job() : mq::v1::JobRecord();
  }

  int64_t now_ = 0;
  FaultyStore store_;
  std::unique_ptr<Coordinator> coordinator_;
};

TEST_F(StoreFaultsTest, FailedWriteStopsServingUntilTheStoreWritesAgain) {
  const std::string w = Register("w1");
  auto first = Submit("/out/a");
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string a = first->job().job_id();
  coordinator_->Tick();
  const mq::v1::Assignment plan = Poll(w);
  ASSERT_EQ(plan.job_id(), a);
  ASSERT_EQ(Job(a).state(), mq::v1::JOB_STATE_PLANNING);
  EXPECT_TRUE(coordinator_->serving());

  store_.failing = true;
  auto second = Submit("/out/b");
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find("state store write failed: IO error: No space left "
                                           "on device"),
            std::string::npos)
      << second.status();
  EXPECT_NE(second.status().message().find("not serving until it can write"), std::string::npos);
  EXPECT_FALSE(coordinator_->serving());
  EXPECT_EQ(coordinator_->CheckServing().code(), absl::StatusCode::kUnavailable);

  // No further write reaches the store; reads and heartbeats are still answered.
  const int writes = store_.writes;
  EXPECT_EQ(Submit("/out/c").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(store_.writes, writes);
  EXPECT_EQ(Job(a).state(), mq::v1::JOB_STATE_PLANNING);
  mq::v1::HeartbeatRequest hb;
  hb.set_worker_id(w);
  hb.set_assignment_id(plan.assignment_id());
  auto beat = coordinator_->Heartbeat(hb);
  ASSERT_TRUE(beat.ok()) << beat.status();
  EXPECT_EQ(beat->cancel_assignment_ids_size(), 0);

  // Out of service, leases do not expire and nothing is scheduled; the store is retried once a
  // second.
  now_ += 5000;
  coordinator_->Tick();
  coordinator_->Tick();  // same instant: no second retry
  EXPECT_EQ(store_.recovers, 1);
  EXPECT_FALSE(coordinator_->serving());
  EXPECT_EQ(Job(a).state(), mq::v1::JOB_STATE_PLANNING);
  EXPECT_EQ(store_.writes, writes);

  // Room again: the next retry reloads the state from the store and serves.
  store_.failing = false;
  now_ += 1000;
  coordinator_->Tick();
  EXPECT_TRUE(coordinator_->serving());
  EXPECT_TRUE(coordinator_->CheckServing().ok());
  mq::v1::ListJobsRequest list;
  auto jobs = coordinator_->ListJobs(list);
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->jobs_size(), 1);  // the refused submits were never acknowledged
  EXPECT_EQ(jobs->jobs(0).job_id(), a);
  const mq::v1::JobRecord job = Job(a);
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_PLANNING);
  EXPECT_EQ(job.attempt(), 1);
  // The worker kept its lease and its assignment (re-delivered as after a restart); its report
  // is accepted.
  mq::v1::ListWorkersResponse workers = coordinator_->ListWorkers();
  ASSERT_EQ(workers.workers_size(), 1);
  EXPECT_EQ(workers.workers(0).state(), mq::v1::WORKER_STATE_BUSY);
  EXPECT_EQ(Poll(w).assignment_id(), plan.assignment_id());
  mq::v1::CompleteAssignmentRequest done;
  done.set_worker_id(w);
  done.set_assignment_id(plan.assignment_id());
  done.set_lease_epoch(plan.lease_epoch());
  for (int i = 0; i < 3; ++i) done.mutable_plan()->add_layers()->set_index(i);
  auto completed = coordinator_->CompleteAssignment(done);
  ASSERT_TRUE(completed.ok()) << completed.status();
  EXPECT_NE(Job(a).state(), mq::v1::JOB_STATE_PLANNING);
  auto third = Submit("/out/d");
  EXPECT_TRUE(third.ok()) << third.status();
}

TEST_F(StoreFaultsTest, StoreStillFailingKeepsTheCoordinatorOutOfService) {
  store_.failing = true;
  ASSERT_FALSE(Submit("/out/a").ok());
  for (int i = 0; i < 3; ++i) {
    now_ += 1000;
    coordinator_->Tick();
  }
  EXPECT_EQ(store_.recovers, 3);
  EXPECT_FALSE(coordinator_->serving());
  EXPECT_NE(coordinator_->CheckServing().message().find("No space left on device"),
            std::string::npos);
}

TEST_F(StoreFaultsTest, AFullDeviceIsNoticedBeforeAWriteFails) {
  coordinator_->Tick();
  EXPECT_TRUE(coordinator_->serving());
  store_.full = true;
  now_ += 1000;
  coordinator_->Tick();
  EXPECT_FALSE(coordinator_->serving());
  const int writes = store_.writes;
  auto refused = Submit("/out/a");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(refused.status().message().find("No space left on device"), std::string::npos);
  EXPECT_EQ(store_.writes, writes);
  store_.full = false;
  now_ += 1000;
  coordinator_->Tick();
  EXPECT_TRUE(coordinator_->serving());
  EXPECT_TRUE(Submit("/out/a").ok());
}

TEST(StoreFaultsStartup, RecoverOnAStoreThatCannotWriteFailsWithTheCause) {
  FaultyStore store;
  store.failing = true;
  auto c = Coordinator::Recover(&store, CoordinatorOptions(), nullptr);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(c.status().message().find("No space left on device"), std::string::npos);
}

}  // namespace
}  // namespace mq::server
