// The coordinator's path policy (--allow-read / --allow-write): submits, resumes and inspections
// outside the roots are refused naming the field, the path, the roots and the flag; every
// assignment carries the policy for the worker to check again.

#include <gtest/gtest.h>

#include "server/coordinator.h"
#include "server/validation.h"

namespace mq::server {
namespace {

class CoordinatorPathsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = NewInMemoryStore();
    auto policy = MakePathPolicy({"/data/models", "/data/sets/"}, {"/data/out"});
    ASSERT_TRUE(policy.ok()) << policy.status();
    CoordinatorOptions options;
    options.monotonic_ms = [] { return int64_t{0}; };
    options.wall_ms = [] { return int64_t{1700000000000}; };
    options.path_policy = *policy;
    auto c = Coordinator::Recover(store_.get(), options, nullptr);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
  }

  absl::StatusOr<mq::v1::SubmitJobResponse> Submit(const std::string& model,
                                                   const std::string& output,
                                                   const std::string& dataset = "") {
    mq::v1::SubmitJobRequest r;
    r.mutable_spec()->set_model_uri(model);
    r.mutable_spec()->set_output_uri(output);
    r.mutable_spec()->mutable_calibration()->set_dataset_uri(dataset);
    return coordinator_->SubmitJob(r);
  }

  std::unique_ptr<Store> store_;
  std::unique_ptr<Coordinator> coordinator_;
};

TEST(MakePathPolicy, NormalisesAndRefusesRelativeRoots) {
  auto none = MakePathPolicy({}, {});
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->enforced());
  auto p = MakePathPolicy({"file:///data//models/./"}, {});
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->enforced());
  ASSERT_EQ(p->read_roots_size(), 1);
  EXPECT_EQ(p->read_roots(0), "/data/models");
  EXPECT_EQ(p->write_roots_size(), 0);
  auto relative = MakePathPolicy({}, {"out"});
  ASSERT_FALSE(relative.ok());
  EXPECT_NE(relative.status().message().find("--allow-write"), std::string::npos);
  EXPECT_FALSE(MakePathPolicy({""}, {}).ok());
}

TEST_F(CoordinatorPathsTest, SubmitInsideTheRootsIsAccepted) {
  auto r = Submit("/data/models/dsv3", "file:///data/out/j1", "/data/sets/c.jsonl");
  EXPECT_TRUE(r.ok()) << r.status();
}

TEST_F(CoordinatorPathsTest, SubmitOutsideTheRootsIsRefusedNamingFieldPathAndFlag) {
  auto out = Submit("/data/models/dsv3", "/etc/x");
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(out.status().message(),
            "spec.output_uri = \"/etc/x\": outside the allowed write roots (/data/out); see "
            "mq-coordinator --allow-write");
  auto prefix = Submit("/data/models/dsv3", "/data/out2/j");
  ASSERT_FALSE(prefix.ok());
  auto model = Submit("/data/models/../secrets/m", "/data/out/j");
  ASSERT_FALSE(model.ok());
  EXPECT_NE(model.status().message().find("spec.model_uri"), std::string::npos);
  EXPECT_NE(model.status().message().find("--allow-read"), std::string::npos);
  auto dataset = Submit("/data/models/dsv3", "/data/out/j", "/etc/shadow");
  ASSERT_FALSE(dataset.ok());
  EXPECT_NE(dataset.status().message().find("spec.calibration.dataset_uri"), std::string::npos);
  mq::v1::ListJobsRequest list;
  auto jobs = coordinator_->ListJobs(list);
  ASSERT_TRUE(jobs.ok());
  EXPECT_EQ(jobs->jobs_size(), 0);
}

TEST_F(CoordinatorPathsTest, InspectionOutsideTheReadRootsIsRefused) {
  mq::v1::InspectModelRequest r;
  r.set_model_uri("/home/someone/model");
  auto resp = coordinator_->InspectModel(r, 0);
  ASSERT_FALSE(resp.ok());
  EXPECT_EQ(resp.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(resp.status().message().find("model_uri"), std::string::npos);
}

TEST_F(CoordinatorPathsTest, AssignmentsCarryThePolicy) {
  mq::v1::RegisterWorkerRequest reg;
  reg.set_name("w1");
  reg.mutable_capabilities()->set_device("cpu");
  reg.mutable_capabilities()->add_capabilities("plan");
  auto w = coordinator_->RegisterWorker(reg);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE(Submit("/data/models/dsv3", "/data/out/j1").ok());
  coordinator_->Tick();
  mq::v1::PollAssignmentRequest poll;
  poll.set_worker_id(w->worker_id());
  auto a = coordinator_->PollAssignment(poll, 0);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->assignment().kind(), mq::v1::ASSIGNMENT_KIND_PLAN);
  const mq::v1::PathPolicy& p = a->assignment().path_policy();
  EXPECT_TRUE(p.enforced());
  ASSERT_EQ(p.read_roots_size(), 2);
  EXPECT_EQ(p.read_roots(1), "/data/sets");
  ASSERT_EQ(p.write_roots_size(), 1);
  EXPECT_EQ(p.write_roots(0), "/data/out");
}

}  // namespace
}  // namespace mq::server
