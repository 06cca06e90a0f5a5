// The coordinator's state machine in-process, with a fake clock and a store shared across
// "restarts": leases, reassignment, fencing, idempotent reports, cancellation, recovery.

#include "server/coordinator.h"

#include <gtest/gtest.h>
#include <prometheus/client_metric.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/error_text.h"
#include "mq/v1/job_service.pb.h"
#include "server/scheduling/retry.h"

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
    options.retain_ended_jobs = retain_jobs_;
    options.retain_ended_ms = retain_ms_;
    options.ended_assignment_grace_ms = grace_ms_;
    auto c = Coordinator::Recover(store_.get(), options, &metrics_);
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

  // A fresh output directory per submit (live jobs may not share one): /out/dsv3-w4, then
  // /out/dsv3-w4-2, ...
  std::string NextOutput() {
    ++outputs_;
    return outputs_ == 1 ? "/out/dsv3-w4" : "/out/dsv3-w4-" + std::to_string(outputs_);
  }

  // Jobs of these tests end at finalization (no EVALUATING; EvaluationAfterFinalize covers it).
  std::string Submit(const std::string& key = "") {
    mq::v1::SubmitJobRequest r;
    r.mutable_spec()->set_model_uri("/models/dsv3");
    r.mutable_spec()->set_output_uri(NextOutput());
    r.mutable_spec()->mutable_eval()->set_num_samples(0);
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

  // The value of the series `name`{label=value} (any labels when `label` is empty), or -1
  // when the registry has no such series.
  double Metric(const std::string& name, const std::string& label = "",
                const std::string& value = "") {
    for (const prometheus::MetricFamily& f : registry_.Collect()) {
      if (f.name != name) continue;
      for (const prometheus::ClientMetric& m : f.metric) {
        bool match = label.empty();
        for (const prometheus::ClientMetric::Label& l : m.label) {
          match = match || (l.name == label && l.value == value);
        }
        if (match) return f.type == prometheus::MetricType::Gauge ? m.gauge.value : m.counter.value;
      }
    }
    return -1;
  }

  // Shared across "restarts", as one process's registry would not be: Recover must set every
  // gauge from the recovered state.
  prometheus::Registry registry_;
  CoordinatorMetrics metrics_{registry_};
  int64_t now_ = 0;
  int outputs_ = 0;
  int64_t retain_jobs_ = 1000;
  int64_t retain_ms_ = 0;
  int64_t grace_ms_ = 60000;
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
  EXPECT_EQ(job.spec().calibration().min_expert_tokens(), 16);
  EXPECT_FALSE(job.spec().calibration().rare_expert_rtn());
}

