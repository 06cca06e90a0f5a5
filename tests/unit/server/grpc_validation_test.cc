// Malformed requests over real gRPC (loopback, in-process server, RocksDB store): every one is
// INVALID_ARGUMENT naming the field, and the server keeps serving.

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>

#include "mq/v1/job_service.grpc.pb.h"
#include "mq/v1/worker_service.grpc.pb.h"
#include "server/coordinator.h"
#include "server/grpc_services.h"
#include "tests/unit/server/loopback_server.h"

namespace mq::server {
namespace {

class GrpcValidationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("mq-grpc-validation-" + std::to_string(getpid()));
    std::filesystem::remove_all(dir_);
    auto store = OpenRocksDbStore(dir_.string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    auto c = Coordinator::Recover(store_.get(), CoordinatorOptions(), nullptr);
    ASSERT_TRUE(c.ok());
    coordinator_ = *std::move(c);
    jobs_ = std::make_unique<JobServiceImpl>(coordinator_.get(), nullptr);
    workers_ = std::make_unique<WorkerServiceImpl>(coordinator_.get(), nullptr);
    LoopbackServer loopback = StartLoopbackServer(jobs_.get(), workers_.get());
    server_ = std::move(loopback.server);
    ASSERT_NE(loopback.job_stub, nullptr);
    job_stub_ = std::move(loopback.job_stub);
    worker_stub_ = std::move(loopback.worker_stub);
  }

  void TearDown() override {
    server_->Shutdown();
    coordinator_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  static mq::v1::SubmitJobRequest Valid() {
    mq::v1::SubmitJobRequest r;
    r.mutable_spec()->set_model_uri("/models/dsv3");
    r.mutable_spec()->set_output_uri("file:///out/dsv3");
    return r;
  }

  grpc::Status Submit(const mq::v1::SubmitJobRequest& r) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    mq::v1::SubmitJobResponse resp;
    return job_stub_->SubmitJob(&ctx, r, &resp);
  }

  template <typename Req, typename Resp, typename Method>
  grpc::Status Call(Method method, const Req& r) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!session_.empty()) ctx.AddMetadata("mq-worker-session", session_);
    Resp resp;
    return method(&ctx, r, &resp);
  }

  // Registers a worker whose id and session later worker calls use (the identity check comes
  // before the fields are validated).
  void RegisterHolder() {
    grpc::ClientContext ctx;
    mq::v1::RegisterWorkerRequest r;
    r.set_name("holder");
    r.mutable_capabilities()->set_device("cpu");
    mq::v1::RegisterWorkerResponse resp;
    ASSERT_TRUE(worker_stub_->RegisterWorker(&ctx, r, &resp).ok());
    worker_id_ = resp.worker_id();
    session_ = resp.session();
  }

  static void ExpectInvalid(const grpc::Status& s, const std::string& field,
                            const std::string& what) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what << ": "
                                                                   << s.error_message();
    EXPECT_NE(s.error_message().find(field), std::string::npos)
        << what << ": message \"" << s.error_message() << "\" does not name " << field;
  }

  std::string worker_id_, session_;
  std::filesystem::path dir_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<JobServiceImpl> jobs_;
  std::unique_ptr<WorkerServiceImpl> workers_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<mq::v1::JobService::Stub> job_stub_;
  std::unique_ptr<mq::v1::WorkerService::Stub> worker_stub_;
};

