#include "worker/worker.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/error_text.h"
#include "common/path_policy.h"
#include "common/path_policy_proto.h"
#include "common/s3/s3_config.h"
#include "common/status.h"
#include "common/util.h"
#include "worker/model/plan.h"
#include "worker/plan_convert.h"
#include "worker/s3_inputs.h"
#if MQ_WORKER_HAS_PIPELINE
#include "worker/pipeline/evaluate_job.h"
#include "worker/pipeline/quantize_job.h"
#endif

namespace mq::worker {
namespace {

// Longest error text sent with a failed assignment (the coordinator caps its events further).
constexpr size_t kMaxResultErrorBytes = 4096;

bool Retryable(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::DEADLINE_EXCEEDED ||
         code == grpc::StatusCode::RESOURCE_EXHAUSTED || code == grpc::StatusCode::INTERNAL ||
         code == grpc::StatusCode::UNKNOWN || code == grpc::StatusCode::CANCELLED;
}

void SleepMs(int64_t ms, const std::atomic<bool>& stop) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (!stop && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min<int64_t>(ms, 50)));
  }
}

// Calls `call` until it returns OK or a status that retrying cannot change, backing off from
// 200 ms to 2 s between tries (the coordinator may be restarting). Returns the last status;
// CANCELLED when `stop` was set first.
template <typename Call>
grpc::Status CallUntilSettled(const std::atomic<bool>& stop, const std::string& what, Call call) {
  int64_t backoff = 200;
  while (!stop) {
    grpc::Status s = call();
    if (s.ok() || !Retryable(s.error_code())) return s;
    LogLine("worker", "WARN",
            what + ": coordinator unavailable (" + s.error_message() + "); retrying");
    SleepMs(backoff, stop);
    backoff = std::min<int64_t>(backoff * 2, 2000);
  }
  return grpc::Status(grpc::StatusCode::CANCELLED, "stopping");
}

// Fault injection (off unless the variable is set): milliseconds to stall at one point of an
// assignment, so tests can kill, cancel or resume while work is in flight:
//   MQ_FAULT_PLAN_DELAY_MS      inside a PLAN assignment, before inspecting;
//   MQ_FAULT_STEP_DELAY_MS      after each reported pipeline step;
//   MQ_FAULT_EVAL_LAYER_DELAY_MS  inside an EVALUATE assignment after each progress report (each
//                               evaluated layer);
//   MQ_FAULT_FINALIZE_DELAY_MS  inside a FINALIZE assignment just before asking to publish the
//                               manifest, deaf to cancellation like a finalizer busy writing.
int64_t FaultDelayMs(const char* variable) {
  const char* v = std::getenv(variable);
  return v ? std::atoll(v) : 0;
}

// Fault injection: MQ_FAULT_GANG_ADVERTISE_HOST makes the worker advertise that host as its gang
// address (it still listens on --gang-host), as a misconfigured or unreachable address would:
// its peers, and itself as rank 0, then cannot join.
std::string GangAdvertiseHost(const std::string& gang_host) {
  const char* v = std::getenv("MQ_FAULT_GANG_ADVERTISE_HOST");
  return v && *v ? v : gang_host;
}

// The assignment's locations against its path policy, after resolving symlinks (the
// coordinator checked them lexically at submit; a symlink may lead elsewhere): one
// ("request.<field>", message) per refused location. Run before anything is read or created.
std::vector<std::pair<std::string, std::string>> PathProblems(const mq::v1::Assignment& a) {
  const PathPolicy policy = FromProto(a.path_policy());
  const mq::v1::JobSpec& spec = a.spec();
  struct Location {
    const char* field;
    const std::string& value;
    PathAccess access;
  };
  std::vector<Location> locations = {{"model_uri", spec.model_uri(), PathAccess::kRead}};
  if (!a.job_id().empty()) {  // a job (not an inspection): its data and output too
    locations.push_back(
        {"calibration.dataset_uri", spec.calibration().dataset_uri(), PathAccess::kRead});
    locations.push_back(
        {"calibration.tokenizer_uri", spec.calibration().tokenizer_uri(), PathAccess::kRead});
    locations.push_back({"eval.dataset_uri", spec.eval().dataset_uri(), PathAccess::kRead});
    if (spec.eval().candidate_uri().empty()) {
      locations.push_back({"output_uri", spec.output_uri(), PathAccess::kWrite});
    } else {  // an evaluation job reads its candidate and writes nothing
      locations.push_back({"eval.candidate_uri", spec.eval().candidate_uri(), PathAccess::kRead});
    }
  }
  std::vector<std::pair<std::string, std::string>> problems;
  for (const Location& l : locations) {
    absl::Status s = CheckPathResolved(policy, l.access, absl::StrCat("spec.", l.field), l.value);
    if (!s.ok()) problems.emplace_back(absl::StrCat("request.", l.field), std::string(s.message()));
  }
  return problems;
}

