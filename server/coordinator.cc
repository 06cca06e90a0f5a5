#include "server/coordinator.h"

#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/error_text.h"
#include "common/names.h"
#include "common/quality_gate.h"
#include "common/sha256.h"
#include "common/random_secret.h"
#include "common/util.h"
#include "server/auth/authenticator.h"
#include "server/scheduling/retry.h"
#include "server/validation.h"

namespace mq::server {
namespace {

using mq::v1::AssignmentRecord;
using mq::v1::AttemptRecord;
using mq::v1::JobRecord;
using mq::v1::JobState;

constexpr char kMetaSchema[] = "schema_version";
constexpr char kMetaEpoch[] = "coordinator_epoch";

std::string AttemptKey(const std::string& job_id, int attempt) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%06d", attempt);
  return job_id + "/" + buf;
}

std::string EventKey(const std::string& job_id, int64_t seq) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(seq));
  return job_id + "/" + buf;
}

std::string LayerKey(const std::string& job_id, int step) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%06d", step);
  return job_id + "/" + buf;
}

std::string KindName(mq::v1::AssignmentKind k) {
  switch (k) {
    case mq::v1::ASSIGNMENT_KIND_QUANTIZE:
      return "quantize";
    case mq::v1::ASSIGNMENT_KIND_FINALIZE:
      return "finalize";
    case mq::v1::ASSIGNMENT_KIND_EVALUATE:
      return "evaluate";
    default:
      return "plan";
  }
}

// " (this plan: 16 experts per pass, 65536 dispatch tokens, chosen by the plan for the planning
// worker's device)" for a refusal,
// or "" for a plan without settings.
std::string SettingsOfPlan(const mq::v1::ResourceEstimate& e) {
  if (e.expert_passes() == 0) return "";
  auto value = [](int64_t v) { return v > 0 ? absl::StrCat(v) : std::string("all"); };
  const bool chosen = e.experts_per_pass_chosen() || e.dispatch_tokens_chosen();
  return absl::StrCat(" (this plan: ", value(e.experts_per_pass()), " experts per pass, ",
                      value(e.dispatch_tokens()), " dispatch tokens",
                      chosen ? ", chosen by the plan for the planning worker's device"
                             : ", as the planning worker's flags gave them",
                      ")");
}

// A job whose plan succeeded (it has one without problems) runs the pipeline next.
bool IsPlanned(const JobRecord& job) { return job.has_plan() && job.plan().problems_size() == 0; }

std::string QuantizeCapability(const JobRecord& job) {
  return "quantize:" + MethodName(job.spec().method());
}

// An evaluation job (mq-client eval): it only measures a candidate against spec.model_uri.
bool IsEvalJob(const JobRecord& job) { return !job.spec().eval().candidate_uri().empty(); }

// A quantize job evaluates its output after finalization unless spec.eval.num_samples is 0.
bool EvaluatesOutput(const JobRecord& job) {
  return !IsEvalJob(job) && job.spec().eval().num_samples() > 0;
}

QualityGate GateOf(const mq::v1::EvalSpec& e) {
  QualityGate gate;
  if (e.has_max_kl()) gate.max_kl = e.max_kl();
  if (e.has_max_ppl_ratio()) gate.max_ppl_ratio = e.max_ppl_ratio();
  return gate;
}

// "mean KL 0.0189 (p99 0.12), top-1 agreement 92.9%, perplexity 10.21 -> 10.43 (x1.022) on
// 16 held-out sequences of ..." (or why nothing was measured).
std::string QualitySummary(const mq::v1::QualityReport& q) {
  if (!q.not_measured().empty()) return "quality not measured: " + q.not_measured();
  return absl::StrCat("mean KL ", absl::SixDigits(q.kl_mean()), " (p99 ",
                      absl::SixDigits(q.kl_p99()), "), top-1 agreement ",
                      absl::SixDigits(100 * q.top1_agreement()), "%, perplexity ",
                      absl::SixDigits(q.perplexity_reference()), " -> ",
                      absl::SixDigits(q.perplexity_candidate()), " (x",
                      absl::SixDigits(PerplexityRatio(q.perplexity_reference(),
                                                      q.perplexity_candidate())),
                      ") on ", q.source());
}

std::string Plural(int64_t n, const std::string& word) {
  return absl::StrCat(n, " ", word, n == 1 ? "" : "s");
}

// a + b for counts validated >= 0 and not bounded above: stops at the type's maximum instead of
// wrapping around, so that ranks reporting huge counts cannot make a sum negative.
template <typename T>
T SaturatingAdd(T a, T b) {
  return std::min(a, std::numeric_limits<T>::max() - b) + b;
}

// Stats of a committed step from its ranks' reports (sorted by rank): stage seconds are the
// slowest rank's; token counts, dispatch rounds, passes and step/layer are rank 0's (ranks report
// gang-wide values); GPU memory peaks are the largest rank's; counts are summed, saturating;
// rare experts and AWQ mappings are concatenated in rank order (each rank reports its own); the
// error is weighted by quantized linears.
mq::v1::LayerStats MergeStats(const mq::v1::LayerRecord& rec) {
  mq::v1::LayerStats out;
  if (rec.reports_size() == 0) return out;
  const mq::v1::LayerStats& r0 = rec.reports(0).stats();
  out.set_step(rec.step());
  out.set_layer(rec.layer());
  out.set_expert_tokens_min(r0.expert_tokens_min());
  out.set_expert_tokens_median(r0.expert_tokens_median());
  out.set_expert_tokens_max(r0.expert_tokens_max());
  out.set_dispatch_rounds(r0.dispatch_rounds());
  out.set_expert_passes(r0.expert_passes());
  double weighted_error = 0, linears = 0;  // in double: the error's weights are not saturated
  for (const mq::v1::LayerReport& report : rec.reports()) {
    const mq::v1::LayerStats& st = report.stats();
    out.set_load_seconds(std::max(out.load_seconds(), st.load_seconds()));
    out.set_forward_seconds(std::max(out.forward_seconds(), st.forward_seconds()));
    out.set_hessian_seconds(std::max(out.hessian_seconds(), st.hessian_seconds()));
    out.set_solve_seconds(std::max(out.solve_seconds(), st.solve_seconds()));
    out.set_propagate_seconds(std::max(out.propagate_seconds(), st.propagate_seconds()));
    out.set_write_seconds(std::max(out.write_seconds(), st.write_seconds()));
    out.set_exchange_seconds(std::max(out.exchange_seconds(), st.exchange_seconds()));
    out.set_quantized_linears(SaturatingAdd(out.quantized_linears(), st.quantized_linears()));
    out.set_fallbacks(SaturatingAdd(out.fallbacks(), st.fallbacks()));
    out.set_device_peak_allocated_bytes(
        std::max(out.device_peak_allocated_bytes(), st.device_peak_allocated_bytes()));
    out.set_device_peak_reserved_bytes(
        std::max(out.device_peak_reserved_bytes(), st.device_peak_reserved_bytes()));
    out.set_device_alloc_retries(
        SaturatingAdd(out.device_alloc_retries(), st.device_alloc_retries()));
    out.set_rare_experts(SaturatingAdd(out.rare_experts(), st.rare_experts()));
    for (const mq::v1::RareExpert& e : st.rare()) *out.add_rare() = e;
    for (const mq::v1::AwqMapping& m : st.awq()) *out.add_awq() = m;
    weighted_error += st.mean_relative_error() * st.quantized_linears();
    linears += st.quantized_linears();
  }
  out.set_mean_relative_error(linears > 0 ? weighted_error / linears : 0.0);
  return out;
}

double StageSeconds(const mq::v1::LayerStats& st) {
  return st.load_seconds() + st.forward_seconds() + st.hessian_seconds() + st.solve_seconds() +
         st.propagate_seconds() + st.write_seconds();
}

template <typename Message>
absl::StatusOr<Message> Parse(const std::string& table, const std::string& key,
                              const std::string& bytes) {
  Message m;
  if (!m.ParseFromString(bytes)) {
    return absl::DataLossError(
        absl::StrCat("state store: record ", table, "/", key, " does not parse"));
  }
  return m;
}

}  // namespace

Coordinator::Coordinator(Store* store, CoordinatorOptions options, CoordinatorMetrics* metrics)
    : store_(store), options_(std::move(options)), metrics_(metrics) {
  if (!options_.monotonic_ms) options_.monotonic_ms = MonotonicMs;
  if (!options_.wall_ms) options_.wall_ms = NowMs;
}

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Recover(Store* store,
                                                                  CoordinatorOptions options,
                                                                  CoordinatorMetrics* metrics) {
  std::unique_ptr<Coordinator> c(new Coordinator(store, std::move(options), metrics));
  std::lock_guard<std::mutex> lock(c->mu_);
  if (absl::Status s = c->Load(); !s.ok()) return s;
  c->UpdateGauges();
  return c;
}

absl::Status Coordinator::Load() {
  auto schema = store_->Get(Table::kMeta, kMetaSchema);
  if (!schema.ok()) return schema.status();
  if (schema->has_value()) {
    uint32_t version = static_cast<uint32_t>(std::stoul(**schema));
    if (version > kSchemaVersion) {
      return absl::FailedPreconditionError(
          absl::StrCat("state store schema version ", version, " is newer than this coordinator ",
                       "understands (", kSchemaVersion, "); run a newer mq-coordinator"));
    }
  }
  auto epoch = store_->Get(Table::kMeta, kMetaEpoch);
  if (!epoch.ok()) return epoch.status();
  epoch_ = epoch->has_value() ? std::stoll(**epoch) + 1 : 1;
  WriteBatch meta;
  meta.Put(Table::kMeta, kMetaSchema, std::to_string(kSchemaVersion));
  meta.Put(Table::kMeta, kMetaEpoch, std::to_string(epoch_));
  if (absl::Status s = Commit(meta); !s.ok()) return s;

  auto jobs = store_->GetAll(Table::kJobs);
  if (!jobs.ok()) return jobs.status();
  for (const auto& [key, value] : *jobs) {
    auto job = Parse<JobRecord>("jobs", key, value);
    if (!job.ok()) return job.status();
    jobs_[key] = *std::move(job);
  }
  ForgetEnded();  // retention first: layers and keys of evicted jobs are not loaded
  auto layers = store_->GetAll(Table::kLayers);
  if (!layers.ok()) return layers.status();
  for (const auto& [key, value] : *layers) {
    auto rec = Parse<mq::v1::LayerRecord>("layers", key, value);
    if (!rec.ok()) return rec.status();
    if (!jobs_.count(rec->job_id())) continue;
    layers_[rec->job_id()][rec->step()] = *std::move(rec);
  }
  auto idem = store_->GetAll(Table::kIdempotency);
  if (!idem.ok()) return idem.status();
  for (const auto& [key, value] : *idem) {
    if (jobs_.count(value)) idempotency_[key] = value;
  }

  const int64_t now = Mono();
  recovered_heartbeat_ms_ = now;  // mq_workers{state="unknown"} until heard from
  auto workers = store_->GetAll(Table::kWorkers);
  if (!workers.ok()) return workers.status();
  for (const auto& [key, value] : *workers) {
    auto rec = Parse<mq::v1::WorkerRecord>("workers", key, value);
    if (!rec.ok()) return rec.status();
    WorkerEntry& w = workers_[key];
    w.record = *std::move(rec);
    w.last_heartbeat_ms = now;  // a fresh lease: the worker may still be running its work
    w.recovered = true;
  }
  auto assignments = store_->GetAll(Table::kAssignments);
  if (!assignments.ok()) return assignments.status();
  for (const auto& [key, value] : *assignments) {
    auto a = Parse<AssignmentRecord>("assignments", key, value);
    if (!a.ok()) return a.status();
    if (!a->ended() && jobs_.count(a->job_id())) {
      auto it = workers_.find(a->worker_id());
      if (it != workers_.end()) {
        it->second.assignment_id = a->assignment_id();
        it->second.delivered = false;
      }
    }
    assignments_[key] = *std::move(a);
  }
  ForgetEnded();  // assignments of evicted jobs
  LogLine("coordinator", "INFO",
          absl::StrCat("recovered epoch ", epoch_, ": ", jobs_.size(), " jobs, ", workers_.size(),
                       " workers, ", assignments_.size(), " assignments"));
  return absl::OkStatus();
}