TEST_F(GrpcValidationTest, EveryBadSpecFieldIsNamed) {
  ASSERT_TRUE(Submit(Valid()).ok());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    std::string field;
    std::function<void(mq::v1::SubmitJobRequest&)> mutate;
  };
  std::vector<Case> cases = {
      {"spec", [](auto& r) { r.clear_spec(); }},
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->clear_model_uri(); }},
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->set_model_uri("models/rel"); }},
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->set_model_uri("s3://b/m"); }},  // bucket
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->set_model_uri("s3://bucket/a//m"); }},
      {"spec.output_uri", [](auto& r) { r.mutable_spec()->set_output_uri("s3://bucket/o/../p"); }},
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->set_model_uri("ftp://h/m"); }},
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->set_model_uri("/a\nb"); }},
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->set_model_uri(std::string("/a\0b", 4)); }},
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->set_model_uri("/" + std::string(5000, 'x')); }},
      {"spec.model_uri", [](auto& r) { r.mutable_spec()->set_model_uri("file://"); }},
      {"spec.output_uri", [](auto& r) { r.mutable_spec()->clear_output_uri(); }},
      {"spec.output_uri", [](auto& r) { r.mutable_spec()->set_output_uri("/models/dsv3/"); }},
      {"spec.output_uri", [](auto& r) { r.mutable_spec()->set_output_uri("/models/dsv3/q"); }},
      {"spec.method", [](auto& r) { r.mutable_spec()->set_method(static_cast<mq::v1::Method>(42)); }},
      {"spec.method", [](auto& r) { r.mutable_spec()->set_method(static_cast<mq::v1::Method>(99)); }},
      {"spec.awq", [](auto& r) { r.mutable_spec()->mutable_awq()->set_grid(5); }},
      {"spec.awq", [](auto& r) { r.mutable_spec()->set_method(mq::v1::METHOD_RTN); r.mutable_spec()->mutable_awq()->set_max_tokens(64); }},
      {"spec.awq.grid", [](auto& r) { r.mutable_spec()->set_method(mq::v1::METHOD_AWQ); r.mutable_spec()->mutable_awq()->set_grid(101); }},
      {"spec.awq.grid", [](auto& r) { r.mutable_spec()->set_method(mq::v1::METHOD_AWQ_GPTQ); r.mutable_spec()->mutable_awq()->set_grid(-1); }},
      {"spec.awq.max_tokens", [](auto& r) { r.mutable_spec()->set_method(mq::v1::METHOD_AWQ); r.mutable_spec()->mutable_awq()->set_max_tokens(-1); }},
      {"spec.awq.max_tokens", [](auto& r) { r.mutable_spec()->set_method(mq::v1::METHOD_AWQ_GPTQ); r.mutable_spec()->mutable_awq()->set_max_tokens(16777217); }},
      {"spec.symmetric", [](auto& r) { r.mutable_spec()->set_method(mq::v1::METHOD_AWQ); r.mutable_spec()->set_symmetric(false); }},
      {"spec.symmetric", [](auto& r) { r.mutable_spec()->set_symmetric(false); }},
      {"spec.calibration.min_expert_tokens", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_min_expert_tokens(-2); }},
      {"spec.calibration.min_expert_tokens", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_min_expert_tokens(int64_t{1} << 40); }},
      {"spec.calibration.rare_expert_rtn", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_min_expert_tokens(-1); r.mutable_spec()->mutable_calibration()->set_rare_expert_rtn(true); }},
      {"spec.bits", [](auto& r) { r.mutable_spec()->set_bits(3); }},
      {"spec.bits", [](auto& r) { r.mutable_spec()->set_bits(-4); }},
      {"spec.group_size", [](auto& r) { r.mutable_spec()->set_group_size(96); }},
      {"spec.group_size", [](auto& r) { r.mutable_spec()->set_group_size(-2); }},
      {"spec.scale_search", [](auto& r) { r.mutable_spec()->set_scale_search(static_cast<mq::v1::ScaleSearch>(9)); }},
      {"spec.damping", [=](auto& r) { r.mutable_spec()->set_damping(nan); }},
      {"spec.damping", [=](auto& r) { r.mutable_spec()->set_damping(inf); }},
      {"spec.damping", [](auto& r) { r.mutable_spec()->set_damping(-0.1); }},
      {"spec.damping", [](auto& r) { r.mutable_spec()->set_damping(1.5); }},
      {"spec.targets", [](auto& r) { r.mutable_spec()->set_targets(static_cast<mq::v1::TargetSet>(7)); }},
      {"spec.ignore[1]", [](auto& r) { r.mutable_spec()->add_ignore("ok.*"); r.mutable_spec()->add_ignore("(bad"); }},
      {"spec.ignore[0]", [](auto& r) { r.mutable_spec()->add_ignore(""); }},
      {"spec.ignore", [](auto& r) { for (int i = 0; i < 300; ++i) r.mutable_spec()->add_ignore("x"); }},
      {"spec.calibration.dataset_uri", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_dataset_uri("data.jsonl"); }},
      {"spec.calibration.tokenizer_uri", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_tokenizer_uri("tok.json"); }},
      {"spec.calibration.num_samples", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_num_samples(-1); }},
      {"spec.calibration.num_samples", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_num_samples(2000000); }},
      {"spec.calibration.max_sequence_length", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_max_sequence_length(-5); }},
      {"spec.calibration.max_sequence_length", [](auto& r) { r.mutable_spec()->mutable_calibration()->set_max_sequence_length(int64_t{1} << 40); }},
      {"spec.gang_size", [](auto& r) { r.mutable_spec()->set_gang_size(-1); }},
      {"spec.gang_size", [](auto& r) { r.mutable_spec()->set_gang_size(2000); }},
      {"spec.priority", [](auto& r) { r.mutable_spec()->set_priority(10000); }},
      {"spec.max_attempts", [](auto& r) { r.mutable_spec()->set_max_attempts(-1); }},
      {"spec.max_attempts", [](auto& r) { r.mutable_spec()->set_max_attempts(101); }},
      {"idempotency_key", [](auto& r) { r.set_idempotency_key("has space"); }},
      {"idempotency_key", [](auto& r) { r.set_idempotency_key(std::string(129, 'k')); }},
      {"idempotency_key", [](auto& r) { r.set_idempotency_key("caf\xc3\xa9"); }},
  };
  for (const Case& c : cases) {
    mq::v1::SubmitJobRequest r = Valid();
    c.mutate(r);
    ExpectInvalid(Submit(r), c.field, "submit " + c.field);
  }
  // Value and allowed set are in the message too.
  mq::v1::SubmitJobRequest r = Valid();
  r.mutable_spec()->set_group_size(96);
  EXPECT_EQ(Submit(r).error_message(), "spec.group_size = 96: must be 32, 64, 128 or -1 (per channel)");
  r = Valid();
  r.mutable_spec()->mutable_calibration()->set_min_expert_tokens(-7);
  EXPECT_EQ(Submit(r).error_message(),
            "spec.calibration.min_expert_tokens = -7: must be -1 (no rare-expert treatment), 0 (the "
            "default, 16) or between 1 and 1000000000");
  r = Valid();
  r.mutable_spec()->set_method(static_cast<mq::v1::Method>(99));
  EXPECT_EQ(Submit(r).error_message(), "spec.method = 99: must be gptq, awq, awq-gptq or rtn");
  r = Valid();
  r.mutable_spec()->set_output_uri(r.spec().output_uri() + "-again");  // the first job's is taken
  ASSERT_TRUE(Submit(r).ok());  // still serving
}