TEST_F(CoordinatorTest, ActOrderAndAwqSettingsFollowTheMethod) {
  auto submit = [&](mq::v1::Method method, const std::string& output,
                    const std::function<void(mq::v1::JobSpec&)>& change) {
    mq::v1::SubmitJobRequest r;
    r.mutable_spec()->set_model_uri("/models/dsv3");
    r.mutable_spec()->set_output_uri(output);
    r.mutable_spec()->set_method(method);
    change(*r.mutable_spec());
    return coordinator_->SubmitJob(r);
  };
  // RTN and AWQ (RTN of the scaled weights) have no column order; mq-client always sends it.
  auto rtn = submit(mq::v1::METHOD_RTN, "/out/rtn", [](auto& s) { s.set_act_order(true); });
  ASSERT_TRUE(rtn.ok()) << rtn.status();
  EXPECT_FALSE(rtn->job().spec().act_order());
  EXPECT_FALSE(rtn->job().spec().has_awq());
  auto awq = submit(mq::v1::METHOD_AWQ, "/out/awq", [](auto& s) { s.set_act_order(true); });
  ASSERT_TRUE(awq.ok()) << awq.status();
  EXPECT_FALSE(awq->job().spec().act_order());
  ASSERT_TRUE(awq->job().spec().awq().has_grid());
  EXPECT_EQ(awq->job().spec().awq().grid(), 20);
  EXPECT_EQ(awq->job().spec().awq().max_tokens(), 32768);
  // AWQ-GPTQ keeps GPTQ's default; a grid of 0 (only s = 1) is kept, not defaulted.
  auto awq_gptq = submit(mq::v1::METHOD_AWQ_GPTQ, "/out/awq-gptq", [](auto& s) {
    s.mutable_awq()->set_grid(0);
    s.mutable_awq()->set_max_tokens(1000);
  });
  ASSERT_TRUE(awq_gptq.ok()) << awq_gptq.status();
  EXPECT_TRUE(awq_gptq->job().spec().act_order());
  EXPECT_EQ(awq_gptq->job().spec().awq().grid(), 0);
  EXPECT_EQ(awq_gptq->job().spec().awq().max_tokens(), 1000);
  EXPECT_EQ(Get(awq_gptq->job().job_id()).job().spec().method(), mq::v1::METHOD_AWQ_GPTQ);

  auto gptq =
      submit(mq::v1::METHOD_GPTQ, "/out/gptq", [](auto& s) { s.mutable_awq()->set_grid(5); });
  EXPECT_EQ(gptq.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gptq.status().message(),
            "spec.awq = {grid: 5}: applies to methods awq and awq-gptq only (spec.method is gptq)");
  auto rtn_tokens =
      submit(mq::v1::METHOD_RTN, "/out/rtn2", [](auto& s) { s.mutable_awq()->set_max_tokens(64); });
  EXPECT_EQ(rtn_tokens.status().message(),
            "spec.awq = {max_tokens: 64}: applies to methods awq and awq-gptq only (spec.method "
            "is rtn)");
  auto grid =
      submit(mq::v1::METHOD_AWQ, "/out/grid", [](auto& s) { s.mutable_awq()->set_grid(101); });
  EXPECT_EQ(grid.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(grid.status().message(),
            "spec.awq.grid = 101: must be in [0, 100] (0 keeps only s = 1)");
  auto tokens = submit(mq::v1::METHOD_AWQ_GPTQ, "/out/tokens",
                       [](auto& s) { s.mutable_awq()->set_max_tokens(-1); });
  EXPECT_EQ(tokens.status().message(),
            "spec.awq.max_tokens = -1: must be in [1, 16777216] (0 means 32768)");
  auto asymmetric =
      submit(mq::v1::METHOD_AWQ, "/out/asym", [](auto& s) { s.set_symmetric(false); });
  EXPECT_EQ(asymmetric.status().code(), absl::StatusCode::kInvalidArgument);
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

TEST_F(CoordinatorTest, RequestProblemsAreCalledRequestProblems) {
  const std::string w = Register("w1");
  auto fail_with = [&](const std::vector<std::string>& wheres) {
    const std::string id = Submit();
    coordinator_->Tick();
    const mq::v1::Assignment a = Poll(w);
    mq::v1::CompleteAssignmentRequest r;
    r.set_worker_id(w);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch());
    for (const std::string& where : wheres) {
      mq::v1::Problem* p = r.mutable_plan()->add_problems();
      p->set_where(where);
      p->set_message("bad");
    }
    EXPECT_TRUE(coordinator_->CompleteAssignment(r).ok());
    return Get(id).job().message();
  };
  EXPECT_EQ(fail_with({"request.calibration.dataset_uri"})
                .rfind("the request has 1 problem: request.calibration.dataset_uri: bad", 0),
            0u);
  EXPECT_EQ(fail_with({"config.json", "x.safetensors"})
                .rfind("the checkpoint check found 2 problems: config.json: bad", 0),
            0u);
  EXPECT_EQ(fail_with({"request.group_size", "config.json"})
                .rfind("planning found 2 problems (1 in the request, 1 in the checkpoint): ", 0),
            0u);
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
    EXPECT_EQ(w.state(),
              w.worker().worker_id() == w1 ? mq::v1::WORKER_STATE_DEAD : mq::v1::WORKER_STATE_BUSY);
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
  again.mutable_spec()->mutable_eval()->set_num_samples(0);  // the same spec as Submit's
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

TEST_F(CoordinatorTest, RecoveredWorkersAreUnknownUntilHeardFrom) {
  const std::string w1 = Register("w1");
  const std::string w2 = Register("w2");
  const std::string id = Submit();
  coordinator_->Tick();
  Poll(w1);
  Poll(w2);
  EXPECT_EQ(Metric("mq_workers", "state", "busy"), 1);  // planning the job
  EXPECT_EQ(Metric("mq_workers", "state", "idle"), 1);
  EXPECT_EQ(Metric("mq_workers", "state", "unknown"), 0);
  now_ += 10;
  Restart();  // either worker may have died meanwhile
  EXPECT_EQ(Metric("mq_workers", "state", "busy"), 0);
  EXPECT_EQ(Metric("mq_workers", "state", "idle"), 0);
  EXPECT_EQ(Metric("mq_workers", "state", "unknown"), 2);
  EXPECT_EQ(Metric("mq_jobs", "state", "planning"), 1);
  // w2 heartbeats: idle from the next tick on (a heartbeat changes no state).
  now_ += 100;
  Heartbeat(w2);
  coordinator_->Tick();
  EXPECT_EQ(Metric("mq_workers", "state", "idle"), 1);
  EXPECT_EQ(Metric("mq_workers", "state", "unknown"), 1);
  // w1 never calls: declared dead when its lease runs out, and no longer counted.
  for (int i = 0; i < 12; ++i) {
    now_ += 100;
    Heartbeat(w2);
    coordinator_->Tick();
  }
  EXPECT_EQ(Metric("mq_workers", "state", "unknown"), 0);
  EXPECT_EQ(Metric("mq_workers", "state", "idle") + Metric("mq_workers", "state", "busy"), 1);
  EXPECT_EQ(Metric("mq_workers_lost_total"), 1);
  EXPECT_EQ(Get(id).attempts(0).state(), mq::v1::ATTEMPT_STATE_ABORTED);
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

// ---------------------------------------------------------------------------------------------
// Ownership (one output per live job), unique worker names, retention.

absl::StatusOr<mq::v1::SubmitJobResponse> SubmitTo(Coordinator& c, const std::string& output,
                                                   const std::string& key = "") {
  mq::v1::SubmitJobRequest r;
  r.mutable_spec()->set_model_uri("/models/dsv3");
  r.mutable_spec()->set_output_uri(output);
  r.set_idempotency_key(key);
  return c.SubmitJob(r);
}

absl::Status CancelIt(Coordinator& c, const std::string& job_id) {
  mq::v1::CancelJobRequest r;
  r.set_job_id(job_id);
  return c.CancelJob(r).status();
}

absl::Status ResumeIt(Coordinator& c, const std::string& job_id) {
  mq::v1::ResumeJobRequest r;
  r.set_job_id(job_id);
  return c.ResumeJob(r).status();
}

TEST_F(CoordinatorTest, OverlappingOutputsOfLiveJobsAreRefusedNamingTheJob) {
  auto first = SubmitTo(*coordinator_, "/x/out");
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string owner = first->job().job_id();
  struct Case {
    std::string output;
    std::string relation;  // empty: accepted
  };
  const std::vector<Case> cases = {
      {"/x/out", "spec.output_uri = /x/out is the output /x/out of job "},
      {"file:///x//out/./", "spec.output_uri = /x/out is the output /x/out of job "},
      {"/x/y/../out/", "spec.output_uri = /x/out is the output /x/out of job "},
      {"/x/out/sub", "spec.output_uri = /x/out/sub lies inside the output /x/out of job "},
      {"/x", "spec.output_uri = /x contains the output /x/out of job "},
      {"/", "spec.output_uri = / contains the output /x/out of job "},
      {"/x/out2", ""},  // a sibling that shares a prefix is not inside
      {"/x/ou", ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.output);
    auto resp = SubmitTo(*coordinator_, c.output);
    if (c.relation.empty()) {
      ASSERT_TRUE(resp.ok()) << resp.status();
      ASSERT_TRUE(CancelIt(*coordinator_, resp->job().job_id()).ok());
      continue;
    }
    ASSERT_EQ(resp.status().code(), absl::StatusCode::kFailedPrecondition) << resp.status();
    const std::string message(resp.status().message());
    EXPECT_EQ(message.rfind(c.relation, 0), 0u) << message;
    EXPECT_NE(message.find(owner + " (QUEUED): choose another directory or wait for that job to "
                                   "end"),
              std::string::npos)
        << message;
  }
  // An ended job does not hold its output.
  ASSERT_TRUE(CancelIt(*coordinator_, owner).ok());
  auto again = SubmitTo(*coordinator_, "/x/out/sub");
  ASSERT_TRUE(again.ok()) << again.status();
}

TEST_F(CoordinatorTest, IdempotentResubmitOfALiveJobIsNotAnOverlap) {
  auto a = SubmitTo(*coordinator_, "/y/out", "k1");
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = SubmitTo(*coordinator_, "/y/out", "k1");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_FALSE(b->created());
  EXPECT_EQ(b->job().job_id(), a->job().job_id());
  EXPECT_EQ(SubmitTo(*coordinator_, "/y/out", "k2").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(CoordinatorTest, ResumeIsRefusedWhileAnotherLiveJobOwnsTheOutput) {
  auto a = SubmitTo(*coordinator_, "/z/out");
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(CancelIt(*coordinator_, a->job().job_id()).ok());
  auto b = SubmitTo(*coordinator_, "/z");
  ASSERT_TRUE(b.ok()) << b.status();
  absl::Status s = ResumeIt(*coordinator_, a->job().job_id());
  ASSERT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("lies inside the output /z of job " + b->job().job_id()),
            std::string::npos)
      << s;
  ASSERT_TRUE(CancelIt(*coordinator_, b->job().job_id()).ok());
  EXPECT_TRUE(ResumeIt(*coordinator_, a->job().job_id()).ok());
}

TEST_F(CoordinatorTest, WorkerNamesAreUniqueAmongLiveWorkers) {
  mq::v1::RegisterWorkerRequest r;
  r.set_name("w1");
  r.mutable_capabilities()->set_device("cpu");
  r.mutable_capabilities()->set_hostname("node-7");
  r.mutable_capabilities()->add_capabilities("plan");
  auto first = coordinator_->RegisterWorker(r);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string holder = first->worker_id();
  // Another process with the same name is refused, naming the holder and its host.
  r.mutable_capabilities()->set_hostname("node-8");
  auto second = coordinator_->RegisterWorker(r);
  ASSERT_EQ(second.status().code(), absl::StatusCode::kAlreadyExists) << second.status();
  EXPECT_NE(second.status().message().find("worker name \"w1\" is held by live worker " + holder +
                                           ", registered from host node-7"),
            std::string::npos)
      << second.status();
  EXPECT_EQ(coordinator_->ListWorkers().workers_size(), 1);
  // Its id cannot be taken by a registration without the holder's session...
  r.set_worker_id(holder);
  auto taken = coordinator_->RegisterWorker(r);
  ASSERT_EQ(taken.status().code(), absl::StatusCode::kAlreadyExists) << taken.status();
  EXPECT_NE(taken.status().message().find("a live worker holds this id"), std::string::npos);
  // ...and the holder registering again with its id and session keeps its name.
  Caller holder_caller = Caller::Anonymous();
  holder_caller.worker_session = first->session();
  auto again = coordinator_->RegisterWorker(r, holder_caller);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->worker_id(), holder);
  EXPECT_NE(again->session(), first->session());
  // Once it is declared dead the name is free.
  now_ += 2000;
  coordinator_->Tick();
  r.clear_worker_id();
  auto successor = coordinator_->RegisterWorker(r);
  ASSERT_TRUE(successor.ok()) << successor.status();
  EXPECT_NE(successor->worker_id(), holder);
  // The dead holder comes back: told to register again, which is refused.
  mq::v1::HeartbeatRequest hb;
  hb.set_worker_id(holder);
  EXPECT_EQ(coordinator_->Heartbeat(hb).status().code(), absl::StatusCode::kNotFound);
  r.set_worker_id(holder);
  EXPECT_EQ(coordinator_->RegisterWorker(r).status().code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(CoordinatorTest, RetentionKeepsTheNewestEndedJobsInMemoryAndTheRestInTheStore) {
  retain_jobs_ = 2;
  Restart();
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) {
    auto resp = SubmitTo(*coordinator_, "/r/out" + std::to_string(i), "key-" + std::to_string(i));
    ASSERT_TRUE(resp.ok()) << resp.status();
    ids.push_back(resp->job().job_id());
    now_ += 10;
  }
  const std::string live = Submit();  // never evicted
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(CancelIt(*coordinator_, ids[i]).ok());
    now_ += 10;
  }
  coordinator_->Tick();
  auto listed = [&] {
    std::vector<std::string> out;
    auto resp = coordinator_->ListJobs(mq::v1::ListJobsRequest());
    EXPECT_TRUE(resp.ok());
    for (const auto& j : resp->jobs()) out.push_back(j.job_id());
    return out;
  };
  EXPECT_EQ(listed(), (std::vector<std::string>{live, ids[3], ids[2]}));
  // mq_jobs counts what the store holds, evicted jobs too.
  EXPECT_EQ(Metric("mq_jobs", "state", "cancelled"), 4);
  EXPECT_EQ(Metric("mq_jobs", "state", "queued"), 1);
  // An evicted job is still answered from the store.
  auto old = Get(ids[0]);
  EXPECT_EQ(old.job().state(), mq::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(old.events_size(), old.job().event_count());
  EXPECT_EQ(CancelIt(*coordinator_, ids[0]).code(), absl::StatusCode::kFailedPrecondition);
  auto watch = coordinator_->JobSnapshot(ids[0], 0);
  ASSERT_TRUE(watch.ok()) << watch.status();
  EXPECT_EQ(watch->job().job_id(), ids[0]);
  // Its idempotency key still names it.
  auto same = SubmitTo(*coordinator_, "/r/out0", "key-0");
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_FALSE(same->created());
  EXPECT_EQ(same->job().job_id(), ids[0]);
  EXPECT_EQ(SubmitTo(*coordinator_, "/r/other", "key-0").status().code(),
            absl::StatusCode::kAlreadyExists);
  // A restart loads only what is retained.
  Restart();
  EXPECT_EQ(listed(), (std::vector<std::string>{live, ids[3], ids[2]}));
  EXPECT_EQ(Get(ids[1]).job().state(), mq::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(Metric("mq_jobs", "state", "cancelled"), 4);
  EXPECT_EQ(Metric("mq_jobs", "state", "queued"), 1);
  // Resuming an evicted job brings it back.
  ASSERT_TRUE(ResumeIt(*coordinator_, ids[0]).ok());
  EXPECT_EQ(Get(ids[0]).job().state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(Metric("mq_jobs", "state", "cancelled"), 3);
  EXPECT_EQ(Metric("mq_jobs", "state", "queued"), 2);
  coordinator_->Tick();
  EXPECT_EQ(listed(), (std::vector<std::string>{live, ids[3], ids[2], ids[0]}));
  mq::v1::GetJobRequest unknown;
  unknown.set_job_id("j-00000000000000000000000000");
  EXPECT_EQ(coordinator_->GetJob(unknown).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CoordinatorTest, RetentionByDurationKeepsJobsEndedWithinIt) {
  retain_ms_ = 60000;
  Restart();
  auto a = SubmitTo(*coordinator_, "/d/a");
  auto b = SubmitTo(*coordinator_, "/d/b");
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(CancelIt(*coordinator_, a->job().job_id()).ok());
  now_ += 30000;
  ASSERT_TRUE(CancelIt(*coordinator_, b->job().job_id()).ok());
  now_ += 30001;  // a ended 60.001 s ago, b 30.001 s ago
  coordinator_->Tick();
  auto resp = coordinator_->ListJobs(mq::v1::ListJobsRequest());
  ASSERT_TRUE(resp.ok());
  ASSERT_EQ(resp->jobs_size(), 1);
  EXPECT_EQ(resp->jobs(0).job_id(), b->job().job_id());
  now_ += 30000;
  coordinator_->Tick();
  EXPECT_EQ(coordinator_->ListJobs(mq::v1::ListJobsRequest())->jobs_size(), 0);
  EXPECT_EQ(Get(b->job().job_id()).job().state(), mq::v1::JOB_STATE_CANCELLED);
}

TEST_F(CoordinatorTest, EndedAssignmentsAreForgottenAfterTheirGrace) {
  grace_ms_ = 500;
  Restart();
  const std::string w = Register("w1");
  const std::string id = Submit();
  coordinator_->Tick();
  auto a = Poll(w);
  ASSERT_TRUE(Complete(w, a).ok());
  ASSERT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FAILED);  // missing capability
  coordinator_->Tick();
  EXPECT_TRUE(Complete(w, a).ok());  // a repeated report within the grace: idempotent
  now_ += 500;
  Heartbeat(w);
  coordinator_->Tick();
  EXPECT_EQ(Complete(w, a).code(), absl::StatusCode::kNotFound);  // forgotten, no crash
  mq::v1::ReportProgressRequest p;
  p.set_worker_id(w);
  p.set_assignment_id(a.assignment_id());
  p.set_lease_epoch(a.lease_epoch());
  EXPECT_EQ(coordinator_->ReportProgress(p).status().code(), absl::StatusCode::kNotFound);
  Restart();  // forgotten in the store too
  EXPECT_EQ(Complete(w, a).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FAILED);
}

// ---------------------------------------------------------------------------------------------
// The quantization pipeline: gangs, layer commits, finalize.

class PipelineTest : public CoordinatorTest {
 protected:
  std::string RegisterQ(const std::string& name, bool with_address = true) {
    mq::v1::RegisterWorkerRequest r;
    r.set_name(name);
    r.mutable_capabilities()->set_device("cpu");
    r.mutable_capabilities()->add_capabilities("plan");
    r.mutable_capabilities()->add_capabilities("quantize:gptq");
    r.mutable_capabilities()->add_capabilities("evaluate");
    if (with_address) r.mutable_capabilities()->set_gang_address(name + ".host:29500");
    auto resp = coordinator_->RegisterWorker(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    now_ += 1;  // distinct registration times: deterministic gang order
    return resp->worker_id();
  }

  // A worker offering plan and quantize:gptq with a gang address: a GPU worker with
  // `device_gib` of device memory, or a CPU worker with 0; `host_gib` of host memory (0: not
  // reported).
  std::string RegisterMemory(const std::string& name, int64_t device_gib, int64_t host_gib) {
    mq::v1::RegisterWorkerRequest r;
    r.set_name(name);
    r.mutable_capabilities()->set_device(device_gib > 0 ? "cuda:0" : "cpu");
    r.mutable_capabilities()->set_device_memory_bytes(device_gib << 30);
    r.mutable_capabilities()->set_host_memory_bytes(host_gib << 30);
    r.mutable_capabilities()->add_capabilities("plan");
    r.mutable_capabilities()->add_capabilities("quantize:gptq");
    r.mutable_capabilities()->set_gang_address(name + ".host:29500");
    auto resp = coordinator_->RegisterWorker(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? resp->worker_id() : "";
  }

  // Submits a gang-of-one job, has `worker` plan it with a one-layer plan of these per-rank
  // estimates, and returns the job as the plan left it in `*job`.
  void PlanWithEstimate(const std::string& worker, int64_t gpu_gib, int64_t host_gib,
                        mq::v1::JobRecord* job) {
    const std::string id = SubmitGang(1);
    coordinator_->Tick();
    auto a = Poll(worker);
    ASSERT_EQ(a.kind(), mq::v1::ASSIGNMENT_KIND_PLAN);
    mq::v1::CompleteAssignmentRequest r;
    r.set_worker_id(worker);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch());
    r.mutable_plan()->add_layers()->set_index(0);
    r.mutable_plan()->mutable_estimate()->set_gpu_bytes_per_rank(gpu_gib << 30);
    r.mutable_plan()->mutable_estimate()->set_host_bytes_per_rank(host_gib << 30);
    ASSERT_TRUE(coordinator_->CompleteAssignment(r).ok());
    *job = Get(id).job();
  }

  void Cancel(const std::string& id) {
    mq::v1::CancelJobRequest c;
    c.set_job_id(id);
    ASSERT_TRUE(coordinator_->CancelJob(c).ok());
  }

  std::string SubmitGang(int gang_size, int max_attempts = 0,
                         const std::function<void(mq::v1::EvalSpec&)>& eval = {}) {
    mq::v1::SubmitJobRequest r;
    r.mutable_spec()->set_model_uri("/models/dsv3");
    r.mutable_spec()->set_output_uri(NextOutput());
    r.mutable_spec()->set_gang_size(gang_size);
    r.mutable_spec()->set_max_attempts(max_attempts);
    if (eval) {
      eval(*r.mutable_spec()->mutable_eval());
    } else {
      r.mutable_spec()->mutable_eval()->set_num_samples(0);
    }
    auto resp = coordinator_->SubmitJob(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp->job().job_id();
  }

  // Runs the PLAN assignment on whichever worker got it; the plan has `steps` layers whose
  // checkpoint indices are 10 + step.
  void Plan(const std::string& job_id, const std::vector<std::string>& workers, int steps = 4,
            const mq::v1::ResourceEstimate& estimate = {}) {
    coordinator_->Tick();
    ASSERT_EQ(Get(job_id).job().state(), mq::v1::JOB_STATE_PLANNING);
    for (const std::string& w : workers) {
      auto a = Poll(w);
      if (a.assignment_id().empty()) continue;
      ASSERT_EQ(a.kind(), mq::v1::ASSIGNMENT_KIND_PLAN);
      mq::v1::CompleteAssignmentRequest r;
      r.set_worker_id(w);
      r.set_assignment_id(a.assignment_id());
      r.set_lease_epoch(a.lease_epoch());
      for (int i = 0; i < steps; ++i) r.mutable_plan()->add_layers()->set_index(10 + i);
      *r.mutable_plan()->mutable_estimate() = estimate;
      ASSERT_TRUE(coordinator_->CompleteAssignment(r).ok());
      return;
    }
    FAIL() << "no worker got the plan";
  }

  static std::string Sha(char c) { return std::string(64, c); }

  mq::v1::ReportLayerRequest Layer(const std::string& worker_id, const mq::v1::Assignment& a,
                                   int step) {
    mq::v1::ReportLayerRequest r;
    r.set_worker_id(worker_id);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch());
    r.set_step(step);
    r.set_layer(10 + step);
    r.set_rank(a.rank());
    mq::v1::OutputFile* f = r.add_files();
    f->set_name("layer-" + std::to_string(10 + step) + "-rank-" + std::to_string(a.rank()) +
                ".safetensors");
    f->set_size_bytes(1000 + step);
    f->set_sha256(Sha("0123456789abcdef"[(step + a.rank()) % 16]));
    mq::v1::LayerStats* st = r.mutable_stats();
    st->set_step(step);
    st->set_layer(10 + step);
    st->set_load_seconds(1 + a.rank());
    st->set_solve_seconds(2);
    st->set_expert_tokens_min(3);
    st->set_expert_tokens_median(40);
    st->set_expert_tokens_max(200);
    st->set_quantized_linears(10);
    st->set_fallbacks(a.rank());
    st->set_rare_experts(1);
    st->set_dispatch_rounds(4);
    st->set_expert_passes(2);
    st->set_exchange_seconds(0.5 + a.rank());
    st->set_device_peak_allocated_bytes(a.rank() == 0 ? 70 : 60);
    st->set_device_peak_reserved_bytes(a.rank() == 0 ? 75 : 80);
    // A lying rank's huge count saturates the sum instead of wrapping around.
    st->set_device_alloc_retries(a.rank() == 0 ? 3 : std::numeric_limits<int64_t>::max() - 1);
    mq::v1::RareExpert* rare = st->add_rare();
    rare->set_expert(7 + a.rank());
    rare->set_routed_tokens(3);
    rare->set_treatment("topped_up");
    st->set_mean_relative_error(0.01 * (a.rank() + 1));
    mq::v1::AwqMapping* awq = st->add_awq();
    awq->set_smooth("model.layers." + std::to_string(10 + step) + ".mlp.experts.*.up_proj");
    awq->set_balance_layers(1);
    awq->set_mappings(4);
    awq->set_identity_chosen(a.rank());
    awq->set_alpha(0.5);
    awq->set_loss_identity(2);
    awq->set_loss_chosen(1);
    awq->set_rows(100 + a.rank());
    return r;
  }

  absl::StatusOr<mq::v1::ReportLayerResponse> Report(const std::string& worker_id,
                                                     const mq::v1::Assignment& a, int step) {
    return coordinator_->ReportLayer(Layer(worker_id, a, step));
  }

  absl::Status Quantized(const std::string& worker_id, const mq::v1::Assignment& a) {
    mq::v1::CompleteAssignmentRequest r;
    r.set_worker_id(worker_id);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch());
    r.mutable_quantized()->set_steps_run(4);
    return coordinator_->CompleteAssignment(r).status();
  }

  absl::Status Error(const std::string& worker_id, const mq::v1::Assignment& a,
                     bool infrastructure = false, const std::string& text = "CUDA out of memory") {
    mq::v1::CompleteAssignmentRequest r;
    r.set_worker_id(worker_id);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch());
    r.set_error(text);
    r.set_infrastructure(infrastructure);
    return coordinator_->CompleteAssignment(r).status();
  }

  // A failed assignment that found `files` damaged.
  absl::Status Corrupt(const std::string& worker_id, const mq::v1::Assignment& a,
                       const std::vector<std::string>& files) {
    mq::v1::CompleteAssignmentRequest r;
    r.set_worker_id(worker_id);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch());
    r.set_error("committed file(s) differ from what was committed: " + files.front());
    for (const std::string& f : files) r.add_corrupt_files(f);
    return coordinator_->CompleteAssignment(r).status();
  }

  // Plans the job on `w` alone, takes its quantize assignment and commits steps [0, committed).
  mq::v1::Assignment QuantizeCommitting(const std::string& w, const std::string& id,
                                        int committed) {
    Plan(id, {w});
    coordinator_->Tick();
    auto q = Poll(w);
    for (int step = 0; step < committed; ++step) EXPECT_TRUE(Report(w, q, step)->committed());
    return q;
  }

  // Commits steps [from, 4) with a gang of one and finishes the quantize phase; returns the
  // finalize assignment.
  mq::v1::Assignment QuantizeAndFinalize(const std::string& w, const std::string& id, int from) {
    coordinator_->Tick();
    auto q = Poll(w);
    EXPECT_EQ(q.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
    EXPECT_EQ(q.start_step(), from);
    EXPECT_EQ(q.committed_files_size(), from);
    for (int step = from; step < 4; ++step) EXPECT_TRUE(Report(w, q, step)->committed());
    EXPECT_TRUE(Quantized(w, q).ok());
    EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FINALIZING);
    coordinator_->Tick();
    auto f = Poll(w);
    EXPECT_EQ(f.kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
    return f;
  }

  std::vector<std::string> HeartbeatCancels(const std::string& worker_id,
                                            const std::string& assignment_id) {
    mq::v1::HeartbeatRequest hb;
    hb.set_worker_id(worker_id);
    hb.set_assignment_id(assignment_id);
    auto resp = coordinator_->Heartbeat(hb);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return {resp->cancel_assignment_ids().begin(), resp->cancel_assignment_ids().end()};
  }

  // Lets `ms` pass while `alive` keep their leases (heartbeats at the new time).
  void Advance(int64_t ms, const std::vector<std::string>& alive) {
    now_ += ms;
    for (const std::string& w : alive) Heartbeat(w);
  }

  std::string LastEvent(const std::string& job_id, const std::string& kind) {
    std::string message;
    const auto job = Get(job_id);
    for (const auto& e : job.events()) {
      if (e.kind() == kind) message = e.message();
    }
    return message;
  }

  int CountEvents(const std::string& job_id, const std::string& kind) {
    int n = 0;
    const auto job = Get(job_id);
    for (const auto& e : job.events()) n += e.kind() == kind;
    return n;
  }
};

// A plan whose per-rank GPU estimate exceeds every capable GPU worker's memory fails at once
// with the numbers and what to change; one that fits waits for its gang.
TEST_F(PipelineTest, EstimateAboveEveryGpuFailsThePlan) {
  const std::string w = RegisterMemory("gpu0", 80, 0);
  for (int64_t need_gib : {100, 50}) {
    SCOPED_TRACE(need_gib);
    mq::v1::JobRecord job;
    ASSERT_NO_FATAL_FAILURE(PlanWithEstimate(w, need_gib, 0, &job));
    if (need_gib == 100) {
      EXPECT_EQ(job.state(), mq::v1::JOB_STATE_FAILED);
      EXPECT_NE(job.message().find("exceeds the largest device"), std::string::npos)
          << job.message();
      EXPECT_NE(job.message().find("--gang-size"), std::string::npos) << job.message();
    } else {
      EXPECT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED) << job.message();
      Cancel(job.job_id());
    }
  }
}

// The same for host memory: a GPU worker reports its host's memory, and a plan whose per-rank
// host estimate exceeds every capable worker's fails at once; a CPU worker's plan budgets host
// memory as its device, so only the GPU check applies to it.
TEST_F(PipelineTest, HostEstimateAboveEveryWorkersHostFailsThePlan) {
  const std::string w = RegisterMemory("gpu0", 141, 128);
  // Kimi-K2's 139 GiB on a 128 GiB host: refused with the numbers and what to change.
  mq::v1::JobRecord job;
  ASSERT_NO_FATAL_FAILURE(PlanWithEstimate(w, 95, 139, &job));
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_FAILED);
  EXPECT_NE(job.message().find("139.00 GiB host memory per rank exceeds the host memory"),
            std::string::npos)
      << job.message();
  EXPECT_NE(job.message().find("128.00 GiB"), std::string::npos) << job.message();
  EXPECT_NE(job.message().find("--gang-size"), std::string::npos) << job.message();
  // DeepSeek-V3's 123 GiB fits and waits for its gang.
  ASSERT_NO_FATAL_FAILURE(PlanWithEstimate(w, 95, 123, &job));
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED) << job.message();
  Cancel(job.job_id());
  // With a CPU worker in the pool the host check is the CPU plan's own: no refusal here.
  RegisterMemory("cpu0", 0, 128);
  ASSERT_NO_FATAL_FAILURE(PlanWithEstimate(w, 95, 139, &job));
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED) << job.message();
  Cancel(job.job_id());
}

// Every rank runs the expert passes and dispatch rounds its job's plan estimated.
TEST_F(PipelineTest, QuantizeAssignmentsCarryThePlansSettings) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  mq::v1::ResourceEstimate e;
  e.set_experts_per_pass(52);
  e.set_dispatch_tokens(32768);
  e.set_experts_per_pass_chosen(true);
  e.set_dispatch_tokens_chosen(true);
  e.set_expert_passes(3);
  e.set_dispatch_rounds(16);
  Plan(id, {a, b}, 4, e);
  coordinator_->Tick();
  ASSERT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_RUNNING) << Get(id).job().message();
  EXPECT_EQ(Get(id).job().plan().estimate().experts_per_pass(), 52);  // stored with the job
  for (const std::string& w : {a, b}) {
    const mq::v1::Assignment q = Poll(w);
    ASSERT_EQ(q.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
    ASSERT_TRUE(q.has_settings()) << w;
    EXPECT_EQ(q.settings().experts_per_pass(), 52) << w;
    EXPECT_EQ(q.settings().dispatch_tokens(), 32768) << w;
  }
}