absl::Status Coordinator::Commit(const WriteBatch& batch) {
  // In-memory state may already hold changes whose write failed: nothing more is written
  // until RetryStore has reloaded the state from the store.
  if (!store_error_.ok()) return NotServingError();
  const auto start = std::chrono::steady_clock::now();
  absl::Status s = store_->Write(batch);
  if (metrics_) {
    metrics_->store_write_seconds->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  if (s.ok()) return s;
  if (metrics_) metrics_->store_write_failures->Increment();
  StopServing(s);
  return NotServingError();
}

void Coordinator::StopServing(const absl::Status& cause) {
  store_error_ = cause;
  store_retry_at_ms_ = Mono() + 1000;
  LogLine("coordinator", "ERROR", std::string(NotServingError().message()));
  ++changes_;
  cv_.notify_all();
}

absl::Status Coordinator::NotServingError() const {
  return absl::UnavailableError(
      absl::StrCat("state store write failed: ", store_error_.message(),
                   "; the coordinator is not serving until it can write"));
}

bool Coordinator::serving() {
  std::lock_guard<std::mutex> lock(mu_);
  return store_error_.ok();
}

absl::Status Coordinator::CheckServing() {
  std::lock_guard<std::mutex> lock(mu_);
  return store_error_.ok() ? absl::OkStatus() : NotServingError();
}

void Coordinator::RetryStore() {
  if (Mono() < store_retry_at_ms_) return;
  store_retry_at_ms_ = Mono() + 1000;
  if (absl::Status s = store_->Recover(); !s.ok()) {
    if (s.message() != store_error_.message()) {
      LogLine("coordinator", "WARN", absl::StrCat("state store still cannot write: ", s.message()));
    }
    store_error_ = s;
    return;
  }
  ResetState();
  store_error_ = absl::OkStatus();
  if (absl::Status s = Load(); !s.ok()) {
    // A failed write inside Load already took the coordinator out of service again.
    if (store_error_.ok()) store_error_ = s;
    LogLine("coordinator", "WARN", absl::StrCat("reloading the state failed: ", s.message()));
    return;
  }
  LogLine("coordinator", "INFO",
          absl::StrCat("state store writable again: state reloaded (epoch ", epoch_,
                       "); serving again"));
  Changed();
}

void Coordinator::ResetState() {
  for (auto& [id, inspection] : inspections_) {
    inspection->status = absl::UnavailableError(
        "the coordinator reloaded its state after a state store failure; inspect again");
    inspection->done = true;
  }
  inspections_.clear();
  jobs_.clear();
  assignments_.clear();
  workers_.clear();
  idempotency_.clear();
  layers_.clear();
  gang_wait_since_.clear();
  ended_seen_ms_.clear();
  evicted_jobs_ = {};
  retry_not_before_.clear();  // as after a restart: a backed-off job may retry at once
}

void Coordinator::PutJob(WriteBatch& batch, const JobRecord& job) {
  batch.Put(Table::kJobs, job.job_id(), job.SerializeAsString());
}

void Coordinator::AddEvent(JobRecord& job, WriteBatch& batch, const std::string& kind,
                           const std::string& message, const std::string& worker_id,
                           const std::string& principal) {
  mq::v1::JobEvent e;
  e.set_job_id(job.job_id());
  e.set_seq(job.event_count());
  e.set_time_ms(Wall());
  e.set_kind(kind);
  e.set_message(EventMessage(message));  // no stack traces, at most kMaxEventMessageBytes
  e.set_attempt(job.attempt());
  e.set_state(job.state());
  e.set_worker_id(worker_id);
  if (!principal.empty()) {
    e.set_principal(principal);
  } else if (auto w = workers_.find(worker_id); !worker_id.empty() && w != workers_.end()) {
    e.set_principal(w->second.record.principal());
  } else {
    e.set_principal(Caller::kCoordinator);
  }
  batch.Put(Table::kEvents, EventKey(job.job_id(), e.seq()), e.SerializeAsString());
  job.set_event_count(job.event_count() + 1);
}

void Coordinator::SetJobState(JobRecord& job, WriteBatch& batch, JobState state,
                              const std::string& message, const std::string& worker_id,
                              const std::string& principal) {
  job.set_state(state);
  job.set_message(message);
  job.set_updated_at_ms(Wall());
  if (IsTerminal(state)) job.set_finished_at_ms(Wall());
  // Publishing belongs to one finalize attempt; a job sent back (or failed) may be cancelled.
  if (state != mq::v1::JOB_STATE_FINALIZING && state != mq::v1::JOB_STATE_SUCCEEDED) {
    job.clear_publishing();
  }
  AddEvent(job, batch, "state", absl::StrCat(JobStateName(state), ": ", message), worker_id,
           principal);
}

void Coordinator::Changed() {
  ++changes_;
  UpdateGauges();
  cv_.notify_all();
}

uint64_t Coordinator::change_counter() {
  std::lock_guard<std::mutex> lock(mu_);
  return changes_;
}

uint64_t Coordinator::WaitForChange(uint64_t seen, int64_t deadline_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  while (changes_ == seen) {
    const int64_t left = deadline_ms - Mono();
    if (left <= 0) break;
    cv_.wait_for(lock, std::chrono::milliseconds(std::min<int64_t>(left, 1000)));
  }
  return changes_;
}

void Coordinator::WakeAll() {
  std::lock_guard<std::mutex> lock(mu_);
  ++changes_;
  cv_.notify_all();
}

void Coordinator::UpdateGauges() {
  if (!metrics_) return;
  // mq_jobs counts what the store holds: the jobs in memory and those retention evicted.
  std::array<int64_t, kJobStates> counts = evicted_jobs_;
  int64_t committed = 0, total = 0;
  std::map<std::string, double> progress;  // running and finalizing jobs only (bounded)
  for (const auto& [id, job] : jobs_) {
    counts[job.state()]++;
    if (job.state() != mq::v1::JOB_STATE_RUNNING && job.state() != mq::v1::JOB_STATE_FINALIZING) {
      continue;
    }
    const int32_t done = job.progress().layers_committed(), all = job.progress().layers_total();
    committed += done;
    total += all;
    progress[id] = all > 0 ? std::min(1.0, double(done) / all) : 0.0;
  }
  for (int s = 1; s < kJobStates; ++s) metrics_->jobs[s]->Set(double(counts[s]));
  metrics_->job_layers_committed->Set(double(committed));
  metrics_->job_layers_total->Set(double(total));
  metrics_->SetJobProgress(progress);
  // A worker recovered from the store keeps the heartbeat time Load gave it until it calls
  // (register, heartbeat, poll, report): until then it may be dead, so it is not idle/busy.
  int idle = 0, busy = 0, unknown = 0;
  for (const auto& [id, w] : workers_) {
    if (w.dead) continue;
    if (w.recovered && w.last_heartbeat_ms == recovered_heartbeat_ms_) {
      ++unknown;
    } else {
      (w.assignment_id.empty() ? idle : busy)++;
    }
  }
  metrics_->workers_idle->Set(idle);
  metrics_->workers_busy->Set(busy);
  metrics_->workers_unknown->Set(unknown);
}

// ---------------------------------------------------------------------------------------------
// JobService

namespace {

// An idempotency key belongs to the principal that first used it: another principal's submit
// with it neither sees nor joins that job.
absl::Status CheckKeyOwner(const std::string& key, const JobRecord& existing,
                           const Caller& caller) {
  if (caller.insecure || existing.owner() == caller.principal) return absl::OkStatus();
  return absl::AlreadyExistsError(absl::StrCat(
      "idempotency_key = \"", key, "\": already used by another principal; use a new key"));
}

}  // namespace

absl::StatusOr<mq::v1::SubmitJobResponse> Coordinator::SubmitJob(
    const mq::v1::SubmitJobRequest& request, const Caller& caller) {
  if (!request.has_spec()) {
    return absl::InvalidArgumentError("spec: is required (model_uri and output_uri at least)");
  }
  if (absl::Status s = ValidateIdempotencyKey(request.idempotency_key()); !s.ok()) return s;
  auto spec = NormalizeJobSpec(request.spec());
  if (!spec.ok()) return spec.status();
  if (absl::Status s = CheckJobPaths(*spec, options_.path_policy); !s.ok()) return s;

  std::lock_guard<std::mutex> lock(mu_);
  mq::v1::SubmitJobResponse response;
  const std::string& key = request.idempotency_key();
  if (!key.empty()) {
    auto it = idempotency_.find(key);
    if (it != idempotency_.end()) {
      const JobRecord& existing = jobs_.at(it->second);
      if (absl::Status s = CheckKeyOwner(key, existing, caller); !s.ok()) return s;
      if (!google::protobuf::util::MessageDifferencer::Equals(existing.spec(), *spec)) {
        return absl::AlreadyExistsError(
            absl::StrCat("idempotency_key = \"", key, "\": already used for job ", it->second,
                         " with a different spec; use a new key or the same spec"));
      }
      *response.mutable_job() = existing;
      response.set_created(false);
      return response;
    }
    // The key's job may have been evicted from memory (retention): the store still has both.
    auto stored = store_->Get(Table::kIdempotency, key);
    if (!stored.ok()) return stored.status();
    if (stored->has_value()) {
      auto existing = FindJob(**stored);
      if (!existing.ok()) return existing.status();
      if (absl::Status s = CheckKeyOwner(key, *existing, caller); !s.ok()) return s;
      if (!google::protobuf::util::MessageDifferencer::Equals(existing->spec(), *spec)) {
        return absl::AlreadyExistsError(
            absl::StrCat("idempotency_key = \"", key, "\": already used for job ", **stored,
                         " with a different spec; use a new key or the same spec"));
      }
      *response.mutable_job() = *std::move(existing);
      response.set_created(false);
      return response;
    }
  }
  if (absl::Status s = CheckOutputFree(*spec, ""); !s.ok()) return s;

  JobRecord job;
  job.set_schema_version(kSchemaVersion);
  job.set_job_id(NewId("j-"));
  *job.mutable_spec() = *spec;
  job.set_idempotency_key(key);
  job.set_owner(caller.principal);
  job.set_created_at_ms(Wall());
  job.set_updated_at_ms(Wall());
  job.set_state(mq::v1::JOB_STATE_QUEUED);
  job.set_message("waiting for a worker");
  WriteBatch batch;
  AddEvent(job, batch, "submitted",
           IsEvalJob(job)
               ? absl::StrCat("submitted: evaluation of ", spec->eval().candidate_uri(),
                              " against ", spec->model_uri(), " on ",
                              spec->eval().num_samples(), " sequences of ",
                              spec->eval().dataset_uri(), ", owner ", caller.principal)
               : absl::StrCat("submitted: ", MethodName(spec->method()), " ", spec->bits(),
                              "-bit g", spec->group_size(), " of ", spec->model_uri(), " to ",
                              spec->output_uri(), ", gang size ", spec->gang_size(), ", owner ",
                              caller.principal),
           "", caller.principal);
  PutJob(batch, job);
  if (!key.empty()) batch.Put(Table::kIdempotency, key, job.job_id());
  if (absl::Status s = Commit(batch); !s.ok()) return s;

  jobs_[job.job_id()] = job;
  if (!key.empty()) idempotency_[key] = job.job_id();
  if (metrics_) metrics_->jobs_submitted->Increment();
  Changed();
  *response.mutable_job() = job;
  response.set_created(true);
  return response;
}

absl::StatusOr<AttemptRecord> Coordinator::LoadAttempt(const std::string& job_id, int attempt) {
  auto value = store_->Get(Table::kAttempts, AttemptKey(job_id, attempt));
  if (!value.ok()) return value.status();
  if (!value->has_value()) {
    return absl::NotFoundError(absl::StrCat("attempt ", attempt, " of job ", job_id));
  }
  return Parse<AttemptRecord>("attempts", AttemptKey(job_id, attempt), **value);
}

absl::StatusOr<mq::v1::GetJobResponse> Coordinator::GetJob(const mq::v1::GetJobRequest& request) {
  if (absl::Status s = ValidateJobId("job_id", request.job_id()); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  auto job = FindJob(request.job_id());
  if (!job.ok()) return job.status();
  mq::v1::GetJobResponse response;
  *response.mutable_job() = *std::move(job);
  auto attempts = store_->GetAll(Table::kAttempts, request.job_id() + "/");
  if (!attempts.ok()) return attempts.status();
  for (const auto& [key, value] : *attempts) {
    auto a = Parse<AttemptRecord>("attempts", key, value);
    if (!a.ok()) return a.status();
    *response.add_attempts() = *std::move(a);
  }
  if (request.include_events()) {
    auto events = store_->GetAll(Table::kEvents, request.job_id() + "/");
    if (!events.ok()) return events.status();
    for (const auto& [key, value] : *events) {
      auto e = Parse<mq::v1::JobEvent>("events", key, value);
      if (!e.ok()) return e.status();
      *response.add_events() = *std::move(e);
    }
  }
  if (jobs_.count(request.job_id())) {
    auto layers = layers_.find(request.job_id());
    if (layers != layers_.end()) {
      for (const auto& [step, rec] : layers->second) *response.add_layers() = rec;
    }
  } else {  // evicted (retention): its steps are in the store
    auto layers = store_->GetAll(Table::kLayers, request.job_id() + "/");
    if (!layers.ok()) return layers.status();
    for (const auto& [key, value] : *layers) {
      auto rec = Parse<mq::v1::LayerRecord>("layers", key, value);
      if (!rec.ok()) return rec.status();
      *response.add_layers() = *std::move(rec);
    }
  }
  return response;
}

absl::StatusOr<mq::v1::ListJobsResponse> Coordinator::ListJobs(
    const mq::v1::ListJobsRequest& request) {
  int page_size = request.page_size() == 0 ? 100 : request.page_size();
  if (page_size < 1 || page_size > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size = ", request.page_size(), ": must be between 1 and 1000"));
  }
  std::set<int> states;
  for (int s : request.states()) {
    if (!mq::v1::JobState_IsValid(s) || s == mq::v1::JOB_STATE_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat(
          "states = ", s, ": must be queued, planning, running, finalizing, succeeded, failed ",
          "or cancelled"));
    }
    states.insert(s);
  }
  if (!request.page_token().empty()) {
    if (absl::Status s = ValidateJobId("page_token", request.page_token()); !s.ok()) return s;
  }
  std::lock_guard<std::mutex> lock(mu_);
  mq::v1::ListJobsResponse response;
  // Newest first: job ids are time-ordered.
  auto it = request.page_token().empty() ? jobs_.end() : jobs_.lower_bound(request.page_token());
  while (it != jobs_.begin()) {
    --it;
    if (!states.empty() && !states.count(it->second.state())) continue;
    if (response.jobs_size() == page_size) {
      response.set_next_page_token(response.jobs(page_size - 1).job_id());
      break;
    }
    JobRecord* j = response.add_jobs();
    *j = it->second;
    j->clear_plan();  // lists stay small; GetJob has the plan
  }
  return response;
}

absl::StatusOr<mq::v1::CancelJobResponse> Coordinator::CancelJob(
    const mq::v1::CancelJobRequest& request, const Caller& caller) {
  if (absl::Status s = ValidateJobId("job_id", request.job_id()); !s.ok()) return s;
  if (request.reason().size() > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("reason: ", request.reason().size(), " characters; at most 1024 allowed"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto found = FindJob(request.job_id());  // an evicted job has ended
  if (!found.ok()) return found.status();
  JobRecord job = *std::move(found);
  if (absl::Status s = AuthorizeOwner(caller, job.owner(), job.job_id(), "cancel"); !s.ok()) {
    return s;
  }
  if (IsTerminal(job.state())) {
    return absl::FailedPreconditionError(absl::StrCat("job ", job.job_id(), " already ended (",
                                                      JobStateName(job.state()),
                                                      "); nothing to cancel"));
  }
  if (job.publishing()) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job.job_id(),
                     " is publishing its output and is about to succeed; it can no longer be "
                     "cancelled (remove its output afterwards if it is not wanted)"));
  }
  WriteBatch batch;
  const std::string by =
      caller.insecure ? "cancelled by user" : absl::StrCat("cancelled by ", caller.principal);
  std::string reason = request.reason().empty() ? by : absl::StrCat(by, ": ", request.reason());
  std::vector<AssignmentRecord> ended;
  for (auto& [id, a] : assignments_) {
    if (a.job_id() != job.job_id() || a.ended()) continue;
    AssignmentRecord copy = a;
    if (absl::Status s =
            EndAssignment(copy, batch, mq::v1::ATTEMPT_STATE_ABORTED, "job cancelled", false);
        !s.ok()) {
      return s;
    }
    ended.push_back(copy);
  }
  SetJobState(job, batch, mq::v1::JOB_STATE_CANCELLED, reason, "", caller.principal);
  PutJob(batch, job);
  if (absl::Status s = Commit(batch); !s.ok()) return s;
  for (const AssignmentRecord& a : ended) {
    assignments_[a.assignment_id()] = a;
    EndedOnWorker(a);
  }
  jobs_[job.job_id()] = job;
  if (metrics_) metrics_->jobs_cancelled->Increment();
  Changed();
  mq::v1::CancelJobResponse response;
  *response.mutable_job() = job;
  return response;
}