std::string KindName(mq::v1::AssignmentKind k) {
  switch (k) {
    case mq::v1::ASSIGNMENT_KIND_QUANTIZE: return "quantize";
    case mq::v1::ASSIGNMENT_KIND_FINALIZE: return "finalize";
    case mq::v1::ASSIGNMENT_KIND_EVALUATE: return "evaluate";
    default: return "plan";
  }
}

#if MQ_WORKER_HAS_PIPELINE
std::string LocalPath(const std::string& uri) {
  return uri.rfind("file://", 0) == 0 ? uri.substr(7) : uri;
}

pipeline::QuantizeJobSpec ToJobSpec(const std::string& job_id, const mq::v1::JobSpec& spec) {
  pipeline::QuantizeJobSpec j;
  j.job_id = job_id;
  j.model_dir = LocalPath(spec.model_uri());
  j.output_dir = LocalPath(spec.output_uri());
  switch (spec.method()) {
    case mq::v1::METHOD_RTN: j.method = "rtn"; break;
    case mq::v1::METHOD_AWQ: j.method = "awq"; break;
    case mq::v1::METHOD_AWQ_GPTQ: j.method = "awq-gptq"; break;
    default: j.method = "gptq";
  }
  // The coordinator fills spec.awq for AWQ jobs; the defaults cover a spec that lacks it.
  j.awq_grid = spec.awq().has_grid() ? spec.awq().grid() : 20;
  j.awq_max_tokens = spec.awq().max_tokens() > 0 ? spec.awq().max_tokens() : 32768;
  j.group_size = spec.group_size() == 0 ? 128 : spec.group_size();
  j.symmetric = !spec.has_symmetric() || spec.symmetric();
  j.act_order = !spec.has_act_order() || spec.act_order();
  j.tf32_update = spec.tf32_update();
  j.scale_search = spec.scale_search() == mq::v1::SCALE_SEARCH_MSE ? "mse" : "minmax";
  j.damping = spec.damping() > 0 ? spec.damping() : 0.01;
  j.targets = spec.targets() == mq::v1::TARGET_SET_ALL_LINEAR ? "all_linear" : "routed_experts";
  j.ignore.assign(spec.ignore().begin(), spec.ignore().end());
  j.include_mtp = spec.include_mtp();
  const mq::v1::CalibrationSpec& c = spec.calibration();
  j.dataset = LocalPath(c.dataset_uri());
  j.tokenizer = LocalPath(c.tokenizer_uri());
  if (c.num_samples() > 0) j.num_samples = c.num_samples();
  if (c.max_sequence_length() > 0) j.max_sequence_length = c.max_sequence_length();
  j.seed = c.seed();
  j.min_expert_tokens = c.min_expert_tokens() == 0 ? 16 : c.min_expert_tokens();
  j.rare_expert_rtn = c.rare_expert_rtn();
  const mq::v1::EvalSpec& e = spec.eval();
  j.eval_samples = e.has_num_samples() ? e.num_samples() : 16;
  j.eval_dataset = LocalPath(e.dataset_uri());
  j.eval_max_sequence_length = e.max_sequence_length();
  if (e.has_max_kl()) j.max_kl = e.max_kl();
  if (e.has_max_ppl_ratio()) j.max_ppl_ratio = e.max_ppl_ratio();
  j.candidate_dir = LocalPath(e.candidate_uri());
  return j;
}

// A failed QUANTIZE or FINALIZE assignment's result: the message, whether the infrastructure
// failed (UNAVAILABLE: a gang peer lost, another finalization holding the directory), and the
// committed files found damaged (DATA_LOSS), which the coordinator uncommits and recomputes.
void SetError(const absl::Status& status, mq::v1::CompleteAssignmentRequest* result) {
  result->set_error(EventMessage(std::string(status.message()), kMaxResultErrorBytes));
  result->set_infrastructure(status.code() == absl::StatusCode::kUnavailable);
  for (const std::string& f : pipeline::CorruptFilesOf(status)) result->add_corrupt_files(f);
}

std::vector<pipeline::OutputFileInfo> ToFiles(
    const google::protobuf::RepeatedPtrField<mq::v1::OutputFile>& files) {
  std::vector<pipeline::OutputFileInfo> out;
  for (const mq::v1::OutputFile& f : files) {
    pipeline::OutputFileInfo info{f.name(), f.size_bytes(), f.sha256(), std::nullopt};
    if (f.has_verified()) {
      const mq::v1::FileStamp& v = f.verified();
      info.verified = pipeline::FileStamp{v.device(), v.inode(), v.mtime_ns(), v.ctime_ns()};
    }
    out.push_back(std::move(info));
  }
  return out;
}