// A plan without settings (an older worker's): the workers' own flags apply.
TEST_F(PipelineTest, APlanWithoutSettingsSendsNone) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  Plan(id, {a});
  coordinator_->Tick();
  const mq::v1::Assignment q = Poll(a);
  ASSERT_EQ(q.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE) << Get(id).job().message();
  EXPECT_FALSE(q.has_settings());
}

TEST_F(PipelineTest, PlanThenGangThenFinalizeSucceeds) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  Plan(id, {a, b});
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED) << job.message();
  EXPECT_NE(job.message().find("planned: 4 steps"), std::string::npos) << job.message();
  EXPECT_EQ(job.missing_capability(), "");

  coordinator_->Tick();
  job = Get(id).job();
  ASSERT_EQ(job.state(), mq::v1::JOB_STATE_RUNNING) << job.message();
  EXPECT_EQ(job.progress().gang_size(), 2);
  auto qa = Poll(a), qb = Poll(b);
  ASSERT_EQ(qa.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
  ASSERT_EQ(qb.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
  EXPECT_EQ(qa.rank(), 0);  // registered first
  EXPECT_EQ(qb.rank(), 1);
  EXPECT_EQ(qa.world_size(), 2);
  EXPECT_EQ(qa.attempt(), qb.attempt());
  EXPECT_EQ(qa.lease_epoch(), qb.lease_epoch());
  EXPECT_EQ(qa.start_step(), 0);
  EXPECT_EQ(qa.total_steps(), 4);
  EXPECT_EQ(qa.rendezvous(), "w-a.host:29500");
  EXPECT_EQ(qb.rendezvous(), "w-a.host:29500");
  // The attempt's rendezvous secret: 128 random bits as hex, the same for every rank, never
  // shown to clients (the job, its attempts and events).
  EXPECT_EQ(qa.rendezvous_secret().size(), 32u);
  EXPECT_EQ(qa.rendezvous_secret().find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ(qb.rendezvous_secret(), qa.rendezvous_secret());
  EXPECT_EQ(Get(id).DebugString().find(qa.rendezvous_secret()), std::string::npos);
  EXPECT_EQ(qa.committed_files_size(), 0);
  auto response = Get(id);
  EXPECT_EQ(response.attempts().rbegin()->phase(), "quantize");
  EXPECT_EQ(response.attempts().rbegin()->worker_ids_size(), 2);
  EXPECT_NE(LastEvent(id, "assigned").find("steps 0..3 on a gang of 2 (w-a, w-b)"),
            std::string::npos)
      << LastEvent(id, "assigned");

  EXPECT_EQ(Metric("mq_job_progress_ratio", "job_id", id), 0);
  EXPECT_EQ(Metric("mq_job_layers", "kind", "total"), 4);
  for (int step = 0; step < 4; ++step) {
    auto r0 = Report(a, qa, step);
    ASSERT_TRUE(r0.ok()) << r0.status();
    EXPECT_FALSE(r0->committed());
    EXPECT_EQ(Get(id).job().progress().layers_committed(), step);  // not before every rank
    auto r1 = Report(b, qb, step);
    ASSERT_TRUE(r1.ok()) << r1.status();
    EXPECT_TRUE(r1->committed());
    EXPECT_FALSE(r1->cancel());
    EXPECT_EQ(Get(id).job().progress().layers_committed(), step + 1);
    EXPECT_DOUBLE_EQ(Metric("mq_job_progress_ratio", "job_id", id), (step + 1) / 4.0);
    EXPECT_EQ(Metric("mq_job_layers", "kind", "committed"), step + 1);
  }
  job = Get(id).job();
  const auto& last = job.progress().last_layer();
  EXPECT_EQ(last.step(), 3);
  EXPECT_EQ(last.layer(), 13);
  EXPECT_DOUBLE_EQ(last.load_seconds(), 2);  // max over ranks
  EXPECT_EQ(last.expert_tokens_median(), 40);
  EXPECT_EQ(last.quantized_linears(), 20);  // summed
  EXPECT_EQ(last.fallbacks(), 1);
  EXPECT_EQ(last.rare_experts(), 2);
  EXPECT_EQ(last.rare_size(), 2);
  EXPECT_NEAR(last.mean_relative_error(), 0.015, 1e-12);
  ASSERT_EQ(last.awq_size(), 2);  // concatenated in rank order
  EXPECT_EQ(last.awq(0).rows(), 100);
  EXPECT_EQ(last.awq(1).rows(), 101);
  EXPECT_EQ(last.awq(1).smooth(), "model.layers.13.mlp.experts.*.up_proj");
  EXPECT_EQ(last.dispatch_rounds(), 4);  // rank 0's (the gang's)
  EXPECT_EQ(last.expert_passes(), 2);
  EXPECT_DOUBLE_EQ(last.exchange_seconds(), 1.5);  // max over ranks
  EXPECT_EQ(last.device_peak_allocated_bytes(), 70);  // max over ranks, each peak on its own
  EXPECT_EQ(last.device_peak_reserved_bytes(), 80);
  EXPECT_EQ(last.device_alloc_retries(), std::numeric_limits<int64_t>::max());
  EXPECT_EQ(job.progress().fallbacks(), 4);
  EXPECT_EQ(job.progress().rare_experts(), 8);
  EXPECT_EQ(CountEvents(id, "layer_committed"), 4);
  EXPECT_EQ(Get(id).layers_size(), 4);

  ASSERT_TRUE(Quantized(a, qa).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_RUNNING);  // rank 1 still running
  ASSERT_TRUE(Quantized(b, qb).ok());
  ASSERT_TRUE(Quantized(b, qb).ok());  // idempotent
  job = Get(id).job();
  ASSERT_EQ(job.state(), mq::v1::JOB_STATE_FINALIZING) << job.message();

  coordinator_->Tick();
  auto fa = Poll(a);  // rank 0's worker is preferred
  ASSERT_EQ(fa.kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
  EXPECT_EQ(fa.total_steps(), 4);
  ASSERT_EQ(fa.committed_files_size(), 8);
  EXPECT_EQ(fa.committed_files(0).name(), "layer-10-rank-0.safetensors");
  EXPECT_EQ(fa.committed_files(1).name(), "layer-10-rank-1.safetensors");
  EXPECT_EQ(fa.committed_files(7).name(), "layer-13-rank-1.safetensors");
  EXPECT_TRUE(Poll(b).assignment_id().empty());

  mq::v1::CompleteAssignmentRequest done;
  done.set_worker_id(a);
  done.set_assignment_id(fa.assignment_id());
  done.set_lease_epoch(fa.lease_epoch());
  done.mutable_finalized()->set_manifest_sha256(Sha('e'));
  done.mutable_finalized()->set_files(12);
  done.mutable_finalized()->set_total_bytes(123456);
  // Bad results are refused before anything changes.
  mq::v1::CompleteAssignmentRequest bad = done;
  bad.mutable_finalized()->set_manifest_sha256("ABC");
  EXPECT_EQ(coordinator_->CompleteAssignment(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = done;
  bad.mutable_quantized();
  EXPECT_EQ(coordinator_->CompleteAssignment(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(coordinator_->CompleteAssignment(done).ok());
  job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_SUCCEEDED) << job.message();
  EXPECT_EQ(Metric("mq_job_progress_ratio"), -1);  // the series went with the job
  EXPECT_EQ(Metric("mq_job_layers", "kind", "committed"), 0);
  EXPECT_EQ(Metric("mq_job_layers", "kind", "total"), 0);
  EXPECT_EQ(job.manifest_sha256(), Sha('e'));
  EXPECT_EQ(job.output_files(), 12);
  EXPECT_EQ(job.output_bytes(), 123456);
  EXPECT_EQ(CountEvents(id, "finalized"), 1);
}

TEST_F(PipelineTest, ReportLayerIsIdempotent) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  ASSERT_TRUE(Report(a, qa, 0).ok());
  const int64_t events = Get(id).job().event_count();
  auto again = Report(a, qa, 0);  // same rank twice: nothing changes
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->committed());
  EXPECT_EQ(Get(id).job().event_count(), events);
  ASSERT_EQ(Get(id).layers_size(), 1);
  EXPECT_EQ(Get(id).layers(0).reports_size(), 1);
  ASSERT_TRUE(Report(b, qb, 0)->committed());
  const auto after = Get(id);
  EXPECT_EQ(CountEvents(id, "layer_committed"), 1);
  // Repeats after the commit (either rank, even with other files) change nothing.
  auto changed = Layer(b, qb, 0);
  changed.mutable_files(0)->set_sha256(Sha('f'));
  auto r = coordinator_->ReportLayer(changed);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->committed());
  EXPECT_TRUE(Report(a, qa, 0)->committed());
  EXPECT_EQ(Get(id).job().SerializeAsString(), after.job().SerializeAsString());
  EXPECT_EQ(Get(id).layers(0).SerializeAsString(), after.layers(0).SerializeAsString());
  EXPECT_EQ(CountEvents(id, "layer_committed"), 1);
}

TEST_F(PipelineTest, HugeCountsFromEveryRankSaturateInsteadOfWrappingAround) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  for (int step = 0; step < 2; ++step) {
    for (const auto& [worker, assignment] : {std::pair{a, qa}, std::pair{b, qb}}) {
      mq::v1::ReportLayerRequest r = Layer(worker, assignment, step);
      r.mutable_stats()->set_quantized_linears(kMax);
      r.mutable_stats()->set_fallbacks(kMax);
      r.mutable_stats()->set_rare_experts(kMax);
      r.mutable_stats()->set_mean_relative_error(0.25);
      auto response = coordinator_->ReportLayer(r);
      ASSERT_TRUE(response.ok()) << response.status();
    }
  }
  const auto job = Get(id).job();
  ASSERT_EQ(job.progress().layers_committed(), 2);
  const auto& last = job.progress().last_layer();
  EXPECT_EQ(last.quantized_linears(), kMax);
  EXPECT_EQ(last.fallbacks(), kMax);
  EXPECT_EQ(last.rare_experts(), kMax);
  EXPECT_DOUBLE_EQ(last.mean_relative_error(), 0.25);        // weighted by the unsaturated counts
  EXPECT_EQ(job.progress().fallbacks(), int64_t{2} * kMax);  // two layers, each saturated
  EXPECT_EQ(job.progress().rare_experts(), int64_t{2} * kMax);
}

TEST_F(PipelineTest, MalformedReportsAreInvalid) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  auto expect_invalid = [&](mq::v1::ReportLayerRequest r, const std::string& field) {
    auto resp = coordinator_->ReportLayer(r);
    EXPECT_EQ(resp.status().code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(resp.status().message().find(field), std::string::npos) << resp.status();
  };
  auto r = Layer(a, qa, 0);
  r.set_step(4);
  r.set_layer(14);
  expect_invalid(r, "step = 4");
  r = Layer(a, qa, 0);
  r.set_rank(1);  // b's rank
  expect_invalid(r, "rank = 1");
  r = Layer(a, qa, 0);
  r.set_rank(2);
  expect_invalid(r, "rank = 2");
  r = Layer(a, qa, 0);
  r.set_layer(11);
  expect_invalid(r, "layer = 11");
  r = Layer(a, qa, 0);
  r.mutable_files(0)->set_name("../x");
  expect_invalid(r, "files[0].name");
  r = Layer(a, qa, 0);
  r.mutable_files(0)->set_sha256("XYZ");
  expect_invalid(r, "files[0].sha256");
  r = Layer(a, qa, 0);
  r.mutable_stats()->set_solve_seconds(std::nan(""));
  expect_invalid(r, "stats.solve_seconds");
  EXPECT_EQ(Get(id).layers_size(), 0);
  // A wrong lease epoch or someone else's assignment is stale.
  r = Layer(a, qa, 0);
  r.set_lease_epoch(qa.lease_epoch() + 7);
  EXPECT_EQ(coordinator_->ReportLayer(r).status().code(), absl::StatusCode::kAborted);
  r = Layer(a, qb, 0);
  r.set_rank(1);
  EXPECT_EQ(coordinator_->ReportLayer(r).status().code(), absl::StatusCode::kAborted);
}

TEST_F(PipelineTest, GangWaitsThenShrinksOnlyWhenTooFewAreAlive) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(3);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_NE(job.message().find("2 of 3 workers available"), std::string::npos) << job.message();
  now_ += 29000;
  Heartbeat(a);
  Heartbeat(b);
  coordinator_->Tick();
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_QUEUED);
  now_ += 1000;  // 30 s: the default gang_wait_ms
  Heartbeat(a);
  Heartbeat(b);
  coordinator_->Tick();
  job = Get(id).job();
  ASSERT_EQ(job.state(), mq::v1::JOB_STATE_RUNNING) << job.message();
  EXPECT_EQ(job.progress().gang_size(), 2);
  EXPECT_EQ(Poll(a).world_size(), 2);
  EXPECT_NE(LastEvent(id, "assigned").find("smaller than spec.gang_size 3"), std::string::npos)
      << LastEvent(id, "assigned");
}