absl::StatusOr<mq::v1::ResumeJobResponse> Coordinator::ResumeJob(
    const mq::v1::ResumeJobRequest& request, const Caller& caller) {
  if (absl::Status s = ValidateJobId("job_id", request.job_id()); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  auto found = FindJob(request.job_id());
  if (!found.ok()) return found.status();
  JobRecord job = *std::move(found);
  if (absl::Status s = AuthorizeOwner(caller, job.owner(), job.job_id(), "resume"); !s.ok()) {
    return s;
  }
  if (job.state() != mq::v1::JOB_STATE_FAILED && job.state() != mq::v1::JOB_STATE_CANCELLED) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job.job_id(), " is ", JobStateName(job.state()),
                     "; only FAILED or CANCELLED jobs can be resumed"));
  }
  // The policy may have changed since the job was submitted (a restart with other roots).
  if (absl::Status s = CheckJobPaths(job.spec(), options_.path_policy); !s.ok()) return s;
  if (absl::Status s = CheckOutputFree(job.spec(), job.job_id()); !s.ok()) return s;
  const int evicted_as = jobs_.count(job.job_id()) ? 0 : job.state();
  if (!jobs_.count(job.job_id())) {
    // Evicted (retention): bring its committed steps back from the store.
    auto layers = store_->GetAll(Table::kLayers, job.job_id() + "/");
    if (!layers.ok()) return layers.status();
    std::map<int, mq::v1::LayerRecord> records;
    for (const auto& [key, value] : *layers) {
      auto rec = Parse<mq::v1::LayerRecord>("layers", key, value);
      if (!rec.ok()) return rec.status();
      records[rec->step()] = *std::move(rec);
    }
    layers_[job.job_id()] = std::move(records);  // dropped by ForgetEnded if the write fails
  }
  WriteBatch batch;
  job.set_attempt_base(job.attempt());
  job.clear_infrastructure_failures();
  job.clear_missing_capability();
  job.set_finished_at_ms(0);
  // A resumed job finalizes again before it evaluates (finalization verifies every committed
  // file and repairs the rest), so a damaged output is never measured as it is.
  job.clear_manifest_sha256();
  job.clear_quality();
  if (IsEvalJob(job)) {
    SetJobState(job, batch, mq::v1::JOB_STATE_QUEUED,
                absl::StrCat("resumed by ", caller.principal, "; waiting for a worker to evaluate"),
                "", caller.principal);
  } else if (IsPlanned(job)) {
    SetJobState(job, batch, mq::v1::JOB_STATE_QUEUED,
                absl::StrCat("resumed by ", caller.principal, ": ", CommittedPrefix(job.job_id()),
                             " of ", job.plan().layers_size(),
                             " steps committed; waiting for a gang of ", job.spec().gang_size(),
                             " workers"),
                "", caller.principal);
  } else {
    SetJobState(job, batch, mq::v1::JOB_STATE_QUEUED,
                absl::StrCat("resumed by ", caller.principal, "; waiting for a worker to plan"),
                "", caller.principal);
  }
  PutJob(batch, job);
  if (absl::Status s = Commit(batch); !s.ok()) return s;
  if (evicted_as != 0) evicted_jobs_[evicted_as]--;  // back in memory (mq_jobs)
  jobs_[job.job_id()] = job;
  if (!job.idempotency_key().empty()) idempotency_[job.idempotency_key()] = job.job_id();
  Changed();
  mq::v1::ResumeJobResponse response;
  *response.mutable_job() = job;
  return response;
}

absl::StatusOr<mq::v1::WatchJobResponse> Coordinator::JobSnapshot(const std::string& job_id,
                                                                  int64_t from_seq) {
  if (absl::Status s = ValidateJobId("job_id", job_id); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  auto job = FindJob(job_id);
  if (!job.ok()) return job.status();
  mq::v1::WatchJobResponse response;
  *response.mutable_job() = *std::move(job);
  if (from_seq < response.job().event_count()) {
    auto events = store_->GetAll(Table::kEvents, job_id + "/");
    if (!events.ok()) return events.status();
    for (const auto& [key, value] : *events) {
      auto e = Parse<mq::v1::JobEvent>("events", key, value);
      if (!e.ok()) return e.status();
      if (e->seq() >= from_seq) *response.add_events() = *std::move(e);
    }
  }
  return response;
}

mq::v1::ListWorkersResponse Coordinator::ListWorkers() {
  std::lock_guard<std::mutex> lock(mu_);
  mq::v1::ListWorkersResponse response;
  const int64_t now = Mono();
  for (const auto& [id, w] : workers_) {
    mq::v1::WorkerInfo* info = response.add_workers();
    *info->mutable_worker() = w.record;
    info->mutable_worker()->clear_session_sha256();  // the worker's secret, even hashed
    info->set_state(
        w.dead ? mq::v1::WORKER_STATE_DEAD
               : (w.assignment_id.empty() ? mq::v1::WORKER_STATE_IDLE : mq::v1::WORKER_STATE_BUSY));
    info->set_last_heartbeat_age_ms(now - w.last_heartbeat_ms);
    info->set_assignment_id(w.assignment_id);
    auto a = assignments_.find(w.assignment_id);
    if (a != assignments_.end()) info->set_job_id(a->second.job_id());
  }
  return response;
}

absl::StatusOr<mq::v1::InspectModelResponse> Coordinator::InspectModel(
    const mq::v1::InspectModelRequest& request, int64_t deadline_ms) {
  if (absl::Status s = ValidateInspectRequest(request); !s.ok()) return s;
  if (absl::Status s = CheckInspectPaths(request, options_.path_policy); !s.ok()) return s;
  auto inspection = std::make_shared<Inspection>();
  mq::v1::Assignment& a = inspection->assignment;
  a.set_assignment_id(NewId("i-"));
  a.set_kind(mq::v1::ASSIGNMENT_KIND_PLAN);
  a.set_world_size(1);
  mq::v1::JobSpec* spec = a.mutable_spec();
  spec->set_model_uri(request.model_uri());
  spec->set_bits(request.bits() ? request.bits() : 4);
  spec->set_group_size(request.group_size() ? request.group_size() : 128);
  spec->set_targets(request.targets() ? request.targets() : mq::v1::TARGET_SET_ROUTED_EXPERTS);
  spec->set_include_mtp(request.include_mtp());
  spec->set_gang_size(request.gang_size() ? request.gang_size() : 1);
  spec->mutable_calibration()->set_num_samples(request.num_samples() ? request.num_samples() : 512);
  spec->mutable_calibration()->set_max_sequence_length(
      request.max_sequence_length() ? request.max_sequence_length() : 4096);

  std::unique_lock<std::mutex> lock(mu_);
  // Wait for an idle worker that can plan.
  while (true) {
    auto gang = PickGang(WorkerViews(), "plan", 1);
    if (gang) {
      WorkerEntry& w = workers_.at(gang->front());
      inspection->worker_id = gang->front();
      w.assignment_id = a.assignment_id();
      w.delivered = false;
      inspections_[a.assignment_id()] = inspection;
      Changed();
      break;
    }
    if (!AnyWorkerOffers(WorkerViews(), "plan")) {
      return absl::UnavailableError(
          "no live worker can inspect checkpoints; start an mq-worker (mq-client workers lists "
          "them)");
    }
    const int64_t left = deadline_ms - Mono();
    if (left <= 0) {
      return absl::DeadlineExceededError("every worker stayed busy until the deadline");
    }
    cv_.wait_for(lock, std::chrono::milliseconds(std::min<int64_t>(left, 200)));
  }
  while (!inspection->done) {
    const int64_t left = deadline_ms - Mono();
    if (left <= 0) {
      inspections_.erase(a.assignment_id());
      auto w = workers_.find(inspection->worker_id);
      if (w != workers_.end() && w->second.assignment_id == a.assignment_id()) {
        w->second.assignment_id.clear();
      }
      Changed();
      return absl::DeadlineExceededError(absl::StrCat(
          "worker ", inspection->worker_id, " did not finish the inspection before the deadline"));
    }
    cv_.wait_for(lock, std::chrono::milliseconds(std::min<int64_t>(left, 200)));
  }
  if (!inspection->status.ok()) return inspection->status;
  mq::v1::InspectModelResponse response;
  *response.mutable_report() = inspection->report;
  return response;
}

// ---------------------------------------------------------------------------------------------
// WorkerService

absl::StatusOr<mq::v1::RegisterWorkerResponse> Coordinator::RegisterWorker(
    const mq::v1::RegisterWorkerRequest& request, const Caller& caller) {
  if (absl::Status s = ValidateWorkerName(request.name()); !s.ok()) return s;
  const std::string& device = request.capabilities().device();
  if (device != "cpu" && device.rfind("cuda:", 0) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capabilities.device = \"", device, "\": must be cpu or cuda:N"));
  }
  if (!request.worker_id().empty() &&
      (request.worker_id().size() != 28 || request.worker_id().rfind("w-", 0) != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "worker_id = \"", request.worker_id(), "\": must be empty or an id this coordinator gave"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  std::string id = request.worker_id();
  if (id.empty() || !workers_.count(id)) {
    if (id.empty()) id = NewId("w-");
  }
  auto existing = workers_.find(id);
  if (existing != workers_.end()) {
    const WorkerEntry& held = existing->second;
    if (!caller.insecure && held.record.principal() != caller.principal) {
      return absl::PermissionDeniedError(absl::StrCat(
          "worker_id = \"", id, "\": bound to the credential that registered it; principal \"",
          caller.principal, "\" may not take it (register without an id for a new one)"));
    }
    if (!held.dead && (held.record.session_sha256().empty() ||
                       Sha256Hex(caller.worker_session) != held.record.session_sha256())) {
      return absl::AlreadyExistsError(absl::StrCat(
          "worker_id = \"", id, "\": a live worker holds this id (heard ",
          Mono() - held.last_heartbeat_ms,
          " ms ago); a second registration is refused. A restarted worker registers without an "
          "id, or with it once its lease (", options_.lease_ms, " ms) has run out"));
    }
  }
  if (absl::Status s = CheckNameFree(request.name(), id); !s.ok()) return s;
  auto secret = RandomHexSecret(32);
  if (!secret.ok()) return secret.status();
  const std::string session = *std::move(secret);
  mq::v1::WorkerRecord record;
  record.set_worker_id(id);
  record.set_name(request.name());
  *record.mutable_capabilities() = request.capabilities();
  record.set_principal(caller.principal);
  record.set_session_sha256(Sha256Hex(session));
  record.set_registered_at_ms(
      existing != workers_.end() ? existing->second.record.registered_at_ms() : Wall());
  WriteBatch batch;
  batch.Put(Table::kWorkers, id, record.SerializeAsString());
  if (absl::Status s = Commit(batch); !s.ok()) return s;
  WorkerEntry& w = workers_[id];
  const bool was_dead = w.dead;
  w.record = record;
  w.last_heartbeat_ms = Mono();
  w.dead = false;
  if (was_dead) w.assignment_id.clear();
  LogLine("coordinator", "INFO",
          absl::StrCat("worker ", id, " (", request.name(), ", ", device, ") registered by ",
                       caller.principal));
  Changed();
  mq::v1::RegisterWorkerResponse response;
  response.set_worker_id(id);
  response.set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  response.set_lease_ms(options_.lease_ms);
  response.set_coordinator_epoch(epoch_);
  response.set_session(session);
  return response;
}

absl::Status Coordinator::AuthorizeWorker(const std::string& worker_id, const Caller& caller) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = workers_.find(worker_id);
  if (it == workers_.end()) {
    return absl::NotFoundError(
        absl::StrCat("worker ", worker_id, " is not registered; register again"));
  }
  const mq::v1::WorkerRecord& record = it->second.record;
  if (!caller.insecure && record.principal() != caller.principal) {
    return absl::PermissionDeniedError(
        absl::StrCat("worker ", worker_id, " is bound to another credential; principal \"",
                     caller.principal, "\" may not act for it"));
  }
  if (record.session_sha256().empty() ||
      Sha256Hex(caller.worker_session) != record.session_sha256()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "worker ", worker_id,
        ": the call does not carry this worker's current session (metadata mq-worker-session "
        "from RegisterWorker); another registration of the id replaced it, or it never had one"));
  }
  return absl::OkStatus();
}