TEST_F(GrpcValidationTest, OtherJobServiceRequests) {
  auto get = [&](std::string id) {
    mq::v1::GetJobRequest r;
    r.set_job_id(id);
    return Call<mq::v1::GetJobRequest, mq::v1::GetJobResponse>(
        [&](auto* c, auto& q, auto* p) { return job_stub_->GetJob(c, q, p); }, r);
  };
  for (std::string bad : std::vector<std::string>{"", "abc", "j-0000000000000000000000000", "j-0000000000000000000000000U",
                          "j-00000000000000000000000000x", std::string("j-\0", 3)}) {
    ExpectInvalid(get(bad), "job_id", "get " + bad);
  }
  EXPECT_EQ(get("j-00000000000000000000000000").error_code(), grpc::StatusCode::NOT_FOUND);

  auto list = [&](std::function<void(mq::v1::ListJobsRequest&)> f) {
    mq::v1::ListJobsRequest r;
    f(r);
    return Call<mq::v1::ListJobsRequest, mq::v1::ListJobsResponse>(
        [&](auto* c, auto& q, auto* p) { return job_stub_->ListJobs(c, q, p); }, r);
  };
  ExpectInvalid(list([](auto& r) { r.set_page_size(-1); }), "page_size", "list");
  ExpectInvalid(list([](auto& r) { r.set_page_size(5000); }), "page_size", "list");
  ExpectInvalid(list([](auto& r) { r.add_states(static_cast<mq::v1::JobState>(99)); }), "states", "list");
  ExpectInvalid(list([](auto& r) { r.add_states(mq::v1::JOB_STATE_UNSPECIFIED); }), "states", "list");
  ExpectInvalid(list([](auto& r) { r.set_page_token("garbage"); }), "page_token", "list");

  mq::v1::CancelJobRequest cancel;
  cancel.set_job_id("nope");
  ExpectInvalid(Call<mq::v1::CancelJobRequest, mq::v1::CancelJobResponse>(
                    [&](auto* c, auto& q, auto* p) { return job_stub_->CancelJob(c, q, p); }, cancel),
                "job_id", "cancel");
  cancel.set_job_id("j-00000000000000000000000000");
  cancel.set_reason(std::string(2000, 'r'));
  ExpectInvalid(Call<mq::v1::CancelJobRequest, mq::v1::CancelJobResponse>(
                    [&](auto* c, auto& q, auto* p) { return job_stub_->CancelJob(c, q, p); }, cancel),
                "reason", "cancel reason");
  mq::v1::ResumeJobRequest resume;
  ExpectInvalid(Call<mq::v1::ResumeJobRequest, mq::v1::ResumeJobResponse>(
                    [&](auto* c, auto& q, auto* p) { return job_stub_->ResumeJob(c, q, p); }, resume),
                "job_id", "resume");

  auto inspect = [&](std::function<void(mq::v1::InspectModelRequest&)> f) {
    mq::v1::InspectModelRequest r;
    r.set_model_uri("/models/x");
    f(r);
    return Call<mq::v1::InspectModelRequest, mq::v1::InspectModelResponse>(
        [&](auto* c, auto& q, auto* p) { return job_stub_->InspectModel(c, q, p); }, r);
  };
  ExpectInvalid(inspect([](auto& r) { r.clear_model_uri(); }), "model_uri", "inspect");
  ExpectInvalid(inspect([](auto& r) { r.set_model_uri("rel/dir"); }), "model_uri", "inspect");
  ExpectInvalid(inspect([](auto& r) { r.set_gang_size(-3); }), "gang_size", "inspect");
  ExpectInvalid(inspect([](auto& r) { r.set_bits(8); }), "bits", "inspect");
  ExpectInvalid(inspect([](auto& r) { r.set_group_size(7); }), "group_size", "inspect");
  ExpectInvalid(inspect([](auto& r) { r.set_targets(static_cast<mq::v1::TargetSet>(9)); }), "targets", "inspect");
  ExpectInvalid(inspect([](auto& r) { r.set_num_samples(-1); }), "num_samples", "inspect");
  ExpectInvalid(inspect([](auto& r) { r.set_max_sequence_length(-1); }), "max_sequence_length", "inspect");
}