void ToProto(const pipeline::StepStats& s, int step, int layer, mq::v1::LayerStats* p) {
  p->set_step(step);
  p->set_layer(layer);
  p->set_load_seconds(s.load_seconds);
  p->set_forward_seconds(s.forward_seconds);
  p->set_hessian_seconds(s.hessian_seconds);
  p->set_solve_seconds(s.solve_seconds);
  p->set_propagate_seconds(s.propagate_seconds);
  p->set_write_seconds(s.write_seconds);
  p->set_exchange_seconds(s.exchange_seconds);
  p->set_expert_tokens_min(s.expert_tokens_min);
  p->set_expert_tokens_median(s.expert_tokens_median);
  p->set_expert_tokens_max(s.expert_tokens_max);
  p->set_dispatch_rounds(s.dispatch_rounds);
  p->set_expert_passes(s.expert_passes);
  p->set_quantized_linears(s.quantized_linears);
  p->set_fallbacks(s.fallbacks);
  p->set_rare_experts(static_cast<int32_t>(s.rare.size()));
  for (const pipeline::RareExpertInfo& r : s.rare) {
    mq::v1::RareExpert* e = p->add_rare();
    e->set_expert(r.expert);
    e->set_routed_tokens(r.routed_tokens);
    e->set_treatment(r.treatment);
  }
  p->set_mean_relative_error(s.mean_relative_error);
  p->set_device_peak_allocated_bytes(s.device_peak_allocated_bytes);
  p->set_device_peak_reserved_bytes(s.device_peak_reserved_bytes);
  p->set_device_alloc_retries(s.device_alloc_retries);
  for (const pipeline::AwqMappingInfo& m : s.awq) {
    mq::v1::AwqMapping* a = p->add_awq();
    a->set_smooth(m.smooth);
    a->set_balance_layers(m.balance_layers);
    a->set_mappings(m.mappings);
    a->set_identity_chosen(m.identity_chosen);
    a->set_alpha(m.alpha);
    a->set_loss_identity(m.loss_identity);
    a->set_loss_chosen(m.loss_chosen);
    a->set_rows(m.rows);
    a->set_routing_changed_tokens(m.routing_changed_tokens);
    a->set_routing_tokens(m.routing_tokens);
  }
}
#endif

}  // namespace

grpc::ChannelArguments CoordinatorChannelArgs() {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
  args.SetMaxReceiveMessageSize(64 << 20);
  return args;
}

Worker::Worker(WorkerOptions options, DeviceInfo device, WorkerMetrics* metrics,
               std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      device_(std::move(device)),
      metrics_(metrics),
      channel_(std::move(channel)) {
  stub_ = mq::v1::WorkerService::NewStub(channel_);
}

std::unique_ptr<grpc::ClientContext> Worker::Context(int64_t timeout_ms, bool wait_for_ready) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  ctx->set_wait_for_ready(wait_for_ready);
  std::lock_guard<std::mutex> lock(session_mu_);
  if (!session_.empty()) ctx->AddMetadata("mq-worker-session", session_);
  return ctx;
}

bool Worker::Register(const std::atomic<bool>& stop) {
  mq::v1::RegisterWorkerRequest request;
  request.set_name(options_.name);
  mq::v1::WorkerCapabilities* caps = request.mutable_capabilities();
  caps->set_device(device_.device);
  caps->set_device_name(device_.device_name);
  caps->set_device_memory_bytes(device_.device_memory_bytes);
  caps->set_host_memory_bytes(device_.host_memory_bytes);
  caps->set_cpu_cores(device_.cpu_cores);
  caps->set_hostname(device_.hostname);
  caps->add_capabilities("plan");
#if MQ_WORKER_HAS_PIPELINE
  if (options_.gang_port > 0) {
    caps->add_capabilities("quantize:gptq");
    caps->add_capabilities("quantize:rtn");
    caps->add_capabilities("quantize:awq");
    caps->add_capabilities("quantize:awq-gptq");
    caps->add_capabilities("evaluate");
    caps->set_gang_address(
        absl::StrCat(GangAdvertiseHost(options_.gang_host), ":", options_.gang_port));
  }
#endif
  caps->set_version(Version());
  caps->set_scratch_dir(options_.scratch_dir);
  caps->set_scratch_free_bytes(device_.scratch_free_bytes);
  mq::v1::RegisterWorkerResponse response;
  grpc::Status s = CallUntilSettled(stop, "register", [&] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      request.set_worker_id(worker_id_);
    }
    auto ctx = Context(10000);
    return stub_->RegisterWorker(ctx.get(), request, &response);
  });
  if (!s.ok()) {
    if (!stop) LogLine("worker", "ERROR", "registration refused: " + s.error_message());
    return false;
  }
  {
    std::lock_guard<std::mutex> session_lock(session_mu_);
    session_ = response.session();
  }
  std::lock_guard<std::mutex> lock(mu_);
  worker_id_ = response.worker_id();
  heartbeat_interval_ms_ = response.heartbeat_interval_ms();
  need_register_ = false;
  LogLine("worker", "INFO",
          absl::StrCat("registered as ", worker_id_, " (", options_.name, ", ", device_.device,
                       ") with ", options_.coordinator, ", lease ", response.lease_ms(), " ms"));
  return true;
}