absl::StatusOr<mq::v1::HeartbeatResponse> Coordinator::Heartbeat(
    const mq::v1::HeartbeatRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = workers_.find(request.worker_id());
  if (it == workers_.end()) {
    return absl::NotFoundError(
        absl::StrCat("worker ", request.worker_id(), " is not registered; register again"));
  }
  WorkerEntry& w = it->second;
  w.last_heartbeat_ms = Mono();
  mq::v1::HeartbeatResponse response;
  if (w.dead) {
    // Back from the dead (e.g. it was paused): its old work went elsewhere. Its name may have
    // gone to a new worker meanwhile; then it must register again (and is refused).
    if (absl::Status s = CheckNameFree(w.record.name(), w.record.worker_id()); !s.ok()) {
      return absl::NotFoundError(absl::StrCat(
          "worker ", w.record.worker_id(),
          " was declared dead and its name is taken: ", s.message(), "; register again"));
    }
    w.dead = false;
    w.assignment_id.clear();
    LogLine("coordinator", "INFO", absl::StrCat("worker ", w.record.worker_id(), " is back"));
    Changed();
  }
  if (!request.assignment_id().empty() && request.assignment_id() != w.assignment_id) {
    response.add_cancel_assignment_ids(request.assignment_id());
  }
  response.set_lease_ms(options_.lease_ms);
  response.set_coordinator_epoch(epoch_);
  return response;
}

absl::StatusOr<mq::v1::PollAssignmentResponse> Coordinator::PollAssignment(
    const mq::v1::PollAssignmentRequest& request, int64_t deadline_ms) {
  if (request.wait_ms() < 0 || request.wait_ms() > 60000) {
    return absl::InvalidArgumentError(
        absl::StrCat("wait_ms = ", request.wait_ms(), ": must be between 0 and 60000"));
  }
  deadline_ms = std::min(deadline_ms, Mono() + request.wait_ms());
  std::unique_lock<std::mutex> lock(mu_);
  mq::v1::PollAssignmentResponse response;
  while (true) {
    auto it = workers_.find(request.worker_id());
    if (it == workers_.end()) {
      return absl::NotFoundError(
          absl::StrCat("worker ", request.worker_id(), " is not registered; register again"));
    }
    WorkerEntry& w = it->second;
    if (!w.dead) w.last_heartbeat_ms = Mono();
    w.needs_poll = false;
    w.ended_job_id.clear();
    if (!w.dead && !w.assignment_id.empty() && !w.delivered) {
      auto insp = inspections_.find(w.assignment_id);
      if (insp != inspections_.end()) {
        *response.mutable_assignment() = insp->second->assignment;
      } else {
        const AssignmentRecord& a = assignments_.at(w.assignment_id);
        mq::v1::Assignment* out = response.mutable_assignment();
        out->set_assignment_id(a.assignment_id());
        out->set_job_id(a.job_id());
        out->set_attempt(a.attempt());
        out->set_kind(a.kind());
        out->set_lease_epoch(a.lease_epoch());
        out->set_rank(a.rank());
        out->set_world_size(a.world_size());
        const JobRecord& job = jobs_.at(a.job_id());
        *out->mutable_spec() = job.spec();
        if (a.kind() == mq::v1::ASSIGNMENT_KIND_QUANTIZE ||
            a.kind() == mq::v1::ASSIGNMENT_KIND_FINALIZE) {
          out->set_start_step(a.start_step());
          out->set_rendezvous(a.rendezvous());
          out->set_rendezvous_secret(a.rendezvous_secret());
          out->set_total_steps(job.plan().layers_size());
          // The plan's settings (a job planned before plans carried them has none: 0 passes).
          const mq::v1::ResourceEstimate& e = job.plan().estimate();
          if (a.kind() == mq::v1::ASSIGNMENT_KIND_QUANTIZE &&
              (e.expert_passes() > 0 || e.experts_per_pass_chosen() ||
               e.dispatch_tokens_chosen())) {
            out->mutable_settings()->set_experts_per_pass(e.experts_per_pass());
            out->mutable_settings()->set_dispatch_tokens(e.dispatch_tokens());
            out->mutable_settings()->set_preload_next_layer(e.preload_next_layer());
          }
          auto layers = layers_.find(a.job_id());
          if (layers != layers_.end()) {
            for (const auto& [step, rec] : layers->second) {
              if (!rec.committed()) continue;
              for (const mq::v1::LayerReport& report : rec.reports()) {
                for (const mq::v1::OutputFile& f : report.files()) *out->add_committed_files() = f;
              }
            }
          }
        }
      }
      if (auto a = assignments_.find(w.assignment_id);
          a != assignments_.end() && a->second.kind() == mq::v1::ASSIGNMENT_KIND_EVALUATE) {
        response.mutable_assignment()->set_manifest_sha256(
            jobs_.at(a->second.job_id()).manifest_sha256());
      }
      *response.mutable_assignment()->mutable_path_policy() = options_.path_policy;
      w.delivered = true;
      return response;
    }
    const int64_t left = deadline_ms - Mono();
    if (left <= 0) return response;
    cv_.wait_for(lock, std::chrono::milliseconds(std::min<int64_t>(left, 500)));
  }
}

absl::Status Coordinator::CheckAssignmentOwner(const std::string& worker_id,
                                               const std::string& assignment_id,
                                               int64_t lease_epoch, AssignmentRecord** live) {
  auto it = assignments_.find(assignment_id);
  if (it == assignments_.end()) {
    return absl::NotFoundError(absl::StrCat("assignment ", assignment_id, " does not exist"));
  }
  AssignmentRecord& a = it->second;
  if (a.worker_id() != worker_id || a.lease_epoch() != lease_epoch) {
    return absl::AbortedError(absl::StrCat("assignment ", assignment_id, " is not held by worker ",
                                           worker_id, " with lease epoch ", lease_epoch));
  }
  if (a.ended()) {
    if (a.completed()) return absl::OkStatus();  // a repeated report: idempotent
    return absl::AbortedError(
        absl::StrCat("assignment ", assignment_id, " is no longer yours: ", a.end_reason()));
  }
  *live = &a;
  return absl::OkStatus();
}