TEST_F(GrpcValidationTest, WorkerServiceRequests) {
  auto reg = [&](std::function<void(mq::v1::RegisterWorkerRequest&)> f) {
    mq::v1::RegisterWorkerRequest r;
    r.set_name("w1");
    r.mutable_capabilities()->set_device("cpu");
    f(r);
    return Call<mq::v1::RegisterWorkerRequest, mq::v1::RegisterWorkerResponse>(
        [&](auto* c, auto& q, auto* p) { return worker_stub_->RegisterWorker(c, q, p); }, r);
  };
  ASSERT_TRUE(reg([](auto&) {}).ok());
  ExpectInvalid(reg([](auto& r) { r.clear_name(); }), "name", "register");
  ExpectInvalid(reg([](auto& r) { r.set_name("bad name"); }), "name", "register");
  ExpectInvalid(reg([](auto& r) { r.set_name(std::string(65, 'n')); }), "name", "register");
  ExpectInvalid(reg([](auto& r) { r.mutable_capabilities()->set_device("tpu:0"); }),
                "capabilities.device", "register");
  ExpectInvalid(reg([](auto& r) { r.set_worker_id("bogus"); }), "worker_id", "register");

  RegisterHolder();
  mq::v1::PollAssignmentRequest poll;
  poll.set_worker_id(worker_id_);
  poll.set_wait_ms(-1);
  ExpectInvalid(Call<mq::v1::PollAssignmentRequest, mq::v1::PollAssignmentResponse>(
                    [&](auto* c, auto& q, auto* p) { return worker_stub_->PollAssignment(c, q, p); }, poll),
                "wait_ms", "poll");
  poll.set_wait_ms(100000);
  ExpectInvalid(Call<mq::v1::PollAssignmentRequest, mq::v1::PollAssignmentResponse>(
                    [&](auto* c, auto& q, auto* p) { return worker_stub_->PollAssignment(c, q, p); }, poll),
                "wait_ms", "poll");

  auto progress = [&](std::function<void(mq::v1::ReportProgressRequest&)> f) {
    mq::v1::ReportProgressRequest r;
    r.set_worker_id(worker_id_);
    f(r);
    return Call<mq::v1::ReportProgressRequest, mq::v1::ReportProgressResponse>(
        [&](auto* c, auto& q, auto* p) { return worker_stub_->ReportProgress(c, q, p); }, r);
  };
  ExpectInvalid(progress([](auto& r) { r.set_fraction(2); }), "fraction", "progress");
  ExpectInvalid(progress([](auto& r) { r.set_fraction(std::nan("")); }), "fraction", "progress");
  ExpectInvalid(progress([](auto& r) { r.set_stage(std::string(300, 's')); }), "stage", "progress");

  mq::v1::CompleteAssignmentRequest complete;
  complete.set_worker_id(worker_id_);
  complete.set_assignment_id("a-x");
  ExpectInvalid(Call<mq::v1::CompleteAssignmentRequest, mq::v1::CompleteAssignmentResponse>(
                    [&](auto* c, auto& q, auto* p) { return worker_stub_->CompleteAssignment(c, q, p); },
                    complete),
                "result", "complete");
}