void Worker::HeartbeatLoop(const std::atomic<bool>& stop) {
  while (!stop && !quit_) {
    int64_t interval;
    mq::v1::HeartbeatRequest request;
    {
      std::lock_guard<std::mutex> lock(mu_);
      interval = heartbeat_interval_ms_;
      request.set_worker_id(worker_id_);
      request.set_assignment_id(current_assignment_);
    }
    mq::v1::HeartbeatResponse response;
    auto ctx = Context(std::max<int64_t>(interval, 1000), /*wait_for_ready=*/false);
    grpc::Status s = stub_->Heartbeat(ctx.get(), request, &response);
    if (s.ok()) {
      metrics_->heartbeats->Increment();
      for (const std::string& id : response.cancel_assignment_ids()) {
        std::lock_guard<std::mutex> lock(mu_);
        if (id == current_assignment_) {
          cancel_current_ = true;
          LogLine("worker", "WARN", "coordinator cancelled assignment " + id);
        }
      }
    } else {
      metrics_->heartbeat_failures->Increment();
      if (s.error_code() == grpc::StatusCode::NOT_FOUND) need_register_ = true;
    }
    SleepMs(interval, stop);
  }
}

bool Worker::Cancelled() { return cancel_current_.load(); }

void Worker::Progress(const mq::v1::Assignment& a, const std::string& stage, double fraction) {
  mq::v1::ReportProgressRequest request;
  {
    std::lock_guard<std::mutex> lock(mu_);
    request.set_worker_id(worker_id_);
  }
  request.set_assignment_id(a.assignment_id());
  request.set_lease_epoch(a.lease_epoch());
  request.set_stage(stage);
  request.set_fraction(fraction);
  mq::v1::ReportProgressResponse response;
  auto ctx = Context(2000, /*wait_for_ready=*/false);
  grpc::Status s = stub_->ReportProgress(ctx.get(), request, &response);
  if (s.error_code() == grpc::StatusCode::ABORTED ||
      s.error_code() == grpc::StatusCode::NOT_FOUND || response.cancel()) {
    cancel_current_ = true;
  }
}

absl::Status Worker::RequestPublish(const mq::v1::Assignment& a, const std::atomic<bool>& stop) {
  const int64_t delay = FaultDelayMs("MQ_FAULT_FINALIZE_DELAY_MS");
  if (delay > 0) {
    LogLine("worker", "INFO",
            absl::StrCat("fault injection: stalling ", delay, " ms before publishing ",
                         a.assignment_id()));
    SleepMs(delay, stop);
  }
  mq::v1::ReportProgressRequest request;
  request.set_assignment_id(a.assignment_id());
  request.set_lease_epoch(a.lease_epoch());
  request.set_stage("publishing the manifest");
  request.set_fraction(1);
  request.set_publish(true);
  mq::v1::ReportProgressResponse response;
  grpc::Status s = CallUntilSettled(stop, "publish " + a.assignment_id(), [&] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      request.set_worker_id(worker_id_);
    }
    auto ctx = Context(10000);
    return stub_->ReportProgress(ctx.get(), request, &response);
  });
  if (!s.ok()) {
    cancel_current_ = true;
    LogLine("worker", "WARN",
            absl::StrCat("publish refused for ", a.assignment_id(), ": ", s.error_message(),
                         "; no manifest is written"));
    return absl::AbortedError(absl::StrCat("publish refused: ", s.error_message()));
  }
  return absl::OkStatus();
}

void Worker::Complete(mq::v1::CompleteAssignmentRequest request, const std::atomic<bool>& stop) {
  const std::string what = "report " + request.assignment_id();
  grpc::Status s = CallUntilSettled(stop, what, [&] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      request.set_worker_id(worker_id_);
    }
    mq::v1::CompleteAssignmentResponse response;
    auto ctx = Context(10000);
    return stub_->CompleteAssignment(ctx.get(), request, &response);
  });
  if (!s.ok() && !stop) {
    LogLine(
        "worker", "WARN",
        absl::StrCat("result for ", request.assignment_id(), " not accepted: ", s.error_message()));
  }
}