TEST_F(PipelineTest, GangKeepsWaitingWhileEnoughWorkersAreAliveButBusy) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string c = RegisterQ("w-c");
  const std::string first = SubmitGang(1);
  Plan(first, {a, b, c});
  coordinator_->Tick();  // the first job takes one worker
  ASSERT_EQ(Get(first).job().state(), mq::v1::JOB_STATE_RUNNING);
  for (const auto& w : {a, b, c}) Poll(w);  // deliver the first job's assignment
  const std::string id = SubmitGang(3);
  Plan(id, {a, b, c});
  for (int i = 0; i < 5; ++i) {
    now_ += 20000;
    for (const auto& w : {a, b, c}) Heartbeat(w);
    coordinator_->Tick();
  }
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_NE(job.message().find("2 of 3"), std::string::npos) << job.message();
}

TEST_F(PipelineTest, WorkersWithoutGangAddressAreNotCandidates) {
  const std::string a = RegisterQ("w-a", /*with_address=*/false);
  const std::string id = SubmitGang(1);
  Plan(id, {a});
  now_ += 60000;
  Heartbeat(a);
  coordinator_->Tick();
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_NE(job.message().find("without a gang address"), std::string::npos) << job.message();
}

TEST_F(PipelineTest, LostRankAbortsTheWholeGangUncounted) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2, /*max_attempts=*/1);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  for (int step = 0; step < 2; ++step) {
    ASSERT_TRUE(Report(a, qa, step).ok());
    ASSERT_TRUE(Report(b, qb, step)->committed());
  }
  ASSERT_TRUE(Report(a, qa, 2).ok());  // step 2 pending: rank 1 never reports it
  const auto before = Get(id).job();
  // b goes silent; a keeps heartbeating.
  for (int i = 0; i < 12; ++i) {
    now_ += 100;
    Heartbeat(a);
    coordinator_->Tick();
  }
  auto job = Get(id);
  EXPECT_EQ(job.job().uncounted_attempts(), 1);
  EXPECT_EQ(job.job().attempt_base(), before.attempt_base() + 1);
  EXPECT_EQ(job.attempts().rbegin()->state(), mq::v1::ATTEMPT_STATE_ABORTED);
  EXPECT_GE(CountEvents(id, "lease_expired"), 1);
  bool not_counted = false;
  for (const auto& e : job.events()) {
    not_counted = not_counted || e.message().find("not counted") != std::string::npos;
  }
  EXPECT_TRUE(not_counted);
  // The survivor is told to stop and its late reports are fenced off.
  EXPECT_EQ(HeartbeatCancels(a, qa.assignment_id()),
            std::vector<std::string>({qa.assignment_id()}));
  EXPECT_EQ(Report(a, qa, 3).status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(Quantized(a, qa).code(), absl::StatusCode::kAborted);
  // The survivor gets no new work until it has polled (it may still be running the aborted one).
  const std::string c = RegisterQ("w-c");
  coordinator_->Tick();
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_FALSE(Poll(a).has_spec());  // abandons the old assignment and polls: nothing yet
  // The next attempt (a smaller gang once the wait is over) starts at the first uncommitted step.
  coordinator_->Tick();
  auto next = Get(id).job();
  ASSERT_EQ(next.state(), mq::v1::JOB_STATE_RUNNING) << next.message();
  // The lost attempt did not use up the budget: the retry counts like the attempt it replaces.
  EXPECT_EQ(next.attempt() - next.attempt_base(), before.attempt() - before.attempt_base());
  auto na = Poll(a);
  auto nc = Poll(c);
  EXPECT_EQ(na.attempt(), qa.attempt() + 1);
  EXPECT_EQ(na.start_step(), 2);
  EXPECT_EQ(nc.start_step(), 2);
  EXPECT_EQ(na.committed_files_size(), 4);
  EXPECT_EQ(Get(id).layers_size(), 2);  // step 2's stale pending report is gone
  EXPECT_EQ(Report(a, na, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(PipelineTest, RankErrorFailsTheAttemptAndStopsPeers) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  ASSERT_TRUE(Report(a, qa, 0).ok());
  ASSERT_TRUE(Report(b, qb, 0)->committed());
  ASSERT_TRUE(Error(b, qb).ok());
  ASSERT_TRUE(Error(b, qb).ok());  // idempotent
  auto job = Get(id);
  EXPECT_EQ(job.job().state(), mq::v1::JOB_STATE_QUEUED) << job.job().message();
  EXPECT_EQ(job.job().uncounted_attempts(), 0);
  EXPECT_EQ(job.attempts().rbegin()->state(), mq::v1::ATTEMPT_STATE_FAILED);
  EXPECT_EQ(HeartbeatCancels(a, qa.assignment_id()),
            std::vector<std::string>({qa.assignment_id()}));
  EXPECT_EQ(Report(a, qa, 1).status().code(), absl::StatusCode::kAborted);
  mq::v1::ReportProgressRequest progress;
  progress.set_worker_id(a);
  progress.set_assignment_id(qa.assignment_id());
  progress.set_lease_epoch(qa.lease_epoch());
  EXPECT_EQ(coordinator_->ReportProgress(progress).status().code(), absl::StatusCode::kAborted);
  // Retried on the same two workers from step 1, once the peer has polled.
  coordinator_->Tick();
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_FALSE(Poll(a).has_spec());
  coordinator_->Tick();
  auto na = Poll(a);
  EXPECT_EQ(na.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
  EXPECT_EQ(na.start_step(), 1);
  // A new attempt, a new rendezvous secret.
  EXPECT_EQ(na.rendezvous_secret().size(), 32u);
  EXPECT_NE(na.rendezvous_secret(), qa.rendezvous_secret());
}

TEST_F(PipelineTest, InfrastructureErrorIsNotCountedButBounded) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1, /*max_attempts=*/1);
  Plan(id, {a});
  for (int i = 0; i < 10; ++i) {
    Advance(kMaxRetryDelayMs, {a});  // past any backoff
    coordinator_->Tick();
    auto q = Poll(a);
    ASSERT_EQ(q.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE) << i;
    // Two different failures taking turns: never the same one twice in a row.
    ASSERT_TRUE(Error(a, q, /*infrastructure=*/true, i % 2 ? "peer lost" : "store closed").ok());
    ASSERT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_QUEUED) << i;
  }
  EXPECT_EQ(Get(id).job().uncounted_attempts(), 10);
  Advance(kMaxRetryDelayMs, {a});
  coordinator_->Tick();
  ASSERT_TRUE(Error(a, Poll(a), /*infrastructure=*/true).ok());
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_FAILED) << job.message();
}