absl::StatusOr<mq::v1::ReportProgressResponse> Coordinator::ReportProgress(
    const mq::v1::ReportProgressRequest& request) {
  if (!(request.fraction() >= 0 && request.fraction() <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fraction = ", request.fraction(), ": must be in [0, 1]"));
  }
  if (request.stage().size() > 256) {
    return absl::InvalidArgumentError("stage: at most 256 characters are allowed");
  }
  std::lock_guard<std::mutex> lock(mu_);
  mq::v1::ReportProgressResponse response;
  auto w = workers_.find(request.worker_id());
  if (w != workers_.end() && !w->second.dead) w->second.last_heartbeat_ms = Mono();
  if (inspections_.count(request.assignment_id())) {
    if (request.publish()) {
      return absl::AbortedError(absl::StrCat("assignment ", request.assignment_id(),
                                             " is an inspection; only a finalize assignment "
                                             "publishes a manifest"));
    }
    return response;
  }
  AssignmentRecord* live = nullptr;
  absl::Status s = CheckAssignmentOwner(request.worker_id(), request.assignment_id(),
                                        request.lease_epoch(), &live);
  if (!s.ok()) return s;
  if (request.publish()) {
    if (absl::Status st = Publish(request, live); !st.ok()) return st;
  }
  if (!live) return response;
  JobRecord& job = jobs_.at(live->job_id());
  job.mutable_progress()->set_stage(request.stage());
  job.mutable_progress()->set_stage_fraction(request.fraction());
  response.set_cancel(IsTerminal(job.state()));
  Changed();
  return response;
}

absl::Status Coordinator::EndAssignment(AssignmentRecord& a, WriteBatch& batch,
                                        mq::v1::AttemptState attempt_state,
                                        const std::string& reason, bool completed) {
  a.set_ended(true);
  a.set_end_reason(reason);
  a.set_completed(completed);
  batch.Put(Table::kAssignments, a.assignment_id(), a.SerializeAsString());
  return PutAttemptState(a.job_id(), a.attempt(), attempt_state, reason, batch);
}

absl::Status Coordinator::PutAttemptState(const std::string& job_id, int attempt_number,
                                          mq::v1::AttemptState state, const std::string& message,
                                          WriteBatch& batch) {
  auto attempt = LoadAttempt(job_id, attempt_number);
  if (!attempt.ok()) return attempt.status();
  attempt->set_state(state);
  attempt->set_ended_at_ms(Wall());
  attempt->set_message(message);
  batch.Put(Table::kAttempts, AttemptKey(job_id, attempt_number), attempt->SerializeAsString());
  return absl::OkStatus();
}

void Coordinator::EndLiveAssignments(const std::string& job_id, int attempt,
                                     const std::string& reason, const std::string& except_id,
                                     WriteBatch& batch, std::vector<AssignmentRecord>* ended) {
  for (const auto& [id, a] : assignments_) {
    if (a.job_id() != job_id || a.attempt() != attempt || a.ended() || id == except_id) continue;
    AssignmentRecord copy = a;
    copy.set_ended(true);
    copy.set_end_reason(reason);
    copy.set_completed(false);
    batch.Put(Table::kAssignments, id, copy.SerializeAsString());
    ended->push_back(std::move(copy));
  }
}

void Coordinator::ApplyEnded(const std::vector<AssignmentRecord>& ended) {
  for (const AssignmentRecord& a : ended) {
    assignments_[a.assignment_id()] = a;
    EndedOnWorker(a);
  }
}

void Coordinator::EndedOnWorker(const AssignmentRecord& a) {
  auto w = workers_.find(a.worker_id());
  if (w == workers_.end() || w->second.assignment_id != a.assignment_id()) return;
  w->second.assignment_id.clear();
  if (w->second.delivered) {
    w->second.needs_poll = true;
    w->second.ended_job_id = a.job_id();
  }
}

bool Coordinator::MayStillRun(const std::string& job_id) const {
  for (const auto& [id, w] : workers_) {
    if (!w.dead && w.needs_poll && w.ended_job_id == job_id) return true;
  }
  return false;
}

bool Coordinator::HasLiveAssignment(const std::string& job_id) const {
  for (const auto& [id, a] : assignments_) {
    if (a.job_id() == job_id && !a.ended()) return true;
  }
  return false;
}

int Coordinator::CommittedPrefix(const std::string& job_id) const {
  auto it = layers_.find(job_id);
  if (it == layers_.end()) return 0;
  int n = 0;
  for (auto rec = it->second.find(0);
       rec != it->second.end() && rec->first == n && rec->second.committed(); ++rec) {
    ++n;
  }
  return n;
}

int Coordinator::CommittedCount(const std::string& job_id) const {
  auto it = layers_.find(job_id);
  if (it == layers_.end()) return 0;
  int n = 0;
  for (const auto& [step, rec] : it->second) n += rec.committed() ? 1 : 0;
  return n;
}

void Coordinator::RetryOrFail(JobRecord& job, WriteBatch& batch, const std::string& raw_reason,
                              bool infrastructure, bool worker_lost) {
  // Events and the job's message carry the failure's text, never a stack trace.
  const std::string reason = EventMessage(raw_reason);
  std::string note;
  int64_t backoff_ms = 0;
  if (infrastructure && !worker_lost) {
    mq::v1::InfrastructureFailures* f = job.mutable_infrastructure_failures();
    const int committed = CommittedCount(job.job_id());
    if (committed != f->committed_steps()) f->Clear();  // progress since the last one
    f->set_committed_steps(committed);
    f->set_in_row(f->in_row() + 1);
    std::vector<std::string> gang;
    for (const auto& [id, a] : assignments_) {
      if (a.job_id() == job.job_id() && a.attempt() == job.attempt()) {
        auto w = workers_.find(a.worker_id());
        gang.push_back(w != workers_.end() ? w->second.record.name() : a.worker_id());
      }
    }
    const std::string signature = FailureSignature(reason, std::move(gang));
    f->set_identical(signature == f->signature() ? f->identical() + 1 : 1);
    f->set_signature(signature);
    if (f->identical() >= kMaxIdenticalInfrastructureFailures) {
      std::string last = reason;
      while (!last.empty() && (last.back() == '.' || last.back() == ' ')) last.pop_back();
      SetJobState(job, batch, mq::v1::JOB_STATE_FAILED,
                  absl::StrCat("gave up: the same infrastructure failure ", f->identical(),
                               " times in a row with no step committed in between: ", last,
                               ". Fix the cause, then `mq-client resume ", job.job_id(), "`"));
      if (metrics_) metrics_->jobs_failed->Increment();
      PutJob(batch, job);
      return;
    }
    backoff_ms = InfrastructureRetryDelayMs(f->in_row());
  }
  if (infrastructure) {
    if (job.uncounted_attempts() < 10 * job.spec().max_attempts()) {
      job.set_uncounted_attempts(job.uncounted_attempts() + 1);
      job.set_attempt_base(job.attempt_base() + 1);
      if (metrics_) metrics_->attempts_uncounted->Increment();
      note = "; not counted against spec.max_attempts (infrastructure)";
    } else {
      note = absl::StrCat("; counted: already ", job.uncounted_attempts(),
                          " uncounted infrastructure failures");
    }
  }
  const int used = job.attempt() - job.attempt_base();
  if (used >= job.spec().max_attempts()) {
    SetJobState(job, batch, mq::v1::JOB_STATE_FAILED,
                absl::StrCat("gave up after ", used, " attempts (spec.max_attempts = ",
                             job.spec().max_attempts(), "); last: ", reason, note,
                             ". Fix the cause, then `mq-client resume ", job.job_id(), "`"));
    if (metrics_) metrics_->jobs_failed->Increment();
  } else {
    if (backoff_ms > 0) {
      retry_not_before_[job.job_id()] = Mono() + backoff_ms;
      absl::StrAppend(&note, "; retrying in ", absl::SixDigits(backoff_ms / 1000.0), " s");
    }
    SetJobState(job, batch, mq::v1::JOB_STATE_QUEUED,
                absl::StrCat("attempt ", job.attempt(), " ended (", reason, ")", note,
                             IsPlanned(job) ? "; waiting for a gang" : "; waiting for a worker"));
  }
  PutJob(batch, job);
}

std::string Coordinator::UncommitCorruptFiles(JobRecord& job, WriteBatch& batch,
                                              const mq::v1::CompleteAssignmentRequest& request,
                                              std::vector<int>* uncommitted) {
  const std::string& job_id = job.job_id();
  // How often each file was found damaged before (since submit or the last resume), from the
  // stored events: a storage that keeps damaging a file must end the job, not loop it.
  std::map<std::string, int> seen;
  if (absl::StatusOr<KeyValues> events = store_->GetAll(Table::kEvents, job_id + "/");
      events.ok()) {
    for (const auto& [key, value] : *events) {
      mq::v1::JobEvent e;
      if (!e.ParseFromString(value)) continue;
      if (e.kind() == "state" && absl::StartsWith(e.message(), "QUEUED: resumed")) seen.clear();
      if (e.kind() != "file_corrupt") continue;
      for (const std::string& f : request.corrupt_files()) {
        if (absl::StartsWith(e.message(), absl::StrCat("output file ", f, " "))) ++seen[f];
      }
    }
  }
  auto records = layers_.find(job_id);
  int from = INT_MAX;
  std::string give_up;
  for (const std::string& f : request.corrupt_files()) {
    const mq::v1::LayerRecord* holder = nullptr;  // the earliest committed step listing f
    if (records != layers_.end()) {
      for (const auto& [step, rec] : records->second) {
        if (!rec.committed()) continue;
        for (const mq::v1::LayerReport& r : rec.reports()) {
          for (const mq::v1::OutputFile& file : r.files()) {
            if (file.name() == f) holder = &rec;
          }
        }
        if (holder) break;
      }
    }
    const int times = ++seen[f];
    if (holder) {
      from = std::min(from, holder->step());
      AddEvent(job, batch, "file_corrupt",
               absl::StrCat("output file ", f, " failed verification (size or SHA-256 ",
                            "differs from what step ", holder->step(), " (layer ", holder->layer(),
                            ") committed): steps ", holder->step(),
                            ".. are uncommitted and computed again"),
               request.worker_id());
    } else {
      AddEvent(job, batch, "file_corrupt",
               absl::StrCat("output file ", f, " failed verification; no committed step ",
                            "lists it (a file read back right after its write, or one only ",
                            "finalization writes): the assignment that found it runs again"),
               request.worker_id());
    }
    if (times >= job.spec().max_attempts() && give_up.empty()) {
      give_up =
          absl::StrCat("output file ", f, " was found damaged ", times,
                       " times (spec.max_attempts = ", job.spec().max_attempts(),
                       "): the storage under ", job.spec().output_uri(),
                       " keeps changing it; check the disk, then `mq-client resume ", job_id, "`");
    }
  }
  if (from != INT_MAX) {
    for (const auto& [step, rec] : records->second) {
      if (step < from) continue;
      batch.Delete(Table::kLayers, LayerKey(job_id, step));
      uncommitted->push_back(step);
    }
    mq::v1::JobProgress* p = job.mutable_progress();
    p->set_layers_committed(std::min(p->layers_committed(), from));
  }
  return give_up;
}

void Coordinator::ApplyPlanResult(JobRecord& job, WriteBatch& batch,
                                  const mq::v1::InspectReport& report) {
  *job.mutable_plan() = report;
  job.mutable_progress()->set_layers_total(report.layers_size());
  job.mutable_progress()->set_stage("");
  job.mutable_progress()->set_stage_fraction(0);
  if (report.problems_size() > 0) {
    std::vector<std::string> first;
    int request_problems = 0;
    for (int i = 0; i < report.problems_size(); ++i) {
      if (absl::StartsWith(report.problems(i).where(), "request.")) ++request_problems;
      if (i >= 3) continue;
      first.push_back(absl::StrCat(report.problems(i).where(), ": ", report.problems(i).message()));
    }
    // Problems with the request itself ("request.<field>") are not the checkpoint's.
    const int n = report.problems_size();
    const std::string plural = n == 1 ? "" : "s";
    const std::string found =
        request_problems == n ? absl::StrCat("the request has ", n, " problem", plural)
        : request_problems == 0
            ? absl::StrCat("the checkpoint check found ", n, " problem", plural)
            : absl::StrCat("planning found ", n, " problems (", request_problems,
                           " in the request, ", n - request_problems, " in the checkpoint)");
    SetJobState(job, batch, mq::v1::JOB_STATE_FAILED,
                absl::StrCat(found, ": ", absl::StrJoin(first, "; "),
                             report.problems_size() > 3 ? "; ..." : "", " (`mq-client status ",
                             job.job_id(), "` lists all)"));
    if (metrics_) metrics_->jobs_failed->Increment();
    return;
  }
  const std::string capability = QuantizeCapability(job);
  const std::string summary = absl::StrCat(
      report.layers_size(), " steps, ", HumanBytes(report.estimate().gpu_bytes_per_rank()),
      " GPU and ", HumanBytes(report.estimate().host_bytes_per_rank()), " host memory per rank, ",
      HumanBytes(report.estimate().output_bytes()), " output");
  // A refusal after planning: the job fails with `message` (the plan stays for a resume).
  auto refuse = [&](const std::string& message) {
    SetJobState(job, batch, mq::v1::JOB_STATE_FAILED, message);
    if (metrics_) metrics_->jobs_failed->Increment();
  };
  const std::vector<WorkerView> views = WorkerViews();
  if (!AnyWorkerOffers(views, capability)) {
    job.set_missing_capability(capability);
    refuse(absl::StrCat("planning succeeded (", summary,
                        "), but no live worker offers capability \"", capability,
                        "\": start mq-worker processes that offer it (`mq-client workers` "
                        "lists them), then `mq-client resume ",
                        job.job_id(), "`"));
    return;
  }
  // A job whose per-rank estimate exceeds every capable GPU worker's memory would run out of
  // device memory on its first layer, attempt after attempt: say so now.
  const int64_t need = report.estimate().gpu_bytes_per_rank();
  if (std::optional<int64_t> largest = LargestDeviceMemory(views, capability);
      largest && need > *largest) {
    refuse(absl::StrCat(
        "planning succeeded (", summary, "), but the estimate of ", HumanBytes(need),
        " GPU memory per rank exceeds the largest device of the workers offering \"", capability,
        "\" (", HumanBytes(*largest),
        "): submit again with a larger --gang-size (fewer experts and sequences per "
        "rank), fewer --num-calibration-samples or a shorter --max-sequence-length, "
        "or start workers with a lower --dispatch-tokens or --experts-per-pass",
        SettingsOfPlan(report.estimate()), ", or with larger GPUs, and `mq-client resume ",
        job.job_id(), "`"));
    return;
  }
  // The same for host memory: a rank keeps its share of the hidden states there (page-locked),
  // and one that does not fit is killed by the kernel mid-layer rather than failing cleanly.
  const int64_t need_host = report.estimate().host_bytes_per_rank();
  if (std::optional<int64_t> largest = LargestHostMemory(views, capability);
      largest && need_host > *largest) {
    refuse(absl::StrCat(
        "planning succeeded (", summary, "), but the estimate of ", HumanBytes(need_host),
        " host memory per rank exceeds the host memory of every worker offering \"", capability,
        "\" (the largest has ", HumanBytes(*largest),
        "): submit again with a larger --gang-size (fewer sequences per rank), fewer "
        "--num-calibration-samples or a shorter --max-sequence-length, or start "
        "workers on hosts with more memory, and `mq-client resume ",
        job.job_id(), "`"));
    return;
  }
  job.clear_missing_capability();
  // A phase that succeeded: the pipeline gets the full spec.max_attempts budget.
  job.set_attempt_base(job.attempt());
  SetJobState(job, batch, mq::v1::JOB_STATE_QUEUED,
              absl::StrCat("planned: ", summary, "; waiting for a gang of ", job.spec().gang_size(),
                           " worker", job.spec().gang_size() == 1 ? "" : "s"));
}

absl::StatusOr<mq::v1::CompleteAssignmentResponse> Coordinator::CompleteAssignment(
    const mq::v1::CompleteAssignmentRequest& request) {
  using Request = mq::v1::CompleteAssignmentRequest;
  if (request.result_case() == Request::RESULT_NOT_SET) {
    return absl::InvalidArgumentError("result: is required (plan, quantized, finalized or error)");
  }
  if (request.has_finalized()) {
    if (absl::Status s = ValidateFinalizeResult(request.finalized()); !s.ok()) return s;
  }
  if (request.has_error() && request.error().size() > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("error: ", request.error().size(), " characters; at most 65536 are allowed"));
  }
  if (request.corrupt_files_size() > 0 && !request.has_error()) {
    return absl::InvalidArgumentError("corrupt_files: only a failed assignment (error) names them");
  }
  if (request.corrupt_files_size() > 4096) {
    return absl::InvalidArgumentError(absl::StrCat("corrupt_files: ", request.corrupt_files_size(),
                                                   " names; at most 4096 are allowed"));
  }
  for (const std::string& f : request.corrupt_files()) {
    if (f.empty() || f.size() > 1024 || f.find('/') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("corrupt_files: \"", f.substr(0, 64),
                       "\": must be a file name in the output directory (1 to 1024 characters, "
                       "no '/')"));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  mq::v1::CompleteAssignmentResponse response;
  auto w = workers_.find(request.worker_id());
  if (w != workers_.end() && !w->second.dead) w->second.last_heartbeat_ms = Mono();

  auto insp = inspections_.find(request.assignment_id());
  if (insp != inspections_.end()) {
    Inspection& i = *insp->second;
    if (i.worker_id != request.worker_id()) {
      return absl::AbortedError(absl::StrCat("inspection ", request.assignment_id(),
                                             " is not held by worker ", request.worker_id()));
    }
    if (request.has_plan()) {
      i.report = request.plan();
    } else {
      i.status = absl::InternalError(absl::StrCat(
          "worker ", request.worker_id(),
          " failed the inspection: ", request.has_error() ? request.error() : "it sent no plan"));
    }
    i.done = true;
    inspections_.erase(insp);
    if (w != workers_.end() && w->second.assignment_id == request.assignment_id()) {
      w->second.assignment_id.clear();
    }
    Changed();
    return response;
  }

  AssignmentRecord* live = nullptr;
  absl::Status s = CheckAssignmentOwner(request.worker_id(), request.assignment_id(),
                                        request.lease_epoch(), &live);
  if (!s.ok()) return s;
  if (!live) return response;  // already completed: idempotent

  AssignmentRecord a = *live;
  const Request::ResultCase expected =
      a.kind() == mq::v1::ASSIGNMENT_KIND_QUANTIZE   ? Request::kQuantized
      : a.kind() == mq::v1::ASSIGNMENT_KIND_FINALIZE ? Request::kFinalized
      : a.kind() == mq::v1::ASSIGNMENT_KIND_EVALUATE ? Request::kEvaluated
                                                     : Request::kPlan;
  if (request.result_case() != Request::kError && request.result_case() != expected) {
    return absl::InvalidArgumentError(absl::StrCat("result: a ", KindName(a.kind()),
                                                   " assignment completes with ",
                                                   expected == Request::kQuantized   ? "quantized"
                                                   : expected == Request::kFinalized ? "finalized"
                                                   : expected == Request::kEvaluated ? "evaluated"
                                                                                     : "plan",
                                                   " or error"));
  }
  if (request.has_evaluated()) {
    if (absl::Status s = ValidateEvaluateResult(request.evaluated(), !IsEvalJob(jobs_.at(a.job_id())));
        !s.ok()) {
      return s;
    }
  }
  JobRecord job = jobs_.at(a.job_id());
  WriteBatch batch;
  std::vector<AssignmentRecord> ended;
  const bool ok = !request.has_error();
  const std::string worker_name =
      w != workers_.end() ? w->second.record.name() : request.worker_id();
  std::vector<int> uncommitted;  // steps whose records go once the batch is committed

  if (!ok) {
    const std::string reason =
        a.kind() == mq::v1::ASSIGNMENT_KIND_QUANTIZE
            ? absl::StrCat("rank ", a.rank(), " (", worker_name, ") failed: ", request.error())
            : "worker error: " + request.error();
    if (absl::Status st =
            EndAssignment(a, batch, mq::v1::ATTEMPT_STATE_FAILED, reason, /*completed=*/true);
        !st.ok()) {
      return st;
    }
    EndLiveAssignments(a.job_id(), a.attempt(),
                       absl::StrCat("attempt ", a.attempt(), " failed: ", reason),
                       a.assignment_id(), batch, &ended);
    AddEvent(job, batch, "attempt_failed",
             absl::StrCat(
                 "attempt ", a.attempt(), ": ", reason,
                 ended.empty() ? "" : absl::StrCat("; stopping ", ended.size(), " other rank(s)"),
                 request.infrastructure() ? " (infrastructure)" : ""),
             request.worker_id());
    // Damaged committed files: uncommit their steps (and later ones) to compute them again. The
    // attempt counts, and a file damaged again and again fails the job naming it.
    const std::string give_up = request.corrupt_files_size() > 0
                                    ? UncommitCorruptFiles(job, batch, request, &uncommitted)
                                    : std::string();
    if (a.kind() == mq::v1::ASSIGNMENT_KIND_EVALUATE && request.corrupt_files_size() > 0) {
      job.clear_manifest_sha256();  // a finalized file changed: finalize (and evaluate) again
      job.clear_quality();
    }
    if (!give_up.empty()) {
      SetJobState(job, batch, mq::v1::JOB_STATE_FAILED, give_up);
      PutJob(batch, job);
      if (metrics_) metrics_->jobs_failed->Increment();
    } else {
      RetryOrFail(job, batch, reason,
                  request.infrastructure() && request.corrupt_files_size() == 0);
    }
  } else if (a.kind() == mq::v1::ASSIGNMENT_KIND_PLAN) {
    if (absl::Status st = EndAssignment(a, batch, mq::v1::ATTEMPT_STATE_SUCCEEDED, "completed",
                                        /*completed=*/true);
        !st.ok()) {
      return st;
    }
    AddEvent(
        job, batch, "planned",
        absl::StrCat("plan from worker ", request.worker_id(), ": ", request.plan().layers_size(),
                     " layers, ", request.plan().problems_size(), " problems"),
        request.worker_id());
    ApplyPlanResult(job, batch, request.plan());
    PutJob(batch, job);
  } else if (a.kind() == mq::v1::ASSIGNMENT_KIND_QUANTIZE) {
    a.set_ended(true);
    a.set_end_reason(absl::StrCat("completed: ", request.quantized().steps_run(), " steps run, ",
                                  request.quantized().steps_replayed(), " replayed"));
    a.set_completed(true);
    batch.Put(Table::kAssignments, a.assignment_id(), a.SerializeAsString());
    bool all_done = true;
    for (const auto& [id, other] : assignments_) {
      if (other.job_id() != a.job_id() || other.attempt() != a.attempt() ||
          id == a.assignment_id()) {
        continue;
      }
      all_done = all_done && other.ended() && other.completed();
    }
    if (all_done) {
      const int total = job.plan().layers_size();
      const int prefix = CommittedPrefix(job.job_id());
      if (prefix >= total) {
        const std::string msg = absl::StrCat("all ", total, " steps committed");
        if (absl::Status st = PutAttemptState(a.job_id(), a.attempt(),
                                              mq::v1::ATTEMPT_STATE_SUCCEEDED, msg, batch);
            !st.ok()) {
          return st;
        }
        job.set_attempt_base(job.attempt());  // a phase that succeeded: finalize gets a budget
        job.mutable_progress()->set_eta_seconds(0);
        job.mutable_progress()->set_stage("");
        job.mutable_progress()->set_stage_fraction(0);
        SetJobState(job, batch, mq::v1::JOB_STATE_FINALIZING,
                    absl::StrCat(msg, "; waiting for a worker to finalize the output"));
        PutJob(batch, job);
      } else {
        const std::string reason =
            absl::StrCat("ranks finished but steps ", prefix, ".. are not committed");
        if (absl::Status st = PutAttemptState(a.job_id(), a.attempt(), mq::v1::ATTEMPT_STATE_FAILED,
                                              reason, batch);
            !st.ok()) {
          return st;
        }
        AddEvent(job, batch, "attempt_failed", absl::StrCat("attempt ", a.attempt(), ": ", reason),
                 request.worker_id());
        RetryOrFail(job, batch, reason);
      }
    }
  } else if (a.kind() == mq::v1::ASSIGNMENT_KIND_FINALIZE) {
    const mq::v1::FinalizeResult& f = request.finalized();
    if (absl::Status st = EndAssignment(a, batch, mq::v1::ATTEMPT_STATE_SUCCEEDED, "completed",
                                        /*completed=*/true);
        !st.ok()) {
      return st;
    }
    job.set_manifest_sha256(f.manifest_sha256());
    job.set_output_files(f.files());
    job.set_output_bytes(f.total_bytes());
    job.mutable_progress()->set_eta_seconds(0);
    job.mutable_progress()->set_stage("");
    job.mutable_progress()->set_stage_fraction(0);
    AddEvent(job, batch, "finalized",
             absl::StrCat("output complete: ", Plural(f.files(), "file"), ", ",
                          HumanBytes(f.total_bytes()), ", manifest sha256 ", f.manifest_sha256(),
                          f.removed_files()
                              ? absl::StrCat("; removed ", Plural(f.removed_files(), "stray file"))
                              : ""),
             request.worker_id());
    const std::string done =
        absl::StrCat(job.plan().layers_size(), " steps quantized; ", Plural(f.files(), "file"),
                     ", ", HumanBytes(f.total_bytes()), " in ", job.spec().output_uri());
    if (EvaluatesOutput(job)) {
      job.set_attempt_base(job.attempt());  // a phase that succeeded: evaluation gets a budget
      job.clear_quality();
      SetJobState(job, batch, mq::v1::JOB_STATE_EVALUATING,
                  absl::StrCat(done, "; waiting for a worker to measure it against the original"),
                  request.worker_id());
    } else {
      SetJobState(job, batch, mq::v1::JOB_STATE_SUCCEEDED, done, request.worker_id());
    }
    PutJob(batch, job);
  } else {  // EVALUATE
    const mq::v1::EvaluateResult& e = request.evaluated();
    if (absl::Status st = EndAssignment(a, batch, mq::v1::ATTEMPT_STATE_SUCCEEDED, "completed",
                                        /*completed=*/true);
        !st.ok()) {
      return st;
    }
    *job.mutable_quality() = e.quality();
    const QualityGate gate = GateOf(job.spec().eval());
    const mq::v1::QualityReport& q = e.quality();
    std::string failure;
    if (gate.active()) {
      failure = q.not_measured().empty()
                    ? QualityGateFailure(gate, q.kl_mean(), q.perplexity_reference(),
                                         q.perplexity_candidate())
                    : "nothing was measured: " + q.not_measured();
      job.mutable_quality()->set_gate(failure.empty() ? "passed" : failure);
    } else {
      job.mutable_quality()->clear_gate();
    }
    if (!e.manifest_sha256().empty()) {
      job.set_manifest_sha256(e.manifest_sha256());
      job.set_output_files(e.files());
      job.set_output_bytes(e.total_bytes());
    }
    job.mutable_progress()->set_stage("");
    job.mutable_progress()->set_stage_fraction(0);
    const std::string summary = QualitySummary(q);
    AddEvent(job, batch, "evaluated",
             absl::StrCat(summary, " in ", absl::SixDigits(q.seconds()), " s",
                          e.manifest_sha256().empty()
                              ? ""
                              : absl::StrCat("; quality.json added, manifest sha256 ",
                                             e.manifest_sha256()),
                          gate.active() ? (failure.empty() ? "; quality gate passed"
                                                           : "; quality gate FAILED")
                                        : ""),
             request.worker_id());
    const std::string where =
        IsEvalJob(job) ? job.spec().eval().candidate_uri() : job.spec().output_uri();
    if (!failure.empty()) {
      SetJobState(job, batch, mq::v1::JOB_STATE_FAILED,
                  absl::StrCat("failed the quality gate: ", failure, " (", summary, ")",
                               IsEvalJob(job) ? ""
                                              : absl::StrCat("; the output stays in ", where,
                                                             " with its manifest and quality.json")),
                  request.worker_id());
      if (metrics_) metrics_->jobs_failed->Increment();
    } else {
      SetJobState(job, batch, mq::v1::JOB_STATE_SUCCEEDED,
                  IsEvalJob(job) ? absl::StrCat("measured ", where, ": ", summary)
                                 : absl::StrCat(job.plan().layers_size(), " steps quantized; ",
                                                Plural(job.output_files(), "file"), ", ",
                                                HumanBytes(job.output_bytes()), " in ", where,
                                                "; ", summary),
                  request.worker_id());
    }
    PutJob(batch, job);
    if (metrics_) metrics_->ObserveQuality(q, gate.active(), failure.empty());
  }
  if (absl::Status st = Commit(batch); !st.ok()) return st;
  for (int step : uncommitted) layers_[a.job_id()].erase(step);
  assignments_[a.assignment_id()] = a;
  jobs_[job.job_id()] = job;
  if (w != workers_.end() && w->second.assignment_id == a.assignment_id()) {
    w->second.assignment_id.clear();
  }
  ApplyEnded(ended);
  if (metrics_) {
    metrics_->CountAssignment(KindName(a.kind()), ok ? "ok" : "failed");
    for (const AssignmentRecord& e : ended)
      metrics_->CountAssignment(KindName(e.kind()), "aborted");
    if (job.state() == mq::v1::JOB_STATE_SUCCEEDED) metrics_->jobs_succeeded->Increment();
  }
  Changed();
  return response;
}

absl::StatusOr<mq::v1::ReportLayerResponse> Coordinator::ReportLayer(
    const mq::v1::ReportLayerRequest& request) {
  if (absl::Status s = ValidateReportLayer(request); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  mq::v1::ReportLayerResponse response;
  auto w = workers_.find(request.worker_id());
  if (w != workers_.end() && !w->second.dead) w->second.last_heartbeat_ms = Mono();
  if (inspections_.count(request.assignment_id())) {
    return absl::FailedPreconditionError(
        absl::StrCat("assignment_id = \"", request.assignment_id(),
                     "\": is an inspection; only quantize assignments report layers"));
  }
  AssignmentRecord* live = nullptr;
  absl::Status s = CheckAssignmentOwner(request.worker_id(), request.assignment_id(),
                                        request.lease_epoch(), &live);
  if (!s.ok()) return s;
  const AssignmentRecord& a = assignments_.at(request.assignment_id());
  if (a.kind() != mq::v1::ASSIGNMENT_KIND_QUANTIZE) {
    return absl::FailedPreconditionError(
        absl::StrCat("assignment_id = \"", a.assignment_id(), "\": is a ", KindName(a.kind()),
                     " assignment; only quantize assignments report layers"));
  }
  const JobRecord& current = jobs_.at(a.job_id());
  const int total = current.plan().layers_size();
  if (request.step() >= total) {
    return absl::InvalidArgumentError(absl::StrCat("step = ", request.step(), ": must be in [0, ",
                                                   total, ") (the plan's steps)"));
  }
  if (request.rank() >= a.world_size() || request.rank() != a.rank()) {
    return absl::InvalidArgumentError(absl::StrCat("rank = ", request.rank(),
                                                   ": must be this assignment's rank ", a.rank(),
                                                   " (world size ", a.world_size(), ")"));
  }
  if (request.step() < a.start_step()) {
    return absl::InvalidArgumentError(
        absl::StrCat("step = ", request.step(), ": must be >= the attempt's start_step ",
                     a.start_step(), " (earlier steps are committed)"));
  }
  const int expected_layer = current.plan().layers(request.step()).index();
  if (request.layer() != expected_layer) {
    return absl::InvalidArgumentError(absl::StrCat("layer = ", request.layer(), ": step ",
                                                   request.step(), " is checkpoint layer ",
                                                   expected_layer));
  }
  response.set_cancel(current.state() != mq::v1::JOB_STATE_RUNNING);
  std::map<int, mq::v1::LayerRecord>& records = layers_[a.job_id()];
  auto existing = records.find(request.step());
  if (existing != records.end() && existing->second.committed()) {
    response.set_committed(true);  // never replaced: idempotent
    return response;
  }
  if (!live) return response;  // the rank already completed: nothing changes

  mq::v1::LayerRecord rec;
  if (existing != records.end() && existing->second.attempt() == a.attempt()) {
    rec = existing->second;
  } else {
    rec.set_job_id(a.job_id());
    rec.set_step(request.step());
    rec.set_layer(request.layer());
    rec.set_attempt(a.attempt());
    rec.set_world_size(a.world_size());
  }
  mq::v1::LayerReport report;
  report.set_rank(request.rank());
  *report.mutable_files() = request.files();
  *report.mutable_stats() = request.stats();
  report.set_worker_id(request.worker_id());
  bool replaced = false;
  for (mq::v1::LayerReport& r : *rec.mutable_reports()) {
    if (r.rank() != request.rank()) continue;
    if (google::protobuf::util::MessageDifferencer::Equals(r, report)) return response;
    r = report;
    replaced = true;
  }
  if (!replaced) {
    *rec.add_reports() = report;
    std::sort(rec.mutable_reports()->begin(), rec.mutable_reports()->end(),
              [](const mq::v1::LayerReport& x, const mq::v1::LayerReport& y) {
                return x.rank() < y.rank();
              });
  }
  WriteBatch batch;
  JobRecord job = current;
  const bool commit = rec.reports_size() == rec.world_size();
  if (commit) {
    rec.set_committed(true);
    rec.set_committed_at_ms(Wall());
    const mq::v1::LayerStats merged = MergeStats(rec);
    // Progress as if the record were already in place.
    std::map<int, mq::v1::LayerRecord> after = records;
    after[rec.step()] = rec;
    int prefix = 0, committed = 0, in_attempt = 0;
    for (const auto& [step, r] : after) {
      if (!r.committed()) continue;
      ++committed;
      if (r.attempt() == a.attempt()) ++in_attempt;
    }
    while (after.count(prefix) && after.at(prefix).committed()) ++prefix;
    mq::v1::JobProgress* p = job.mutable_progress();
    p->set_layers_committed(prefix);
    *p->mutable_last_layer() = merged;
    p->set_fallbacks(SaturatingAdd<int64_t>(p->fallbacks(), merged.fallbacks()));
    p->set_rare_experts(SaturatingAdd<int64_t>(p->rare_experts(), merged.rare_experts()));
    auto attempt = LoadAttempt(a.job_id(), a.attempt());
    if (!attempt.ok()) return attempt.status();
    const double elapsed_s = std::max<int64_t>(0, Wall() - attempt->started_at_ms()) / 1000.0;
    const double per_layer = in_attempt > 0 ? elapsed_s / in_attempt : 0;
    p->set_seconds_per_layer(per_layer);
    p->set_eta_seconds(per_layer * std::max(0, total - committed));
    job.set_updated_at_ms(Wall());
    int files = 0;
    for (const mq::v1::LayerReport& r : rec.reports()) files += r.files_size();
    char secs[32];
    std::snprintf(secs, sizeof(secs), "%.1f", StageSeconds(merged));
    AddEvent(
        job, batch, "layer_committed",
        absl::StrCat("step ", rec.step(), " (layer ", rec.layer(), ") committed by attempt ",
                     rec.attempt(), ": ", Plural(files, "file"), ", ", secs, " s, tokens/expert ",
                     merged.expert_tokens_min(), "/", merged.expert_tokens_median(), "/",
                     merged.expert_tokens_max(), ", ", Plural(merged.fallbacks(), "fallback"), ", ",
                     Plural(merged.rare_experts(), "rare expert")),
        request.worker_id());
    PutJob(batch, job);
  }
  batch.Put(Table::kLayers, LayerKey(rec.job_id(), rec.step()), rec.SerializeAsString());
  if (absl::Status st = Commit(batch); !st.ok()) return st;
  records[rec.step()] = rec;
  jobs_[job.job_id()] = job;
  if (commit && metrics_) metrics_->layers_committed->Increment();
  response.set_committed(commit);
  Changed();
  return response;
}

// ---------------------------------------------------------------------------------------------
// Leases and scheduling

std::vector<WorkerView> Coordinator::WorkerViews() const {
  std::vector<WorkerView> views;
  for (const auto& [id, w] : workers_) {
    WorkerView v;
    v.worker_id = id;
    v.alive = !w.dead;
    // Idle for new work: no assignment, polled since the coordinator last ended one of its
    // assignments, and heard from recently (a worker killed a moment ago still holds a lease
    // but must not become a gang's rank).
    const bool responsive =
        Mono() - w.last_heartbeat_ms <= 2 * options_.heartbeat_interval_ms + 500;
    v.idle = w.assignment_id.empty() && !w.needs_poll && responsive;
    v.capabilities.assign(w.record.capabilities().capabilities().begin(),
                          w.record.capabilities().capabilities().end());
    v.registered_at_ms = w.record.registered_at_ms();
    v.gang_address = w.record.capabilities().gang_address();
    v.device_memory_bytes = w.record.capabilities().device_memory_bytes();
    v.host_memory_bytes = w.record.capabilities().host_memory_bytes();
    views.push_back(std::move(v));
  }
  return views;
}

void Coordinator::ExpireWorker(const std::string& worker_id, const std::string& reason) {
  WorkerEntry& w = workers_.at(worker_id);
  w.dead = true;
  if (metrics_) metrics_->workers_lost->Increment();
  LogLine("coordinator", "WARN", absl::StrCat("worker ", worker_id, " declared dead: ", reason));
  const std::string assignment_id = w.assignment_id;
  w.assignment_id.clear();
  if (assignment_id.empty()) return;
  auto insp = inspections_.find(assignment_id);
  if (insp != inspections_.end()) {
    insp->second->status = absl::UnavailableError(
        absl::StrCat("worker ", worker_id, " died during the inspection (", reason, ")"));
    insp->second->done = true;
    inspections_.erase(insp);
    return;
  }
  auto it = assignments_.find(assignment_id);
  if (it == assignments_.end() || it->second.ended()) return;
  const AssignmentRecord a = it->second;
  JobRecord job = jobs_.at(a.job_id());
  WriteBatch batch;
  const std::string why = absl::StrCat("worker ", worker_id, " lost: ", reason);
  // The whole gang's attempt ends: the survivors cannot go on without the lost rank.
  std::vector<AssignmentRecord> ended;
  EndLiveAssignments(a.job_id(), a.attempt(), why, "", batch, &ended);
  if (!PutAttemptState(a.job_id(), a.attempt(), mq::v1::ATTEMPT_STATE_ABORTED, why, batch).ok()) {
    w.assignment_id = assignment_id;  // keep it; retried on the next tick
    return;
  }
  AddEvent(job, batch, "lease_expired",
           ended.size() > 1 ? absl::StrCat(why, "; stopping the other ", ended.size() - 1,
                                           " rank(s) of attempt ", a.attempt())
                            : why,
           worker_id);
  // Losing a pipeline worker is the infrastructure's fault; losing a planner may be the job's
  // (e.g. it ran out of memory reading the checkpoint), so that one counts.
  const bool infrastructure = a.kind() != mq::v1::ASSIGNMENT_KIND_PLAN;
  RetryOrFail(job, batch, why, infrastructure, /*worker_lost=*/true);
  if (!Commit(batch).ok()) {
    w.assignment_id = assignment_id;
    return;
  }
  ApplyEnded(ended);
  jobs_[job.job_id()] = job;
  if (metrics_) {
    for (const AssignmentRecord& e : ended)
      metrics_->CountAssignment(KindName(e.kind()), "reassigned");
  }
}

void Coordinator::ScheduleQueued() {
  std::vector<const JobRecord*> queue;
  for (const auto& [id, job] : jobs_) {
    if (job.state() != mq::v1::JOB_STATE_QUEUED && job.state() != mq::v1::JOB_STATE_FINALIZING &&
        job.state() != mq::v1::JOB_STATE_EVALUATING) {
      continue;
    }
    // Never two attempts of a job at once (e.g. two finalizers on one directory): an ended
    // assignment that its worker may still be running holds the job back until that worker
    // polls again or is declared dead.
    if (MayStillRun(id)) continue;
    if (job.state() == mq::v1::JOB_STATE_QUEUED || !HasLiveAssignment(id)) queue.push_back(&job);
  }
  std::stable_sort(queue.begin(), queue.end(), [](const JobRecord* a, const JobRecord* b) {
    return a->spec().priority() > b->spec().priority();
  });
  std::vector<std::string> ids;
  const int64_t now = Mono();
  for (const JobRecord* j : queue) {
    auto backoff = retry_not_before_.find(j->job_id());
    if (backoff != retry_not_before_.end() && now < backoff->second) continue;  // backing off
    ids.push_back(j->job_id());
  }
  for (const std::string& id : ids) {
    const JobRecord& job = jobs_.at(id);
    if (job.state() == mq::v1::JOB_STATE_FINALIZING) {
      ScheduleFinalize(id);
    } else if (job.state() == mq::v1::JOB_STATE_EVALUATING || IsEvalJob(job)) {
      ScheduleEvaluate(id);
    } else if (!IsPlanned(job)) {
      SchedulePlan(id);
    } else {
      ScheduleGang(id);
    }
  }
  // Forget backoffs that are over or of jobs no longer waiting.
  for (auto it = retry_not_before_.begin(); it != retry_not_before_.end();) {
    auto job = jobs_.find(it->first);
    const bool waiting =
        job != jobs_.end() && (job->second.state() == mq::v1::JOB_STATE_QUEUED ||
                               job->second.state() == mq::v1::JOB_STATE_FINALIZING ||
                               job->second.state() == mq::v1::JOB_STATE_EVALUATING);
    it = waiting && now < it->second ? std::next(it) : retry_not_before_.erase(it);
  }
  // Forget waiting starts of jobs no longer waiting.
  for (auto it = gang_wait_since_.begin(); it != gang_wait_since_.end();) {
    auto job = jobs_.find(it->first);
    if (job == jobs_.end() || job->second.state() != mq::v1::JOB_STATE_QUEUED) {
      it = gang_wait_since_.erase(it);
    } else {
      ++it;
    }
  }
}

AttemptRecord Coordinator::NewAttempt(JobRecord& job, const std::string& phase,
                                      const std::vector<std::string>& worker_ids, int start_step) {
  job.set_attempt(job.attempt() + 1);
  AttemptRecord attempt;
  attempt.set_job_id(job.job_id());
  attempt.set_attempt(job.attempt());
  attempt.set_state(mq::v1::ATTEMPT_STATE_RUNNING);
  attempt.set_phase(phase);
  for (const std::string& w : worker_ids) attempt.add_worker_ids(w);
  attempt.set_started_at_ms(Wall());
  attempt.set_start_layer(start_step);
  return attempt;
}

AssignmentRecord Coordinator::NewAssignment(const JobRecord& job, mq::v1::AssignmentKind kind,
                                            const std::string& worker_id, int rank, int world_size,
                                            int start_step) {
  AssignmentRecord a;
  a.set_assignment_id(NewId("a-"));
  a.set_job_id(job.job_id());
  a.set_attempt(job.attempt());
  a.set_kind(kind);
  a.set_worker_id(worker_id);
  a.set_lease_epoch(epoch_);
  a.set_rank(rank);
  a.set_world_size(world_size);
  a.set_created_at_ms(Wall());
  a.set_start_step(start_step);
  return a;
}

void Coordinator::HandOut(const AssignmentRecord& a) {
  assignments_[a.assignment_id()] = a;
  WorkerEntry& w = workers_.at(a.worker_id());
  w.assignment_id = a.assignment_id();
  w.delivered = false;
}

void Coordinator::SchedulePlan(const std::string& job_id) {
  auto gang = PickGang(WorkerViews(), "plan", 1);
  if (!gang) return;
  const std::string& worker_id = gang->front();
  JobRecord job = jobs_.at(job_id);
  const AttemptRecord attempt = NewAttempt(job, "plan", {worker_id}, 0);
  const AssignmentRecord a = NewAssignment(job, mq::v1::ASSIGNMENT_KIND_PLAN, worker_id, 0, 1, 0);
  WriteBatch batch;
  batch.Put(Table::kAssignments, a.assignment_id(), a.SerializeAsString());
  batch.Put(Table::kAttempts, AttemptKey(job.job_id(), job.attempt()), attempt.SerializeAsString());
  AddEvent(job, batch, "assigned",
           absl::StrCat("attempt ", job.attempt(), ": planning on worker ", worker_id, " (",
                        workers_.at(worker_id).record.name(), ")"),
           worker_id);
  SetJobState(
      job, batch, mq::v1::JOB_STATE_PLANNING,
      absl::StrCat("inspecting the checkpoint on worker ", workers_.at(worker_id).record.name()),
      worker_id);
  PutJob(batch, job);
  if (!Commit(batch).ok()) return;
  HandOut(a);
  jobs_[job_id] = job;
  ++changes_;
  if (metrics_) metrics_->job_attempts->Increment();
}

void Coordinator::ScheduleGang(const std::string& job_id) {
  JobRecord job = jobs_.at(job_id);
  const int total = job.plan().layers_size();
  const int start = CommittedPrefix(job_id);
  WriteBatch batch;
  if (start >= total && !job.manifest_sha256().empty() && EvaluatesOutput(job)) {
    // Finalized; the evaluation failed or its worker was lost: evaluate again.
    job.mutable_progress()->set_layers_committed(total);
    SetJobState(job, batch, mq::v1::JOB_STATE_EVALUATING,
                "the output is finalized; waiting for a worker to measure it against the original");
    PutJob(batch, job);
    if (!Commit(batch).ok()) return;
    jobs_[job_id] = job;
    ++changes_;
    ScheduleEvaluate(job_id);
    return;
  }
  if (start >= total) {
    // Nothing left to quantize (e.g. a finalize attempt failed): finalize again.
    job.mutable_progress()->set_layers_committed(total);
    SetJobState(job, batch, mq::v1::JOB_STATE_FINALIZING,
                absl::StrCat("all ", total, " steps committed; waiting for a worker to finalize ",
                             "the output"));
    PutJob(batch, job);
    if (!Commit(batch).ok()) return;
    jobs_[job_id] = job;
    ++changes_;
    ScheduleFinalize(job_id);
    return;
  }
  const int64_t now = Mono();
  const int64_t since = gang_wait_since_.emplace(job_id, now).first->second;
  GangRequest request;
  request.capability = QuantizeCapability(job);
  request.gang_size = job.spec().gang_size();
  request.waited_ms = now - since;
  request.gang_wait_ms = options_.gang_wait_ms;
  const GangDecision decision = DecideGang(WorkerViews(), request);
  if (decision.workers.empty()) {
    SetWaitingMessage(job, absl::StrCat("planned: ", start, " of ", total,
                                        " steps committed; waiting for a gang of ",
                                        request.gang_size, ": ", decision.waiting));
    return;
  }
  const int size = static_cast<int>(decision.workers.size());
  const std::string rendezvous =
      workers_.at(decision.workers.front()).record.capabilities().gang_address();
  // One secret per gang attempt (128 bits), the same for every rank. Never logged.
  absl::StatusOr<std::string> secret = RandomHexSecret(16);
  if (!secret.ok()) {
    LogLine("coordinator", "ERROR",
            absl::StrCat("job ", job_id, ": no rendezvous secret: ", secret.status().message()));
    return;  // the job keeps waiting; the next tick tries again
  }
  const AttemptRecord attempt = NewAttempt(job, "quantize", decision.workers, start);
  job.clear_manifest_sha256();  // steps are computed again: the output must be finalized anew
  job.clear_quality();
  std::vector<AssignmentRecord> created;
  std::vector<std::string> names;
  for (int rank = 0; rank < size; ++rank) {
    const std::string& worker_id = decision.workers[rank];
    names.push_back(workers_.at(worker_id).record.name());
    AssignmentRecord a =
        NewAssignment(job, mq::v1::ASSIGNMENT_KIND_QUANTIZE, worker_id, rank, size, start);
    a.set_rendezvous(rendezvous);
    a.set_rendezvous_secret(*secret);
    batch.Put(Table::kAssignments, a.assignment_id(), a.SerializeAsString());
    created.push_back(std::move(a));
  }
  batch.Put(Table::kAttempts, AttemptKey(job_id, job.attempt()), attempt.SerializeAsString());
  // Reports of older attempts for steps that never committed are void.
  std::vector<int> stale;
  auto records = layers_.find(job_id);
  if (records != layers_.end()) {
    for (const auto& [step, rec] : records->second) {
      if (!rec.committed()) {
        stale.push_back(step);
        batch.Delete(Table::kLayers, LayerKey(job_id, step));
      }
    }
  }
  mq::v1::JobProgress* p = job.mutable_progress();
  p->set_gang_size(size);
  p->set_layers_committed(start);
  p->set_seconds_per_layer(0);
  p->set_eta_seconds(0);
  p->set_stage("");
  p->set_stage_fraction(0);
  std::string shrink;
  if (decision.shrunk) {
    shrink = absl::StrCat(" (smaller than spec.gang_size ", request.gang_size, ": only ",
                          decision.capable, " capable worker", decision.capable == 1 ? "" : "s",
                          " alive after waiting ", request.waited_ms / 1000, " s)");
  }
  AddEvent(job, batch, "assigned",
           absl::StrCat("attempt ", job.attempt(), ": steps ", start, "..", total - 1,
                        " on a gang of ", size, " (", absl::StrJoin(names, ", "), "); ",
                        Plural(start, "step"), " already committed", shrink),
           decision.workers.front());
  SetJobState(
      job, batch, mq::v1::JOB_STATE_RUNNING,
      absl::StrCat("quantizing steps ", start, "..", total - 1, " on a gang of ", size, shrink));
  PutJob(batch, job);
  if (!Commit(batch).ok()) return;
  for (const AssignmentRecord& a : created) HandOut(a);
  if (records != layers_.end()) {
    for (int step : stale) records->second.erase(step);
  }
  jobs_[job_id] = job;
  gang_wait_since_.erase(job_id);
  ++changes_;
  if (metrics_) {
    metrics_->job_attempts->Increment();
    if (decision.shrunk) metrics_->gangs_shrunk->Increment();
  }
}

void Coordinator::ScheduleFinalize(const std::string& job_id) {
  if (HasLiveAssignment(job_id)) return;
  JobRecord job = jobs_.at(job_id);
  const std::string capability = QuantizeCapability(job);
  const std::vector<WorkerView> views = WorkerViews();
  // Prefer the last quantize attempt's rank 0 (its host has the freshest view of the output).
  std::string preferred;
  int preferred_attempt = -1;
  for (const auto& [id, a] : assignments_) {
    if (a.job_id() == job_id && a.kind() == mq::v1::ASSIGNMENT_KIND_QUANTIZE && a.rank() == 0 &&
        a.attempt() > preferred_attempt) {
      preferred = a.worker_id();
      preferred_attempt = a.attempt();
    }
  }
  std::string worker_id;
  for (const WorkerView& v : views) {
    if (v.worker_id == preferred && v.alive && v.idle &&
        std::find(v.capabilities.begin(), v.capabilities.end(), capability) !=
            v.capabilities.end()) {
      worker_id = preferred;
    }
  }
  if (worker_id.empty()) {
    auto pick = PickGang(views, capability, 1);
    if (!pick) return;
    worker_id = pick->front();
  }
  const int total = job.plan().layers_size();
  job.clear_publishing();  // only this new attempt may ask to publish
  const AttemptRecord attempt = NewAttempt(job, "finalize", {worker_id}, total);
  const AssignmentRecord a =
      NewAssignment(job, mq::v1::ASSIGNMENT_KIND_FINALIZE, worker_id, 0, 1, total);
  WriteBatch batch;
  batch.Put(Table::kAssignments, a.assignment_id(), a.SerializeAsString());
  batch.Put(Table::kAttempts, AttemptKey(job_id, job.attempt()), attempt.SerializeAsString());
  const std::string& name = workers_.at(worker_id).record.name();
  AddEvent(job, batch, "assigned",
           absl::StrCat("attempt ", job.attempt(), ": finalizing on worker ", worker_id, " (", name,
                        ")"),
           worker_id);
  job.set_message(absl::StrCat("finalizing the output on worker ", name));
  job.set_updated_at_ms(Wall());
  PutJob(batch, job);
  if (!Commit(batch).ok()) return;
  HandOut(a);
  jobs_[job_id] = job;
  ++changes_;
  if (metrics_) metrics_->job_attempts->Increment();
}

void Coordinator::SetWaitingMessage(JobRecord job, const std::string& message) {
  if (job.message() == message) return;
  WriteBatch batch;
  job.set_message(message);
  job.set_updated_at_ms(Wall());
  PutJob(batch, job);
  if (!Commit(batch).ok()) return;  // only a message: the next tick tries again
  jobs_[job.job_id()] = job;
  ++changes_;
}

void Coordinator::ScheduleEvaluate(const std::string& job_id) {
  if (HasLiveAssignment(job_id)) return;
  JobRecord job = jobs_.at(job_id);
  auto pick = PickGang(WorkerViews(), kEvaluateCapability, 1);
  if (!pick) {
    SetWaitingMessage(
        job, absl::StrCat(IsEvalJob(job) ? "waiting for a worker to evaluate "
                                         : "the output is finalized; waiting for a worker to "
                                           "evaluate ",
                          "it (capability \"", kEvaluateCapability, "\")"));
    return;
  }
  const std::string& worker_id = pick->front();
  const int total = job.plan().layers_size();
  const AttemptRecord attempt = NewAttempt(job, "evaluate", {worker_id}, total);
  const AssignmentRecord a =
      NewAssignment(job, mq::v1::ASSIGNMENT_KIND_EVALUATE, worker_id, 0, 1, total);
  WriteBatch batch;
  batch.Put(Table::kAssignments, a.assignment_id(), a.SerializeAsString());
  batch.Put(Table::kAttempts, AttemptKey(job_id, job.attempt()), attempt.SerializeAsString());
  const std::string& name = workers_.at(worker_id).record.name();
  AddEvent(job, batch, "assigned",
           absl::StrCat("attempt ", job.attempt(), ": evaluating on worker ", worker_id, " (",
                        name, ")"),
           worker_id);
  const std::string message = absl::StrCat(
      "measuring ", IsEvalJob(job) ? job.spec().eval().candidate_uri() : "the output",
      " against ", job.spec().model_uri(), " on worker ", name);
  if (job.state() != mq::v1::JOB_STATE_EVALUATING) {
    SetJobState(job, batch, mq::v1::JOB_STATE_EVALUATING, message, worker_id);
  } else {
    job.set_message(message);
    job.set_updated_at_ms(Wall());
  }
  PutJob(batch, job);
  if (!Commit(batch).ok()) return;
  HandOut(a);
  jobs_[job_id] = job;
  ++changes_;
  if (metrics_) metrics_->job_attempts->Increment();
}

void Coordinator::Tick() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!store_error_.ok()) {
    RetryStore();
    return;
  }
  // A full device is noticed before a write fails on it.
  if (Mono() >= store_check_at_ms_) {
    store_check_at_ms_ = Mono() + 1000;
    if (absl::Status room = store_->Writable(); !room.ok()) {
      StopServing(room);
      return;
    }
  }
  const uint64_t before = changes_;
  const int64_t now = Mono();
  for (auto& [id, w] : workers_) {
    if (!w.dead && now - w.last_heartbeat_ms > options_.lease_ms) {
      ExpireWorker(id, absl::StrCat("no heartbeat for ", now - w.last_heartbeat_ms, " ms (lease ",
                                    options_.lease_ms, " ms)"));
      ++changes_;
    }
  }
  // Live assignments whose worker the registry does not know (lost registration).
  for (auto& [id, a] : assignments_) {
    if (a.ended() || workers_.count(a.worker_id())) continue;
    WorkerEntry& ghost = workers_[a.worker_id()];
    ghost.record.set_worker_id(a.worker_id());
    ghost.assignment_id = id;
    ExpireWorker(a.worker_id(), "unknown worker");
    workers_.erase(a.worker_id());
    ++changes_;
  }
  ScheduleQueued();
  ForgetEnded();
  // Every tick: a worker heard from for the first time since recovery changes no state.
  UpdateGauges();
  if (changes_ != before) cv_.notify_all();
}

}  // namespace mq::server