void Worker::RunAssignment(const mq::v1::Assignment& original, const std::atomic<bool>& stop) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    current_assignment_ = original.assignment_id();
  }
  // s3:// inputs allowed by the path policy are staged into local copies (s3_inputs.h); the rest
  // of the assignment reads those. The policy is checked on the locations the job named.
  mq::v1::Assignment staged;
  absl::Status staging;
  const bool s3_inputs = HasS3Inputs(original) && PathProblems(original).empty();
  s3_output_ = S3Output();
  if (s3_inputs) {
    staging =
        StageS3Inputs(options_.scratch_dir + "/s3-inputs", original, &staged, &s3_output_);
    if (staging.ok() && original.kind() != mq::v1::ASSIGNMENT_KIND_PLAN) {
      staging = PrepareS3Output(s3_output_, staged);
    }
  }
  const mq::v1::Assignment& a = s3_inputs && staging.ok() ? staged : original;
  cancel_current_ = false;
  const std::string kind = KindName(a.kind());
  LogLine(
      "worker", "INFO",
      absl::StrCat("running ", kind, " assignment ", a.assignment_id(),
                   a.job_id().empty() ? "" : " of job " + a.job_id(), " attempt ", a.attempt()));
  mq::v1::CompleteAssignmentRequest result;
  result.set_assignment_id(a.assignment_id());
  result.set_lease_epoch(a.lease_epoch());
  bool aborted = false;
  if (a.kind() == mq::v1::ASSIGNMENT_KIND_PLAN) {
    const auto start = std::chrono::steady_clock::now();
    const int64_t delay = FaultDelayMs("MQ_FAULT_PLAN_DELAY_MS");
    for (int64_t waited = 0; waited < delay && !stop && !Cancelled(); waited += 100) {
      if (waited % 1000 == 0) Progress(a, "waiting (fault injection)", double(waited) / delay);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    aborted = stop || Cancelled();
    if (!aborted) {
      Progress(a, "reading config, index and safetensors headers", 0);
      model::InspectRequest request = ToInspectRequest(a.spec());
      // How this pool's workers solve: as the flags say, or chosen by the plan for this
      // worker's device (its host memory on the CPU).
      request.experts_per_pass = options_.experts_per_pass;
      request.dispatch_tokens = options_.dispatch_tokens;
      request.checkpoint_every = options_.checkpoint_every;
      request.preload_next_layer = options_.preload_next_layer;
      request.device_is_host = device_.device_memory_bytes <= 0;
      request.device_memory_bytes =
          request.device_is_host ? device_.host_memory_bytes : device_.device_memory_bytes;
      // A refused location is neither read nor created: the plan reports it instead.
      std::vector<std::pair<std::string, std::string>> refused = PathProblems(original);
      if (!staging.ok()) refused.emplace_back("request.s3", std::string(staging.message()));
      // The dataset may hold fewer sequences than asked for: the job then calibrates on what
      // it has, and the plan estimates for that (and says so in a note).
      std::string fewer;
#if MQ_WORKER_HAS_PIPELINE
      if (refused.empty() && !a.job_id().empty() && options_.gang_port > 0) {
        const pipeline::QuantizeJobSpec spec = ToJobSpec(a.job_id(), a.spec());
        absl::StatusOr<int64_t> held = pipeline::DatasetSamples(spec);
        if (held.ok() && *held > 0 && *held < request.num_calibration_samples) {
          fewer = absl::StrCat(
              "the dataset ", spec.dataset, " holds ", *held, " sequences, fewer than the ",
              request.num_calibration_samples, " asked for: the job calibrates on ", *held,
              " and this plan is for them",
              spec.eval_samples > 0 && spec.eval_dataset.empty()
                  ? " (none is left for the evaluation to hold out: give it --eval-dataset)"
                  : "");
          request.num_calibration_samples = *held;
        }
      }
#endif
      model::InspectReport report;
      if (refused.empty()) report = model::InspectCheckpoint(request);
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      metrics_->ObserveStage("plan", secs);
      *result.mutable_plan() = ToProto(report);
      if (!fewer.empty()) {
        mq::v1::Problem* note = result.mutable_plan()->add_notes();
        note->set_where("request.calibration.num_samples");
        note->set_message(fewer);
      }
      for (const auto& [where, what] : refused) {
        mq::v1::Problem* p = result.mutable_plan()->add_problems();
        p->set_where(where);
        p->set_message(what);
        LogLine("worker", "WARN", absl::StrCat("assignment ", a.assignment_id(), ": ", what));
      }
#if MQ_WORKER_HAS_PIPELINE
      // Also the data and output locations.
      if (refused.empty() && !a.job_id().empty() && options_.gang_port > 0) {
        const pipeline::QuantizeJobSpec spec = ToJobSpec(a.job_id(), a.spec());
        for (const auto& [where, what] : pipeline::CheckQuantizeInputs(spec)) {
          mq::v1::Problem* p = result.mutable_plan()->add_problems();
          p->set_where(where);
          p->set_message(what);
        }
        // A plan without problems claims the output directory for the job (one with problems
        // leaves it unclaimed, so a corrected job may use it).
        if (result.plan().problems_size() == 0) {
          absl::Status s = pipeline::ClaimOutput(spec);
          if (s.ok()) s = ClaimS3OutputPrefix(s3_output_);  // an s3:// output's marker object
          if (!s.ok()) {
            mq::v1::Problem* p = result.mutable_plan()->add_problems();
            p->set_where("request.output_uri");
            p->set_message(std::string(s.message()));
          }
        }
      }
#endif
      result.mutable_plan()->set_seconds(secs);
      {
        std::lock_guard<std::mutex> lock(mu_);
        result.mutable_plan()->set_worker_id(worker_id_);
      }
    }
  } else if (auto refused = PathProblems(original); !refused.empty() || !staging.ok()) {
    // QUANTIZE and FINALIZE: checked again, the locations may have changed since planning.
    if (!staging.ok()) refused.emplace_back("request.s3", std::string(staging.message()));
    std::vector<std::string> messages;
    for (const auto& [where, what] : refused) messages.push_back(what);
    result.set_error(EventMessage(absl::StrJoin(messages, "; "), kMaxResultErrorBytes));
    LogLine("worker", "WARN",
            absl::StrCat(kind, " assignment ", a.assignment_id(), " refused: ", result.error()));
  } else if (a.kind() == mq::v1::ASSIGNMENT_KIND_QUANTIZE) {
    aborted = !RunQuantize(a, &result, stop);
  } else if (a.kind() == mq::v1::ASSIGNMENT_KIND_FINALIZE) {
    aborted = !RunFinalize(a, &result, stop);
  } else if (a.kind() == mq::v1::ASSIGNMENT_KIND_EVALUATE) {
    aborted = !RunEvaluate(a, original.spec(), &result, stop);
  } else {
    result.set_error(
        absl::StrCat("this mq-worker (", Version(), ") cannot run ", kind, " assignments"));
  }
  if (aborted) {
    metrics_->CountAssignment(kind, "aborted");
    LogLine("worker", "INFO", "assignment " + a.assignment_id() + " abandoned");
  } else {
    Complete(result, stop);
    metrics_->CountAssignment(kind, result.has_error() ? "failed" : "ok");
    LogLine("worker", "INFO", "assignment " + a.assignment_id() + " done");
  }
  std::lock_guard<std::mutex> lock(mu_);
  current_assignment_.clear();
}