// What a rank reports when rank 0's advertised rendezvous address cannot be reached; the
// timing inside varies from attempt to attempt (the coordinator adds "rank N (NAME) failed: ").
std::string JoinFailure(int elapsed_ms) {
  return absl::StrCat("cannot join gang at 10.1.2.3:29500 (rank 0's --gang-host/--gang-port) ",
                      "within 2000 ms: The client socket has timed out after ", elapsed_ms,
                      "ms while trying to connect to (10.1.2.3, 29500).");
}

// A torch exception's text: the message, then its C++ stack.
std::string WithStack(const std::string& message) {
  std::string s = message +
                  "\nException raised from connect at socket.cpp:1018 (most recent "
                  "call first):\n";
  for (int i = 0; i < 40; ++i) {
    absl::StrAppend(&s, "frame #", i, ": c10d::detail::SocketConnectOp::run() + 0x", i,
                    " (0x7f00 in libtorch_cpu.so)\n");
  }
  return s;
}

TEST_F(PipelineTest, RepeatedUnreachableRendezvousBacksOffThenFailsNamingTheAddress) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2, /*max_attempts=*/2);
  Plan(id, {a, b});
  int64_t expected_delay = kFirstRetryDelayMs;
  for (int failure = 1; failure <= kMaxIdenticalInfrastructureFailures; ++failure) {
    coordinator_->Tick();
    auto qa = Poll(a), qb = Poll(b);
    ASSERT_EQ(qa.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE) << failure;
    ASSERT_EQ(qb.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE) << failure;
    // Either rank may be first to report; the timing differs every time.
    const bool by_a = failure % 2 == 1;
    ASSERT_TRUE(Error(by_a ? a : b, by_a ? qa : qb, /*infrastructure=*/true,
                      WithStack(JoinFailure(2000 + failure)))
                    .ok());
    auto job = Get(id).job();
    if (failure == kMaxIdenticalInfrastructureFailures) break;
    ASSERT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED) << job.message();
    EXPECT_NE(job.message().find(absl::StrCat("retrying in ", expected_delay / 1000, " s")),
              std::string::npos)
        << job.message();
    // Both workers are idle again (they polled), but the job waits out its backoff.
    EXPECT_FALSE(Poll(a).has_spec());
    EXPECT_FALSE(Poll(b).has_spec());
    Advance(expected_delay - 1, {a, b});
    coordinator_->Tick();
    EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_QUEUED) << failure;
    Advance(1, {a, b});
    expected_delay *= 2;
  }
  auto response = Get(id);
  const auto& job = response.job();
  ASSERT_EQ(job.state(), mq::v1::JOB_STATE_FAILED) << job.message();
  EXPECT_NE(job.message().find("same infrastructure failure 3 times in a row"), std::string::npos)
      << job.message();
  EXPECT_NE(job.message().find("cannot join gang at 10.1.2.3:29500"), std::string::npos)
      << job.message();
  EXPECT_EQ(job.message().find("frame #"), std::string::npos) << job.message();
  EXPECT_EQ(job.uncounted_attempts(), 2);  // never reached spec.max_attempts
  for (const auto& e : response.events()) {
    EXPECT_LE(e.message().size(), kMaxEventMessageBytes) << e.message();
    EXPECT_EQ(e.message().find("frame #"), std::string::npos) << e.message();
    EXPECT_EQ(e.message().find("Exception raised from"), std::string::npos) << e.message();
  }
  // Resume starts the count again: one more failure only backs off.
  mq::v1::ResumeJobRequest r;
  r.set_job_id(id);
  ASSERT_TRUE(coordinator_->ResumeJob(r).ok());
  EXPECT_FALSE(Poll(a).has_spec());  // both abandon the failed attempt and poll
  EXPECT_FALSE(Poll(b).has_spec());
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  ASSERT_EQ(qa.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
  ASSERT_TRUE(Error(a, qa, /*infrastructure=*/true, JoinFailure(2001)).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_QUEUED);
}