TEST_F(GrpcValidationTest, MalformedReportLayerFieldsAreNamed) {
  RegisterHolder();
  auto report = [&](std::function<void(mq::v1::ReportLayerRequest&)> f) {
    mq::v1::ReportLayerRequest r;
    r.set_worker_id(worker_id_);
    r.set_assignment_id("a-x");
    r.set_step(0);
    r.set_rank(0);
    mq::v1::OutputFile* file = r.add_files();
    file->set_name("layer-3.safetensors");
    file->set_size_bytes(10);
    file->set_sha256(std::string(64, 'a'));
    f(r);
    return Call<mq::v1::ReportLayerRequest, mq::v1::ReportLayerResponse>(
        [&](auto* c, auto& q, auto* p) { return worker_stub_->ReportLayer(c, q, p); }, r);
  };
  // A well-formed report for an unknown assignment passes validation and is NOT_FOUND.
  EXPECT_EQ(report([](auto&) {}).error_code(), grpc::StatusCode::NOT_FOUND);
  struct Case {
    std::string field;
    std::function<void(mq::v1::ReportLayerRequest&)> mutate;
  };
  std::vector<Case> cases = {
      {"step", [](auto& r) { r.set_step(-1); }},
      {"layer", [](auto& r) { r.set_layer(-2); }},
      {"rank", [](auto& r) { r.set_rank(-1); }},
      {"files[0].name", [](auto& r) { r.mutable_files(0)->set_name(""); }},
      {"files[0].name", [](auto& r) { r.mutable_files(0)->set_name(std::string(256, 'n')); }},
      {"files[0].name", [](auto& r) { r.mutable_files(0)->set_name("a/b.safetensors"); }},
      {"files[0].name", [](auto& r) { r.mutable_files(0)->set_name("."); }},
      {"files[0].name", [](auto& r) { r.mutable_files(0)->set_name(".."); }},
      {"files[0].name", [](auto& r) { r.mutable_files(0)->set_name(std::string("a\0b", 3)); }},
      {"files[0].sha256", [](auto& r) { r.mutable_files(0)->set_sha256(""); }},
      {"files[0].sha256", [](auto& r) { r.mutable_files(0)->set_sha256(std::string(64, 'A')); }},
      {"files[0].sha256", [](auto& r) { r.mutable_files(0)->set_sha256(std::string(63, 'a')); }},
      {"files[0].sha256", [](auto& r) { r.mutable_files(0)->set_sha256(std::string(64, 'g')); }},
      {"files[0].size_bytes", [](auto& r) { r.mutable_files(0)->set_size_bytes(-1); }},
      {"files[0].verified",
       [](auto& r) { r.mutable_files(0)->mutable_verified()->set_ctime_ns(-1); }},
      {"files[0].verified",
       [](auto& r) { r.mutable_files(0)->mutable_verified()->set_mtime_ns(-5); }},
      {"files[1].name", [](auto& r) { *r.add_files() = r.files(0); }},
      {"files[1].sha256", [](auto& r) {
         auto* f = r.add_files();
         f->set_name("other");
         f->set_sha256("zz");
       }},
      {"stats.load_seconds", [](auto& r) { r.mutable_stats()->set_load_seconds(-1); }},
      {"stats.write_seconds",
       [](auto& r) { r.mutable_stats()->set_write_seconds(std::numeric_limits<double>::infinity()); }},
      {"stats.mean_relative_error", [](auto& r) { r.mutable_stats()->set_mean_relative_error(std::nan("")); }},
      {"stats.expert_tokens_min", [](auto& r) { r.mutable_stats()->set_expert_tokens_min(-3); }},
      {"stats.fallbacks", [](auto& r) { r.mutable_stats()->set_fallbacks(-1); }},
      {"stats.exchange_seconds", [](auto& r) { r.mutable_stats()->set_exchange_seconds(-0.5); }},
      {"stats.dispatch_rounds", [](auto& r) { r.mutable_stats()->set_dispatch_rounds(-1); }},
      {"stats.expert_passes", [](auto& r) { r.mutable_stats()->set_expert_passes(-2); }},
      {"stats.device_peak_reserved_bytes", [](auto& r) { r.mutable_stats()->set_device_peak_reserved_bytes(-1); }},
      {"stats.device_alloc_retries", [](auto& r) { r.mutable_stats()->set_device_alloc_retries(-4); }},
      {"stats.rare[0]", [](auto& r) { r.mutable_stats()->add_rare()->set_expert(-1); }},
      {"stats.awq", [](auto& r) { for (int i = 0; i < 65; ++i) r.mutable_stats()->add_awq(); }},
      {"stats.awq[1].smooth", [](auto& r) { r.mutable_stats()->add_awq(); r.mutable_stats()->add_awq()->set_smooth(std::string(513, 's')); }},
      {"stats.awq[0].alpha", [](auto& r) { r.mutable_stats()->add_awq()->set_alpha(1.5); }},
      {"stats.awq[0].alpha", [](auto& r) { r.mutable_stats()->add_awq()->set_alpha(std::nan("")); }},
      {"stats.awq[0].loss_identity", [](auto& r) { r.mutable_stats()->add_awq()->set_loss_identity(-1); }},
      {"stats.awq[0].loss_chosen", [](auto& r) { r.mutable_stats()->add_awq()->set_loss_chosen(std::numeric_limits<double>::infinity()); }},
      {"stats.awq[0].mappings", [](auto& r) { r.mutable_stats()->add_awq()->set_mappings(-1); }},
      {"stats.awq[0].rows", [](auto& r) { r.mutable_stats()->add_awq()->set_rows(-1); }},
      {"stats.awq[0].identity_chosen", [](auto& r) { r.mutable_stats()->add_awq()->set_identity_chosen(1); }},
      {"stats.awq[0].routing_changed_tokens", [](auto& r) { r.mutable_stats()->add_awq()->set_routing_changed_tokens(5); }},
  };
  for (const Case& c : cases) ExpectInvalid(report(c.mutate), c.field, "report " + c.field);
  EXPECT_EQ(report([](auto& r) { r.mutable_files(0)->set_sha256("XYZ"); }).error_message(),
            "files[0].sha256 = \"XYZ\": must be 64 lowercase hex characters");
  // A full AWQ entry within bounds passes validation (and is NOT_FOUND, as above).
  EXPECT_EQ(report([](auto& r) {
              mq::v1::AwqMapping* m = r.mutable_stats()->add_awq();
              m->set_smooth("model.layers.3.post_attention_layernorm");
              m->set_balance_layers(3);
              m->set_mappings(1);
              m->set_identity_chosen(1);
              m->set_alpha(1);
              m->set_loss_identity(0.5);
              m->set_loss_chosen(0.25);
              m->set_rows(4096);
              m->set_routing_changed_tokens(12);
              m->set_routing_tokens(4096);
            }).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(report([](auto& r) { r.mutable_stats()->add_awq()->set_alpha(1.5); }).error_message(),
            "stats.awq[0].alpha = 1.5: must be in [0, 1]");

  mq::v1::CompleteAssignmentRequest complete;
  complete.set_worker_id(worker_id_);
  complete.set_assignment_id("a-x");
  complete.mutable_finalized()->set_manifest_sha256("nothex");
  ExpectInvalid(Call<mq::v1::CompleteAssignmentRequest, mq::v1::CompleteAssignmentResponse>(
                    [&](auto* c, auto& q, auto* p) { return worker_stub_->CompleteAssignment(c, q, p); },
                    complete),
                "finalized.manifest_sha256", "finalize");
  complete.mutable_finalized()->set_manifest_sha256(std::string(64, 'b'));
  complete.mutable_finalized()->set_total_bytes(-1);
  ExpectInvalid(Call<mq::v1::CompleteAssignmentRequest, mq::v1::CompleteAssignmentResponse>(
                    [&](auto* c, auto& q, auto* p) { return worker_stub_->CompleteAssignment(c, q, p); },
                    complete),
                "finalized.total_bytes", "finalize");
}

}  // namespace
}  // namespace mq::server