#if MQ_WORKER_HAS_PIPELINE
bool Worker::RunQuantize(const mq::v1::Assignment& a, mq::v1::CompleteAssignmentRequest* result,
                         const std::atomic<bool>& stop) {
  // Checkpoints of other jobs (kept after an aborted attempt) are of no use any more.
  pipeline::RemoveScratchExcept(options_.scratch_dir, a.job_id());
  pipeline::QuantizeAssignmentInput in;
  in.spec = ToJobSpec(a.job_id(), a.spec());
  in.rank = a.rank();
  in.world_size = a.world_size();
  in.rendezvous = a.rendezvous();
  in.gang_key = absl::StrCat(a.job_id(), "/", a.attempt());
  in.rendezvous_secret = a.rendezvous_secret();
  in.local_host = options_.gang_host;
  in.start_step = a.start_step();
  in.total_steps = a.total_steps();
  in.committed_files = ToFiles(a.committed_files());
  in.scratch_dir = options_.scratch_dir + "/" + a.job_id();
  in.device = device_.device;
  in.join_timeout_ms = options_.gang_join_timeout_ms;
  if (a.has_settings()) {  // the job's plan: every rank runs what it estimated
    in.experts_per_pass = a.settings().experts_per_pass();
    in.dispatch_tokens = a.settings().dispatch_tokens();
  } else {  // a job planned without settings: this worker's flags, their former defaults
    in.experts_per_pass =
        options_.experts_per_pass >= 0 ? options_.experts_per_pass : model::kFallbackExpertsPerPass;
    in.dispatch_tokens =
        options_.dispatch_tokens >= 0 ? options_.dispatch_tokens : model::kFallbackDispatchTokens;
  }
  LogLine("worker", "INFO",
          absl::StrCat("job ", a.job_id(), " rank ", a.rank(), ": experts per pass ",
                       in.experts_per_pass, ", dispatch tokens ", in.dispatch_tokens,
                       a.has_settings() ? " (the job's plan)" : " (this worker's flags)"));
  in.checkpoint_every = options_.checkpoint_every;
  in.cpu_threads = options_.cpu_threads;
  in.overlap_writes = options_.overlap_writes;
  in.prefetch_next_layer = options_.prefetch_next_layer;
  in.stage_next_layer = options_.stage_next_layer;
  in.overlap_transfers = options_.overlap_transfers;
  in.preload_next_layer =
      options_.preload_next_layer && a.has_settings() && a.settings().preload_next_layer();
  in.profile_layers = options_.profile_layers;
  in.profile_dir = options_.profile_dir;
  const int64_t step_delay = FaultDelayMs("MQ_FAULT_STEP_DELAY_MS");
  in.on_step = [&](const pipeline::StepOutput& out) -> absl::Status {
    // The stages ran whether or not the report is accepted.
    metrics_->ObserveLayer({out.stats.load_seconds, out.stats.forward_seconds,
                            out.stats.hessian_seconds, out.stats.solve_seconds,
                            out.stats.propagate_seconds, out.stats.write_seconds});
    mq::v1::ReportLayerRequest request;
    request.set_assignment_id(a.assignment_id());
    request.set_lease_epoch(a.lease_epoch());
    request.set_step(out.step);
    request.set_layer(out.layer);
    request.set_rank(a.rank());
    for (const pipeline::OutputFileInfo& f : out.files) {
      mq::v1::OutputFile* p = request.add_files();
      p->set_name(f.name);
      p->set_size_bytes(f.size);
      p->set_sha256(f.sha256);
      if (f.verified) {
        mq::v1::FileStamp* v = p->mutable_verified();
        v->set_device(f.verified->device);
        v->set_inode(f.verified->inode);
        v->set_mtime_ns(f.verified->mtime_ns);
        v->set_ctime_ns(f.verified->ctime_ns);
      }
    }
    ToProto(out.stats, out.step, out.layer, request.mutable_stats());
    // An s3:// output: the layer's objects are complete before the layer is reported.
    std::vector<std::pair<std::string, std::string>> uploads;
    for (const pipeline::OutputFileInfo& f : out.files) uploads.emplace_back(f.name, f.sha256);
    if (absl::Status s = UploadS3Files(s3_output_, uploads); !s.ok()) return s;
    mq::v1::ReportLayerResponse response;
    grpc::Status s = CallUntilSettled(stop, absl::StrCat("layer ", out.layer, " report"), [&] {
      {
        std::lock_guard<std::mutex> lock(mu_);
        request.set_worker_id(worker_id_);
      }
      auto ctx = Context(10000);
      return stub_->ReportLayer(ctx.get(), request, &response);
    });
    if (!s.ok()) {
      cancel_current_ = true;
      return absl::AbortedError(absl::StrCat("layer report refused: ", s.error_message()));
    }
    if (response.cancel()) cancel_current_ = true;
    for (int64_t waited = 0; waited < step_delay && !stop && !Cancelled(); waited += 50) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return absl::OkStatus();
  };
  in.on_progress = [&](const std::string& stage, double fraction) { Progress(a, stage, fraction); };
  in.on_warning = [&](const std::string& message) {
    LogLine("worker", "WARN", absl::StrCat("job ", a.job_id(), ": ", message));
  };
  in.cancelled = [&] { return stop || Cancelled(); };
  absl::StatusOr<pipeline::QuantizeAssignmentResult> r = pipeline::RunQuantizeAssignment(in);
  if (stop || Cancelled()) return false;  // the coordinator moved on; nothing to report
  if (!r.ok()) {
    // The coordinator records this in the job's events: the message without stack traces
    // (the log line below keeps the full status).
    SetError(r.status(), result);
    LogLine("worker", "WARN", absl::StrCat("quantize assignment ", a.assignment_id(),
                                           " failed: ", r.status().ToString()));
    return true;
  }
  result->mutable_quantized()->set_steps_run(r->steps_run);
  result->mutable_quantized()->set_steps_replayed(r->steps_replayed);
  LogLine("worker", "INFO",
          absl::StrCat("quantize assignment ", a.assignment_id(), " of job ", a.job_id(), ": ",
                       r->steps_run, " steps run, ", r->steps_replayed, " replayed",
                       a.start_step() == 0 ? ""
                       : r->resumed_from_step >= 0
                           ? absl::StrCat(" after the hidden-state checkpoint of step ",
                                          r->resumed_from_step + 1)
                           : std::string(" from the embeddings"),
                       "; hidden states checkpointed every ", r->checkpoint_every,
                       r->checkpoint_every == 1 ? " step" : " steps"));
  return true;
}