TEST_F(PipelineTest, InfrastructureFailuresWithProgressInBetweenKeepRetrying) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1, /*max_attempts=*/1);
  Plan(id, {a});
  for (int step = 0; step < 4; ++step) {
    Advance(kMaxRetryDelayMs, {a});
    coordinator_->Tick();
    auto q = Poll(a);
    ASSERT_EQ(q.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE) << step;
    ASSERT_EQ(q.start_step(), step);
    ASSERT_TRUE(Report(a, q, step)->committed());
    // The same failure every time, but each attempt committed a step first.
    ASSERT_TRUE(Error(a, q, /*infrastructure=*/true, "gang all-to-all failed: peer w-b lost").ok());
    auto job = Get(id).job();
    if (step < 3) {
      ASSERT_EQ(job.state(), mq::v1::JOB_STATE_QUEUED) << job.message();
      // Progress resets the backoff too.
      EXPECT_NE(job.message().find("retrying in 1 s"), std::string::npos) << job.message();
    }
  }
  EXPECT_NE(Get(id).job().state(), mq::v1::JOB_STATE_FAILED);
}

TEST_F(PipelineTest, EventsCarryNoStackTracesAndAreCapped) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  Plan(id, {a});
  coordinator_->Tick();
  auto q = Poll(a);
  ASSERT_TRUE(Error(a, q, /*infrastructure=*/false,
                    WithStack("layer 3 attention: shape mismatch " + std::string(3000, 'x')))
                  .ok());
  auto response = Get(id);
  bool saw = false;
  for (const auto& e : response.events()) {
    EXPECT_LE(e.message().size(), kMaxEventMessageBytes);
    EXPECT_EQ(e.message().find("frame #"), std::string::npos) << e.message();
    saw = saw || e.message().find("layer 3 attention: shape mismatch") != std::string::npos;
  }
  EXPECT_TRUE(saw);
  EXPECT_EQ(response.job().message().find("frame #"), std::string::npos);
}

TEST_F(PipelineTest, RanksDoneWithStepsMissingFailTheAttempt) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  auto q = QuantizeCommitting(a, id, 1);
  ASSERT_TRUE(Quantized(a, q).ok());
  auto job = Get(id);
  EXPECT_EQ(job.job().state(), mq::v1::JOB_STATE_QUEUED);
  EXPECT_NE(job.attempts().rbegin()->message().find("steps 1.. are not committed"),
            std::string::npos)
      << job.attempts().rbegin()->message();
}

TEST_F(PipelineTest, ResumeAfterFailureStartsAtFirstUncommittedStep) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1, /*max_attempts=*/1);
  auto q = QuantizeCommitting(a, id, 2);
  ASSERT_TRUE(Error(a, q).ok());
  ASSERT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FAILED);
  mq::v1::ResumeJobRequest r;
  r.set_job_id(id);
  ASSERT_TRUE(coordinator_->ResumeJob(r).ok());
  coordinator_->Tick();
  auto next = Poll(a);
  ASSERT_EQ(next.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);  // no re-planning
  EXPECT_EQ(next.start_step(), 2);
  EXPECT_EQ(next.committed_files_size(), 2);
  ASSERT_TRUE(Report(a, next, 2)->committed());
  ASSERT_TRUE(Report(a, next, 3)->committed());
  ASSERT_TRUE(Quantized(a, next).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FINALIZING);
  // A failed finalize goes straight back to finalizing.
  coordinator_->Tick();
  auto fin = Poll(a);
  ASSERT_EQ(fin.kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
  ASSERT_TRUE(Error(a, fin, /*infrastructure=*/true).ok());
  Advance(kFirstRetryDelayMs, {a});  // the backoff of a first infrastructure failure
  coordinator_->Tick();
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FINALIZING);
  EXPECT_EQ(Poll(a).kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
}

// Finalization found a committed layer file damaged: its step and every later one are
// uncommitted (records gone, progress back), one event names the file, and the job resumes at
// that step; the recomputed files are finalized.
TEST_F(PipelineTest, CorruptCommittedFileIsUncommittedAndComputedAgain) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  Plan(id, {a});
  auto fin = QuantizeAndFinalize(a, id, 0);
  ASSERT_EQ(Get(id).layers_size(), 4);
  // Only failed assignments name damaged files, and only plain names.
  mq::v1::CompleteAssignmentRequest bad;
  bad.set_worker_id(a);
  bad.set_assignment_id(fin.assignment_id());
  bad.set_lease_epoch(fin.lease_epoch());
  bad.mutable_finalized()->set_manifest_sha256(Sha('e'));
  bad.add_corrupt_files("layer-11-rank-0.safetensors");
  EXPECT_EQ(coordinator_->CompleteAssignment(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad.clear_finalized();
  bad.set_error("x");
  bad.set_corrupt_files(0, "../etc/passwd");
  EXPECT_EQ(coordinator_->CompleteAssignment(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FINALIZING);

  ASSERT_TRUE(Corrupt(a, fin, {"layer-12-rank-0.safetensors", "layer-11-rank-0.safetensors"}).ok());
  ASSERT_TRUE(Corrupt(a, fin, {"layer-11-rank-0.safetensors"}).ok());  // idempotent
  auto job = Get(id);
  EXPECT_EQ(job.job().state(), mq::v1::JOB_STATE_QUEUED) << job.job().message();
  EXPECT_EQ(job.job().uncounted_attempts(), 0);  // counted
  EXPECT_EQ(job.job().progress().layers_committed(), 1);
  ASSERT_EQ(job.layers_size(), 1);
  EXPECT_EQ(job.layers(0).step(), 0);
  EXPECT_EQ(CountEvents(id, "file_corrupt"), 2);
  std::vector<std::string> messages;
  for (const auto& e : job.events()) {
    if (e.kind() == "file_corrupt") messages.push_back(e.message());
  }
  EXPECT_NE(messages[0].find("output file layer-12-rank-0.safetensors failed verification"),
            std::string::npos)
      << messages[0];
  EXPECT_NE(messages[0].find("step 2 (layer 12)"), std::string::npos) << messages[0];
  EXPECT_NE(messages[1].find("layer-11-rank-0.safetensors"), std::string::npos) << messages[1];
  EXPECT_NE(messages[1].find("steps 1.. are uncommitted"), std::string::npos) << messages[1];

  fin = QuantizeAndFinalize(a, id, 1);
  EXPECT_EQ(fin.committed_files_size(), 4);
  mq::v1::CompleteAssignmentRequest done;
  done.set_worker_id(a);
  done.set_assignment_id(fin.assignment_id());
  done.set_lease_epoch(fin.lease_epoch());
  done.mutable_finalized()->set_manifest_sha256(Sha('e'));
  ASSERT_TRUE(coordinator_->CompleteAssignment(done).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(CountEvents(id, "layer_committed"), 4 + 3);
}

// EVALUATING: after finalization one worker measures the output; its report (validated) sets
// the job's quality, the manifest and the gate's verdict. A lost evaluator's work runs again
// without finalizing again; a job over its gate fails with the measured value.
TEST_F(PipelineTest, EvaluationAfterFinalizeAndTheGate) {
  const std::string w = RegisterQ("w1");
  const std::string id = SubmitGang(1, 0, [](mq::v1::EvalSpec& e) { e.set_max_kl(0.05); });
  ASSERT_EQ(Get(id).job().spec().eval().num_samples(), 16);  // the default
  Plan(id, {w});
  auto fin = QuantizeAndFinalize(w, id, 0);
  mq::v1::CompleteAssignmentRequest done;
  done.set_worker_id(w);
  done.set_assignment_id(fin.assignment_id());
  done.set_lease_epoch(fin.lease_epoch());
  done.mutable_finalized()->set_manifest_sha256(Sha('e'));
  ASSERT_TRUE(coordinator_->CompleteAssignment(done).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_EVALUATING);
  EXPECT_EQ(Metric("mq_jobs", "state", "evaluating"), 1);

  // The first evaluator is lost: the evaluation runs again, finalization does not.
  coordinator_->Tick();
  auto lost = Poll(w);
  ASSERT_EQ(lost.kind(), mq::v1::ASSIGNMENT_KIND_EVALUATE);
  EXPECT_EQ(lost.manifest_sha256(), Sha('e'));
  const std::string w2 = RegisterQ("w2");
  Advance(20000, {w2});
  coordinator_->Tick();  // w1's lease expires; the job goes back to evaluating
  Advance(2000, {w2});
  coordinator_->Tick();
  ASSERT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_EVALUATING) << Get(id).job().message();
  auto a = Poll(w2);
  ASSERT_EQ(a.kind(), mq::v1::ASSIGNMENT_KIND_EVALUATE);
  EXPECT_EQ(a.manifest_sha256(), Sha('e'));

  mq::v1::CompleteAssignmentRequest r;
  r.set_worker_id(w2);
  r.set_assignment_id(a.assignment_id());
  r.set_lease_epoch(a.lease_epoch());
  mq::v1::QualityReport* q = r.mutable_evaluated()->mutable_quality();
  q->set_sequences(16);
  q->set_positions(16 * 4095);
  q->set_kl_mean(0.4123);
  q->set_kl_p99(1.5);
  q->set_top1_agreement(0.61);
  q->set_perplexity_reference(10);
  q->set_perplexity_candidate(12.5);
  q->add_layers()->set_relative_error(0.2);
  q->set_source("16 held-out sequences");
  // Bad reports are refused before anything changes.
  mq::v1::CompleteAssignmentRequest bad = r;
  EXPECT_EQ(coordinator_->CompleteAssignment(bad).status().code(),
            absl::StatusCode::kInvalidArgument);  // no manifest for a quantize job
  r.mutable_evaluated()->set_manifest_sha256(Sha('f'));
  bad = r;
  bad.mutable_evaluated()->mutable_quality()->set_kl_mean(std::nan(""));
  EXPECT_EQ(coordinator_->CompleteAssignment(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = r;
  bad.mutable_finalized();
  EXPECT_EQ(coordinator_->CompleteAssignment(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_EVALUATING);

  ASSERT_TRUE(coordinator_->CompleteAssignment(r).ok());
  const mq::v1::JobRecord job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_FAILED);
  EXPECT_NE(job.message().find("failed the quality gate: mean KL 0.4123 > max_kl 0.05"),
            std::string::npos)
      << job.message();
  EXPECT_NE(job.message().find("the output stays in"), std::string::npos) << job.message();
  EXPECT_EQ(job.quality().kl_mean(), 0.4123);
  EXPECT_EQ(job.manifest_sha256(), Sha('f'));  // the manifest with quality.json
  std::vector<std::string> phases;
  const auto full = Get(id);
  for (const auto& at : full.attempts()) phases.push_back(at.phase());
  EXPECT_EQ(phases, (std::vector<std::string>{"plan", "quantize", "finalize", "evaluate",
                                              "evaluate"}));
  EXPECT_EQ(CountEvents(id, "evaluated"), 1);
  EXPECT_EQ(Metric("mq_job_quality_gate_total", "result", "failed"), 1);
}

// A rank replaying committed layers found step 0's file damaged: everything is uncommitted.
TEST_F(PipelineTest, CorruptFileFoundByReplayRestartsFromItsStep) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  auto q = QuantizeCommitting(a, id, 2);
  ASSERT_TRUE(Report(a, q, 2).ok());
  ASSERT_TRUE(Corrupt(a, q, {"layer-10-rank-0.safetensors"}).ok());
  EXPECT_EQ(Get(id).layers_size(), 0);
  EXPECT_EQ(Get(id).job().progress().layers_committed(), 0);
  coordinator_->Tick();
  auto next = Poll(a);
  ASSERT_EQ(next.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
  EXPECT_EQ(next.start_step(), 0);
  EXPECT_EQ(next.committed_files_size(), 0);
}

// A rank that read back the layer file it had just written and found other bytes: the file is
// in no committed step, so nothing is uncommitted; the attempt fails and the job goes on from
// the committed steps.
TEST_F(PipelineTest, FileDamagedAtItsReadBackUncommitsNothing) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  auto q = QuantizeCommitting(a, id, 2);
  ASSERT_TRUE(Corrupt(a, q, {"layer-12-rank-0.safetensors"}).ok());
  EXPECT_EQ(Get(id).layers_size(), 2);
  EXPECT_EQ(Get(id).job().progress().layers_committed(), 2);
  EXPECT_NE(LastEvent(id, "file_corrupt").find("read back right after its write"),
            std::string::npos)
      << LastEvent(id, "file_corrupt");
  coordinator_->Tick();
  auto next = Poll(a);
  ASSERT_EQ(next.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
  EXPECT_EQ(next.start_step(), 2);
}

// A damaged file that belongs to no committed step (the globals file finalization writes):
// finalization runs again; nothing is uncommitted.
TEST_F(PipelineTest, CorruptFileOfNoStepRetriesFinalization) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  Plan(id, {a});
  auto fin = QuantizeAndFinalize(a, id, 0);
  ASSERT_TRUE(Corrupt(a, fin, {"model-globals.safetensors"}).ok());
  EXPECT_EQ(Get(id).layers_size(), 4);
  EXPECT_NE(LastEvent(id, "file_corrupt").find("no committed step lists it"), std::string::npos)
      << LastEvent(id, "file_corrupt");
  coordinator_->Tick();
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FINALIZING);
  EXPECT_EQ(Poll(a).kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
}

// Storage that damages the same file again and again: the job fails naming it after
// spec.max_attempts findings, although each recomputation succeeded; a resume starts counting
// again.
TEST_F(PipelineTest, FileDamagedAgainAndAgainFailsTheJobNamingIt) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1, /*max_attempts=*/2);
  Plan(id, {a});
  auto fin = QuantizeAndFinalize(a, id, 0);
  ASSERT_TRUE(Corrupt(a, fin, {"layer-13-rank-0.safetensors"}).ok());
  ASSERT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_QUEUED);
  fin = QuantizeAndFinalize(a, id, 3);
  ASSERT_TRUE(Corrupt(a, fin, {"layer-13-rank-0.safetensors"}).ok());
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_FAILED) << job.message();
  EXPECT_NE(job.message().find("layer-13-rank-0.safetensors was found damaged 2 times"),
            std::string::npos)
      << job.message();
  EXPECT_EQ(Get(id).layers_size(), 3);
  mq::v1::ResumeJobRequest r;
  r.set_job_id(id);
  ASSERT_TRUE(coordinator_->ResumeJob(r).ok());
  fin = QuantizeAndFinalize(a, id, 3);
  ASSERT_TRUE(Corrupt(a, fin, {"layer-13-rank-0.safetensors"}).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_QUEUED) << Get(id).job().message();
}

TEST_F(PipelineTest, CancelStopsEveryRank) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  mq::v1::CancelJobRequest c;
  c.set_job_id(id);
  ASSERT_TRUE(coordinator_->CancelJob(c).ok());
  EXPECT_EQ(HeartbeatCancels(a, qa.assignment_id()).size(), 1u);
  EXPECT_EQ(HeartbeatCancels(b, qb.assignment_id()).size(), 1u);
  EXPECT_EQ(Report(a, qa, 0).status().code(), absl::StatusCode::kAborted);
}