bool Worker::RunFinalize(const mq::v1::Assignment& a, mq::v1::CompleteAssignmentRequest* result,
                         const std::atomic<bool>& stop) {
  Progress(a, "finalizing: globals, index, config, manifest", 0);
  // Called once every file but the manifest is written and verified: the manifest is
  // published only with the coordinator's consent, so a cancelled or superseded finalizer
  // writes none.
  auto publish = [&]() -> absl::Status { return RequestPublish(a, stop); };
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<pipeline::FinalizeAssignmentResult> r = pipeline::RunFinalizeAssignment(
      ToJobSpec(a.job_id(), a.spec()), ToFiles(a.committed_files()), a.total_steps(), publish);
  if (!r.ok() && (stop || Cancelled())) return false;  // publish refused: abandoned, nothing to report
  if (r.ok()) {
    if (absl::Status s = PublishS3Output(s3_output_); !s.ok()) r = s;  // manifest uploaded last
  }
  metrics_->ObserveStage(
      "finalize", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  if (!r.ok()) {
    SetError(r.status(), result);
    LogLine("worker", "WARN",
            absl::StrCat("finalize assignment ", a.assignment_id(),
                         " failed: ", r.status().ToString()));
    return true;
  }
  const pipeline::VerifyCounts& v = r->verified;
  LogLine("worker", "INFO",
          absl::StrCat("finalize assignment ", a.assignment_id(), ": committed files checked, ",
                       v.hashed_files, " read again (", v.hashed_bytes, " bytes), ",
                       v.stamped_files, " unchanged since read back after their commit"));
  mq::v1::FinalizeResult* f = result->mutable_finalized();
  f->set_manifest_sha256(r->manifest_sha256);
  f->set_files(r->files);
  f->set_total_bytes(r->total_bytes);
  f->set_removed_files(r->removed_files);
  return true;
}

bool Worker::RunEvaluate(const mq::v1::Assignment& a, const mq::v1::JobSpec& named,
                         mq::v1::CompleteAssignmentRequest* result, const std::atomic<bool>& stop) {
  pipeline::EvaluateAssignmentInput in;
  in.spec = ToJobSpec(a.job_id(), a.spec());
  // quality.json names an s3:// input by its URI, not by the staged copy's path.
  const std::string& dataset = named.eval().dataset_uri().empty()
                                   ? named.calibration().dataset_uri()
                                   : named.eval().dataset_uri();
  if (s3::IsS3Uri(named.model_uri())) in.reference_name = named.model_uri();
  if (s3::IsS3Uri(dataset)) in.dataset_name = dataset;
  in.manifest_sha256 = a.manifest_sha256();
  in.device = device_.device;
  in.cpu_threads = options_.cpu_threads;
  const int64_t delay = FaultDelayMs("MQ_FAULT_EVAL_LAYER_DELAY_MS");
  in.on_progress = [&](const std::string& stage, double fraction) {
    Progress(a, stage, fraction);
    if (delay > 0) SleepMs(delay, stop);
  };
  in.cancelled = [&] { return stop || Cancelled(); };
  Progress(a, "evaluating: loading the sequences", 0);
  absl::StatusOr<pipeline::EvaluateAssignmentResult> r = pipeline::RunEvaluateAssignment(in);
  if (!r.ok() && (stop || Cancelled())) return false;
  if (r.ok()) {
    if (absl::Status s = PublishS3Output(s3_output_); !s.ok()) r = s;  // quality.json, manifest
  }
  if (!r.ok()) {
    SetError(r.status(), result);
    LogLine("worker", "WARN",
            absl::StrCat("evaluate assignment ", a.assignment_id(), " failed: ",
                         r.status().ToString()));
    return true;
  }
  metrics_->ObserveStage("evaluate", r->seconds);
  mq::v1::EvaluateResult* e = result->mutable_evaluated();
  mq::v1::QualityReport* q = e->mutable_quality();
  const eval::NextTokenQuality& t = r->report.next_token;
  q->set_sequences(r->report.sequences);
  q->set_sequence_length(r->report.sequence_length);
  q->set_positions(t.positions);
  q->set_kl_mean(t.kl_mean);
  q->set_kl_p99(t.kl_p99);
  q->set_kl_max(t.kl_max);
  q->set_top1_agreement(t.top1_agreement);
  q->set_perplexity_reference(t.perplexity_reference);
  q->set_perplexity_candidate(t.perplexity_candidate);
  for (const eval::LayerError& l : r->report.layers) {
    mq::v1::LayerQuality* lq = q->add_layers();
    lq->set_layer(l.layer);
    lq->set_relative_error(l.relative_error);
  }
  q->set_source(r->source);
  q->set_seconds(r->seconds);
  q->set_not_measured(r->not_measured);
  q->set_gate(r->gate);
  e->set_manifest_sha256(r->manifest_sha256);
  e->set_files(r->files);
  e->set_total_bytes(r->total_bytes);
  LogLine("worker", "INFO",
          absl::StrCat("evaluate assignment ", a.assignment_id(), " of job ", a.job_id(), ": ",
                       r->not_measured.empty()
                           ? absl::StrCat("mean KL ", t.kl_mean, ", top-1 agreement ",
                                          t.top1_agreement)
                           : r->not_measured,
                       " in ", absl::SixDigits(r->seconds), " s"));
  return true;
}
#else
bool Worker::RunQuantize(const mq::v1::Assignment& a, mq::v1::CompleteAssignmentRequest* result,
                         const std::atomic<bool>&) {
  result->set_error(absl::StrCat("this mq-worker (", Version(), ") was built without LibTorch"));
  return true;
}
bool Worker::RunFinalize(const mq::v1::Assignment& a, mq::v1::CompleteAssignmentRequest* result,
                         const std::atomic<bool>& stop) {
  return RunQuantize(a, result, stop);
}
bool Worker::RunEvaluate(const mq::v1::Assignment& a, const mq::v1::JobSpec&,
                         mq::v1::CompleteAssignmentRequest* result, const std::atomic<bool>& stop) {
  return RunQuantize(a, result, stop);
}
#endif

int Worker::Run(const std::atomic<bool>& stop) {
  if (!Register(stop)) return stop ? 0 : 1;
  std::thread heartbeats([&] { HeartbeatLoop(stop); });
  int64_t backoff = 200;
  while (!stop) {
    if (need_register_ && !Register(stop)) {
      quit_ = true;  // refused for good (e.g. its name went to another worker)
      break;
    }
    mq::v1::PollAssignmentRequest request;
    {
      std::lock_guard<std::mutex> lock(mu_);
      request.set_worker_id(worker_id_);
    }
    request.set_wait_ms(options_.poll_wait_ms);
    mq::v1::PollAssignmentResponse response;
    auto ctx = Context(options_.poll_wait_ms + 5000);
    grpc::Status s = stub_->PollAssignment(ctx.get(), request, &response);
    if (!s.ok()) {
      if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
        need_register_ = true;
      } else if (s.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
                 s.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
        // Retrying cannot help: the credential (or the session) is not accepted.
        LogLine("worker", "ERROR", "the coordinator refuses this worker: " + s.error_message());
        quit_ = true;
        break;
      } else {
        SleepMs(backoff, stop);
        backoff = std::min<int64_t>(backoff * 2, 2000);
      }
      continue;
    }
    backoff = 200;
    if (response.has_assignment()) RunAssignment(response.assignment(), stop);
  }
  heartbeats.join();
  return quit_ && !stop ? 1 : 0;
}

}  // namespace mq::worker