TEST_F(PipelineTest, PlanWithoutQuantizeWorkersFailsWithMissingCapability) {
  const std::string w = Register("planner-only");
  const std::string id = SubmitGang(1);
  Plan(id, {w});
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.missing_capability(), "quantize:gptq");
  EXPECT_NE(job.message().find("mq-client resume"), std::string::npos) << job.message();
  // A quantize worker arrives; resume continues from the plan.
  const std::string q = RegisterQ("w-q");
  mq::v1::ResumeJobRequest r;
  r.set_job_id(id);
  ASSERT_TRUE(coordinator_->ResumeJob(r).ok());
  coordinator_->Tick();
  EXPECT_EQ(Poll(q).kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
}

// Close and reopen a RocksDB store mid-attempt: committed steps stay, the live gang goes on.
// ---------------------------------------------------------------------------------------------
// Fencing of the finalizer: publish (the manifest) only with the coordinator's consent, never
// two attempts of a job at once.

class FinalizeFenceTest : public PipelineTest {
 protected:
  // Runs job `id` (gang of 1) on the worker that gets it up to FINALIZING and returns that
  // worker and its FINALIZE assignment (delivered).
  std::pair<std::string, mq::v1::Assignment> ToFinalize(const std::string& id,
                                                        const std::vector<std::string>& workers) {
    Plan(id, workers);
    coordinator_->Tick();
    for (const std::string& w : workers) {
      auto q = Poll(w);
      if (q.assignment_id().empty()) continue;
      EXPECT_EQ(q.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
      for (int step = 0; step < 4; ++step) EXPECT_TRUE(Report(w, q, step)->committed());
      EXPECT_TRUE(Quantized(w, q).ok());
      EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_FINALIZING);
      coordinator_->Tick();
      auto f = Poll(w);
      EXPECT_EQ(f.kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
      return {w, f};
    }
    ADD_FAILURE() << "no worker got the quantize assignment";
    return {};
  }

  absl::Status Publish(const std::string& worker_id, const mq::v1::Assignment& a,
                       int64_t epoch_delta = 0) {
    mq::v1::ReportProgressRequest r;
    r.set_worker_id(worker_id);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch() + epoch_delta);
    r.set_stage("publishing the manifest");
    r.set_fraction(1);
    r.set_publish(true);
    return coordinator_->ReportProgress(r).status();
  }

  absl::Status Finalized(const std::string& worker_id, const mq::v1::Assignment& a) {
    mq::v1::CompleteAssignmentRequest r;
    r.set_worker_id(worker_id);
    r.set_assignment_id(a.assignment_id());
    r.set_lease_epoch(a.lease_epoch());
    r.mutable_finalized()->set_manifest_sha256(Sha('e'));
    r.mutable_finalized()->set_files(3);
    r.mutable_finalized()->set_total_bytes(300);
    return coordinator_->CompleteAssignment(r).status();
  }
};

TEST_F(FinalizeFenceTest, CancelBeforePublishingRefusesThePublish) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  auto [w, fa] = ToFinalize(id, {a});
  ASSERT_TRUE(CancelIt(*coordinator_, id).ok());
  absl::Status s = Publish(w, fa);
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_EQ(Finalized(w, fa).code(), absl::StatusCode::kAborted);
  auto job = Get(id).job();
  EXPECT_EQ(job.state(), mq::v1::JOB_STATE_CANCELLED);
  EXPECT_FALSE(job.publishing());
  EXPECT_EQ(CountEvents(id, "publishing"), 0);
}

TEST_F(FinalizeFenceTest, CancelIsRefusedOncePublishing) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(1);
  auto [w, fa] = ToFinalize(id, {a, b});
  const std::string other = w == a ? b : a;
  // Only the live finalize assignment's holder, with its lease epoch, may publish.
  EXPECT_EQ(Publish(w, fa, /*epoch_delta=*/-1).code(), absl::StatusCode::kAborted);
  EXPECT_EQ(Publish(other, fa).code(), absl::StatusCode::kAborted);
  EXPECT_FALSE(Get(id).job().publishing());
  ASSERT_TRUE(Publish(w, fa).ok());
  EXPECT_TRUE(Get(id).job().publishing());
  ASSERT_TRUE(Publish(w, fa).ok());  // repeated: same answer, one event
  EXPECT_EQ(CountEvents(id, "publishing"), 1);
  absl::Status cancel = CancelIt(*coordinator_, id);
  ASSERT_EQ(cancel.code(), absl::StatusCode::kFailedPrecondition) << cancel;
  EXPECT_NE(cancel.message().find("is publishing its output and is about to succeed"),
            std::string::npos)
      << cancel;
  ASSERT_TRUE(Finalized(w, fa).ok());
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(Publish(w, fa).ok());  // a late repeat after the result was accepted
}

TEST_F(FinalizeFenceTest, QuantizeAssignmentsDoNotPublish) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  Plan(id, {a});
  coordinator_->Tick();
  auto q = Poll(a);
  ASSERT_EQ(q.kind(), mq::v1::ASSIGNMENT_KIND_QUANTIZE);
  EXPECT_EQ(Publish(a, q).code(), absl::StatusCode::kAborted);
  EXPECT_FALSE(Get(id).job().publishing());
}

TEST_F(FinalizeFenceTest, AFailedFinalizeAfterPublishingCanBeCancelledAgain) {
  const std::string a = RegisterQ("w-a");
  const std::string id = SubmitGang(1);
  auto [w, fa] = ToFinalize(id, {a});
  ASSERT_TRUE(Publish(w, fa).ok());
  ASSERT_TRUE(Error(w, fa, /*infrastructure=*/true).ok());
  auto job = Get(id).job();
  EXPECT_FALSE(job.publishing()) << job.message();
  Advance(kMaxRetryDelayMs, {a});  // past the infrastructure backoff
  coordinator_->Tick();
  auto again = Poll(w);
  ASSERT_EQ(again.kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
  EXPECT_EQ(Publish(w, fa).code(), absl::StatusCode::kAborted);  // the old attempt's
  EXPECT_TRUE(CancelIt(*coordinator_, id).ok());
}

TEST_F(FinalizeFenceTest, CancelThenResumeWaitsForTheOldFinalizerToPoll) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(1);
  auto [w, fa] = ToFinalize(id, {a, b});
  const std::string other = w == a ? b : a;
  ASSERT_TRUE(CancelIt(*coordinator_, id).ok());
  ASSERT_TRUE(ResumeIt(*coordinator_, id).ok());
  // The cancelled finalizer may still be writing: nobody gets the job until it polls again.
  for (int i = 0; i < 3; ++i) {
    now_ += 100;
    Heartbeat(a);
    Heartbeat(b);
    coordinator_->Tick();
    EXPECT_TRUE(Poll(other).assignment_id().empty());
  }
  EXPECT_EQ(Get(id).job().attempt(), fa.attempt());
  EXPECT_TRUE(Poll(w).assignment_id().empty());  // it stopped and polls: the job may go on
  coordinator_->Tick();
  auto next = Poll(w);
  if (next.assignment_id().empty()) next = Poll(other);
  ASSERT_EQ(next.kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
  EXPECT_EQ(next.attempt(), fa.attempt() + 1);
  EXPECT_EQ(Publish(w, fa).code(), absl::StatusCode::kAborted);
}

TEST_F(FinalizeFenceTest, CancelThenResumeGoesOnOnceTheOldFinalizerIsDeclaredDead) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(1);
  auto [w, fa] = ToFinalize(id, {a, b});
  const std::string other = w == a ? b : a;
  ASSERT_TRUE(CancelIt(*coordinator_, id).ok());
  ASSERT_TRUE(ResumeIt(*coordinator_, id).ok());
  for (int i = 0; i < 12; ++i) {  // the old finalizer falls silent
    now_ += 100;
    Heartbeat(other);
    coordinator_->Tick();
  }
  auto next = Poll(other);
  ASSERT_EQ(next.kind(), mq::v1::ASSIGNMENT_KIND_FINALIZE);
}

class PipelineRocksDbTest : public PipelineTest {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("mq-pipeline-" + std::to_string(getpid()));
    std::filesystem::remove_all(dir_);
    Reopen();
  }
  void TearDown() override {
    coordinator_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Reopen() {
    coordinator_.reset();
    store_.reset();
    auto store = OpenRocksDbStore(dir_.string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    Restart();
  }
  std::filesystem::path dir_;
};

TEST_F(PipelineRocksDbTest, RecoverMidAttemptKeepsCommittedLayersAndAcceptsReports) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  ASSERT_TRUE(Report(a, qa, 0).ok());
  ASSERT_TRUE(Report(b, qb, 0)->committed());
  ASSERT_TRUE(Report(a, qa, 1).ok());  // pending
  const auto before = Get(id);
  Reopen();
  auto after = Get(id);
  EXPECT_EQ(after.job().SerializeAsString(), before.job().SerializeAsString());
  ASSERT_EQ(after.layers_size(), 2);
  EXPECT_TRUE(after.layers(0).committed());
  EXPECT_FALSE(after.layers(1).committed());
  EXPECT_EQ(after.layers(1).reports_size(), 1);
  Heartbeat(a);
  Heartbeat(b);
  coordinator_->Tick();
  EXPECT_EQ(Get(id).job().state(), mq::v1::JOB_STATE_RUNNING);
  EXPECT_TRUE(Report(b, qb, 1)->committed());
  EXPECT_TRUE(Report(a, qa, 0)->committed());  // a repeat from before the restart
  EXPECT_EQ(Get(id).job().progress().layers_committed(), 2);
  EXPECT_EQ(CountEvents(id, "layer_committed"), 2);
}

TEST_F(PipelineRocksDbTest, RendezvousSecretSurvivesARestartMidAttempt) {
  const std::string a = RegisterQ("w-a");
  const std::string b = RegisterQ("w-b");
  const std::string id = SubmitGang(2);
  Plan(id, {a, b});
  coordinator_->Tick();
  auto qa = Poll(a), qb = Poll(b);
  ASSERT_EQ(qa.rendezvous_secret().size(), 32u);
  ASSERT_EQ(qb.rendezvous_secret(), qa.rendezvous_secret());
  Reopen();
  Heartbeat(a);
  Heartbeat(b);
  coordinator_->Tick();
  // Delivered again after the restart: the same attempt with the same secret, so ranks that
  // polled before and after the restart still form one gang.
  auto ra = Poll(a), rb = Poll(b);
  ASSERT_EQ(ra.assignment_id(), qa.assignment_id());
  ASSERT_EQ(rb.assignment_id(), qb.assignment_id());
  EXPECT_EQ(ra.rendezvous_secret(), qa.rendezvous_secret());
  EXPECT_EQ(rb.rendezvous_secret(), qa.rendezvous_secret());
}

}  // namespace
}  // namespace mq::server
