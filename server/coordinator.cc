#include "server/coordinator.h"

#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/names.h"
#include "common/util.h"
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

std::string KindName(mq::v1::AssignmentKind k) {
  return k == mq::v1::ASSIGNMENT_KIND_QUANTIZE ? "quantize" : "plan";
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
  auto idem = store_->GetAll(Table::kIdempotency);
  if (!idem.ok()) return idem.status();
  for (const auto& [key, value] : *idem) idempotency_[key] = value;

  const int64_t now = Mono();
  auto workers = store_->GetAll(Table::kWorkers);
  if (!workers.ok()) return workers.status();
  for (const auto& [key, value] : *workers) {
    auto rec = Parse<mq::v1::WorkerRecord>("workers", key, value);
    if (!rec.ok()) return rec.status();
    WorkerEntry& w = workers_[key];
    w.record = *std::move(rec);
    w.last_heartbeat_ms = now;  // a fresh lease: the worker may still be running its work
  }
  auto assignments = store_->GetAll(Table::kAssignments);
  if (!assignments.ok()) return assignments.status();
  for (const auto& [key, value] : *assignments) {
    auto a = Parse<AssignmentRecord>("assignments", key, value);
    if (!a.ok()) return a.status();
    if (!a->ended()) {
      auto it = workers_.find(a->worker_id());
      if (it != workers_.end()) {
        it->second.assignment_id = a->assignment_id();
        it->second.delivered = false;
      }
    }
    assignments_[key] = *std::move(a);
  }
  LogLine("coordinator", "INFO",
          absl::StrCat("recovered epoch ", epoch_, ": ", jobs_.size(), " jobs, ", workers_.size(),
                       " workers, ", assignments_.size(), " assignments"));
  return absl::OkStatus();
}

absl::Status Coordinator::Commit(const WriteBatch& batch) {
  const auto start = std::chrono::steady_clock::now();
  absl::Status s = store_->Write(batch);
  if (metrics_) {
    metrics_->store_write_seconds->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  if (!s.ok()) LogLine("coordinator", "ERROR", s.ToString());
  return s;
}

void Coordinator::PutJob(WriteBatch& batch, const JobRecord& job) {
  batch.Put(Table::kJobs, job.job_id(), job.SerializeAsString());
}

void Coordinator::AddEvent(JobRecord& job, WriteBatch& batch, const std::string& kind,
                           const std::string& message, const std::string& worker_id) {
  mq::v1::JobEvent e;
  e.set_job_id(job.job_id());
  e.set_seq(job.event_count());
  e.set_time_ms(Wall());
  e.set_kind(kind);
  e.set_message(message);
  e.set_attempt(job.attempt());
  e.set_state(job.state());
  e.set_worker_id(worker_id);
  batch.Put(Table::kEvents, EventKey(job.job_id(), e.seq()), e.SerializeAsString());
  job.set_event_count(job.event_count() + 1);
}

void Coordinator::SetJobState(JobRecord& job, WriteBatch& batch, JobState state,
                              const std::string& message, const std::string& worker_id) {
  job.set_state(state);
  job.set_message(message);
  job.set_updated_at_ms(Wall());
  if (IsTerminal(state)) job.set_finished_at_ms(Wall());
  AddEvent(job, batch, "state", absl::StrCat(JobStateName(state), ": ", message), worker_id);
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
  std::array<int, 8> counts{};
  for (const auto& [id, job] : jobs_) counts[job.state()]++;
  for (int s = 1; s < 8; ++s) metrics_->jobs[s]->Set(counts[s]);
  int idle = 0, busy = 0;
  for (const auto& [id, w] : workers_) {
    if (w.dead) continue;
    (w.assignment_id.empty() ? idle : busy)++;
  }
  metrics_->workers_idle->Set(idle);
  metrics_->workers_busy->Set(busy);
}

// ---------------------------------------------------------------------------------------------
// JobService

absl::StatusOr<mq::v1::SubmitJobResponse> Coordinator::SubmitJob(
    const mq::v1::SubmitJobRequest& request) {
  if (!request.has_spec()) {
    return absl::InvalidArgumentError("spec: is required (model_uri and output_uri at least)");
  }
  if (absl::Status s = ValidateIdempotencyKey(request.idempotency_key()); !s.ok()) return s;
  auto spec = NormalizeJobSpec(request.spec());
  if (!spec.ok()) return spec.status();

  std::lock_guard<std::mutex> lock(mu_);
  mq::v1::SubmitJobResponse response;
  const std::string& key = request.idempotency_key();
  if (!key.empty()) {
    auto it = idempotency_.find(key);
    if (it != idempotency_.end()) {
      const JobRecord& existing = jobs_.at(it->second);
      if (!google::protobuf::util::MessageDifferencer::Equals(existing.spec(), *spec)) {
        return absl::AlreadyExistsError(
            absl::StrCat("idempotency_key = \"", key, "\": already used for job ", it->second,
                         " with a different spec; use a new key or the same spec"));
      }
      *response.mutable_job() = existing;
      response.set_created(false);
      return response;
    }
  }

  JobRecord job;
  job.set_schema_version(kSchemaVersion);
  job.set_job_id(NewId("j-"));
  *job.mutable_spec() = *spec;
  job.set_idempotency_key(key);
  job.set_created_at_ms(Wall());
  job.set_updated_at_ms(Wall());
  job.set_state(mq::v1::JOB_STATE_QUEUED);
  job.set_message("waiting for a worker");
  WriteBatch batch;
  AddEvent(job, batch, "submitted",
           absl::StrCat("submitted: ", MethodName(spec->method()), " ", spec->bits(), "-bit g",
                        spec->group_size(), " of ", spec->model_uri(), " to ", spec->output_uri(),
                        ", gang size ", spec->gang_size()));
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
  auto it = jobs_.find(request.job_id());
  if (it == jobs_.end()) {
    return absl::NotFoundError(absl::StrCat("job ", request.job_id(), " does not exist"));
  }
  mq::v1::GetJobResponse response;
  *response.mutable_job() = it->second;
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
    const mq::v1::CancelJobRequest& request) {
  if (absl::Status s = ValidateJobId("job_id", request.job_id()); !s.ok()) return s;
  if (request.reason().size() > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("reason: ", request.reason().size(), " characters; at most 1024 allowed"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(request.job_id());
  if (it == jobs_.end()) {
    return absl::NotFoundError(absl::StrCat("job ", request.job_id(), " does not exist"));
  }
  JobRecord job = it->second;
  if (IsTerminal(job.state())) {
    return absl::FailedPreconditionError(absl::StrCat("job ", job.job_id(), " already ended (",
                                                      JobStateName(job.state()),
                                                      "); nothing to cancel"));
  }
  WriteBatch batch;
  std::string reason = request.reason().empty() ? "cancelled by user"
                                                : "cancelled by user: " + request.reason();
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
  SetJobState(job, batch, mq::v1::JOB_STATE_CANCELLED, reason);
  PutJob(batch, job);
  if (absl::Status s = Commit(batch); !s.ok()) return s;
  for (const AssignmentRecord& a : ended) {
    assignments_[a.assignment_id()] = a;
    auto w = workers_.find(a.worker_id());
    if (w != workers_.end() && w->second.assignment_id == a.assignment_id()) {
      w->second.assignment_id.clear();
    }
  }
  it->second = job;
  if (metrics_) metrics_->jobs_cancelled->Increment();
  Changed();
  mq::v1::CancelJobResponse response;
  *response.mutable_job() = job;
  return response;
}

absl::StatusOr<mq::v1::ResumeJobResponse> Coordinator::ResumeJob(
    const mq::v1::ResumeJobRequest& request) {
  if (absl::Status s = ValidateJobId("job_id", request.job_id()); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(request.job_id());
  if (it == jobs_.end()) {
    return absl::NotFoundError(absl::StrCat("job ", request.job_id(), " does not exist"));
  }
  JobRecord job = it->second;
  if (job.state() != mq::v1::JOB_STATE_FAILED && job.state() != mq::v1::JOB_STATE_CANCELLED) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job.job_id(), " is ", JobStateName(job.state()),
                     "; only FAILED or CANCELLED jobs can be resumed"));
  }
  WriteBatch batch;
  job.set_attempt_base(job.attempt());
  job.clear_missing_capability();
  job.set_finished_at_ms(0);
  SetJobState(job, batch, mq::v1::JOB_STATE_QUEUED, "resumed; waiting for a worker");
  PutJob(batch, job);
  if (absl::Status s = Commit(batch); !s.ok()) return s;
  it->second = job;
  Changed();
  mq::v1::ResumeJobResponse response;
  *response.mutable_job() = job;
  return response;
}

absl::StatusOr<mq::v1::WatchJobResponse> Coordinator::JobSnapshot(const std::string& job_id,
                                                                 int64_t from_seq) {
  if (absl::Status s = ValidateJobId("job_id", job_id); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("job ", job_id, " does not exist"));
  mq::v1::WatchJobResponse response;
  *response.mutable_job() = it->second;
  if (from_seq < it->second.event_count()) {
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
    info->set_state(w.dead ? mq::v1::WORKER_STATE_DEAD
                           : (w.assignment_id.empty() ? mq::v1::WORKER_STATE_IDLE
                                                      : mq::v1::WORKER_STATE_BUSY));
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
  spec->mutable_calibration()->set_num_samples(request.num_samples() ? request.num_samples()
                                                                     : 512);
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
    const mq::v1::RegisterWorkerRequest& request) {
  if (absl::Status s = ValidateWorkerName(request.name()); !s.ok()) return s;
  const std::string& device = request.capabilities().device();
  if (device != "cpu" && device.rfind("cuda:", 0) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("capabilities.device = \"", device,
                                                   "\": must be cpu or cuda:N"));
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
  mq::v1::WorkerRecord record;
  record.set_worker_id(id);
  record.set_name(request.name());
  *record.mutable_capabilities() = request.capabilities();
  auto existing = workers_.find(id);
  record.set_registered_at_ms(existing != workers_.end()
                                  ? existing->second.record.registered_at_ms()
                                  : Wall());
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
          absl::StrCat("worker ", id, " (", request.name(), ", ", device, ") registered"));
  Changed();
  mq::v1::RegisterWorkerResponse response;
  response.set_worker_id(id);
  response.set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  response.set_lease_ms(options_.lease_ms);
  response.set_coordinator_epoch(epoch_);
  return response;
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
    // Back from the dead (e.g. it was paused): its old work went elsewhere.
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
        *out->mutable_spec() = jobs_.at(a.job_id()).spec();
      }
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
    return absl::AbortedError(absl::StrCat("assignment ", assignment_id,
                                           " is not held by worker ", worker_id,
                                           " with lease epoch ", lease_epoch));
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
  if (inspections_.count(request.assignment_id())) return response;
  AssignmentRecord* live = nullptr;
  absl::Status s = CheckAssignmentOwner(request.worker_id(), request.assignment_id(),
                                        request.lease_epoch(), &live);
  if (!s.ok()) return s;
  if (!live) return response;
  JobRecord& job = jobs_.at(live->job_id());
  job.mutable_progress()->set_stage(request.stage());
  job.mutable_progress()->set_stage_fraction(request.fraction());
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
  auto attempt = LoadAttempt(a.job_id(), a.attempt());
  if (!attempt.ok()) return attempt.status();
  attempt->set_state(attempt_state);
  attempt->set_ended_at_ms(Wall());
  attempt->set_message(reason);
  batch.Put(Table::kAttempts, AttemptKey(a.job_id(), a.attempt()), attempt->SerializeAsString());
  return absl::OkStatus();
}

void Coordinator::RetryOrFail(JobRecord& job, WriteBatch& batch, const std::string& reason) {
  const int used = job.attempt() - job.attempt_base();
  if (used >= job.spec().max_attempts()) {
    SetJobState(job, batch, mq::v1::JOB_STATE_FAILED,
                absl::StrCat("gave up after ", used, " attempts (spec.max_attempts = ",
                             job.spec().max_attempts(), "); last: ", reason,
                             ". Fix the cause, then `mq-client resume ", job.job_id(), "`"));
    if (metrics_) metrics_->jobs_failed->Increment();
  } else {
    SetJobState(job, batch, mq::v1::JOB_STATE_QUEUED,
                absl::StrCat("attempt ", job.attempt(), " ended (", reason,
                             "); waiting for a worker"));
  }
  PutJob(batch, job);
}

void Coordinator::ApplyPlanResult(JobRecord& job, WriteBatch& batch,
                                  const mq::v1::InspectReport& report) {
  *job.mutable_plan() = report;
  job.mutable_progress()->set_layers_total(report.layers_size());
  job.mutable_progress()->set_stage("");
  job.mutable_progress()->set_stage_fraction(0);
  if (report.problems_size() > 0) {
    std::vector<std::string> first;
    for (int i = 0; i < report.problems_size() && i < 3; ++i) {
      first.push_back(absl::StrCat(report.problems(i).where(), ": ", report.problems(i).message()));
    }
    SetJobState(job, batch, mq::v1::JOB_STATE_FAILED,
                absl::StrCat("the checkpoint check found ", report.problems_size(), " problem",
                             report.problems_size() == 1 ? "" : "s", ": ",
                             absl::StrJoin(first, "; "),
                             report.problems_size() > 3 ? "; ..." : "",
                             " (`mq-client status ", job.job_id(), "` lists all)"));
    if (metrics_) metrics_->jobs_failed->Increment();
    return;
  }
  const std::string capability = "quantize:" + MethodName(job.spec().method());
  job.set_missing_capability(capability);
  SetJobState(
      job, batch, mq::v1::JOB_STATE_FAILED,
      absl::StrCat("planning succeeded (", report.layers_size(), " layers, ",
                   HumanBytes(report.estimate().gpu_bytes_per_rank()), " GPU and ",
                   HumanBytes(report.estimate().host_bytes_per_rank()), " host memory per rank, ",
                   HumanBytes(report.estimate().output_bytes()), " output), but capability \"", capability,
                   "\" is missing: this mq version (", Version(),
                   ") implements planning only, not the quantization pipeline"));
  if (metrics_) metrics_->jobs_failed->Increment();
}

absl::StatusOr<mq::v1::CompleteAssignmentResponse> Coordinator::CompleteAssignment(
    const mq::v1::CompleteAssignmentRequest& request) {
  if (request.result_case() == mq::v1::CompleteAssignmentRequest::RESULT_NOT_SET) {
    return absl::InvalidArgumentError("result: is required (plan or error)");
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
      i.status = absl::InternalError(
          absl::StrCat("worker ", request.worker_id(), " failed the inspection: ",
                       request.error()));
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
  JobRecord job = jobs_.at(a.job_id());
  WriteBatch batch;
  const bool ok = request.has_plan();
  const std::string reason = ok ? "completed" : "worker error: " + request.error();
  if (absl::Status st = EndAssignment(
          a, batch, ok ? mq::v1::ATTEMPT_STATE_SUCCEEDED : mq::v1::ATTEMPT_STATE_FAILED, reason,
          true);
      !st.ok()) {
    return st;
  }
  if (ok) {
    AddEvent(job, batch, "planned",
             absl::StrCat("plan from worker ", request.worker_id(), ": ",
                          request.plan().layers_size(), " layers, ",
                          request.plan().problems_size(), " problems"),
             request.worker_id());
    ApplyPlanResult(job, batch, request.plan());
    PutJob(batch, job);
  } else {
    AddEvent(job, batch, "attempt_failed", reason, request.worker_id());
    RetryOrFail(job, batch, reason);
  }
  if (absl::Status st = Commit(batch); !st.ok()) return st;
  assignments_[a.assignment_id()] = a;
  jobs_[job.job_id()] = job;
  if (w != workers_.end() && w->second.assignment_id == a.assignment_id()) {
    w->second.assignment_id.clear();
  }
  if (metrics_) metrics_->CountAssignment(KindName(a.kind()), ok ? "ok" : "failed");
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
    v.idle = w.assignment_id.empty();
    v.capabilities.assign(w.record.capabilities().capabilities().begin(),
                          w.record.capabilities().capabilities().end());
    v.registered_at_ms = w.record.registered_at_ms();
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
  AssignmentRecord a = it->second;
  JobRecord job = jobs_.at(a.job_id());
  WriteBatch batch;
  const std::string why = absl::StrCat("worker ", worker_id, " lost: ", reason);
  if (!EndAssignment(a, batch, mq::v1::ATTEMPT_STATE_ABORTED, why, false).ok()) {
    w.assignment_id = assignment_id;  // keep it; retried on the next tick
    return;
  }
  AddEvent(job, batch, "lease_expired", why, worker_id);
  RetryOrFail(job, batch, why);
  if (!Commit(batch).ok()) {
    w.assignment_id = assignment_id;
    return;
  }
  assignments_[a.assignment_id()] = a;
  jobs_[job.job_id()] = job;
  if (metrics_) metrics_->CountAssignment(KindName(a.kind()), "reassigned");
}

void Coordinator::ScheduleQueued() {
  std::vector<JobRecord*> queued;
  for (auto& [id, job] : jobs_) {
    if (job.state() == mq::v1::JOB_STATE_QUEUED) queued.push_back(&job);
  }
  std::stable_sort(queued.begin(), queued.end(), [](const JobRecord* a, const JobRecord* b) {
    return a->spec().priority() > b->spec().priority();
  });
  for (JobRecord* queued_job : queued) {
    auto gang = PickGang(WorkerViews(), "plan", 1);
    if (!gang) return;
    const std::string& worker_id = gang->front();
    JobRecord job = *queued_job;
    job.set_attempt(job.attempt() + 1);
    AssignmentRecord a;
    a.set_assignment_id(NewId("a-"));
    a.set_job_id(job.job_id());
    a.set_attempt(job.attempt());
    a.set_kind(mq::v1::ASSIGNMENT_KIND_PLAN);
    a.set_worker_id(worker_id);
    a.set_lease_epoch(epoch_);
    a.set_rank(0);
    a.set_world_size(1);
    a.set_created_at_ms(Wall());
    AttemptRecord attempt;
    attempt.set_job_id(job.job_id());
    attempt.set_attempt(job.attempt());
    attempt.set_state(mq::v1::ATTEMPT_STATE_RUNNING);
    attempt.set_phase("plan");
    attempt.add_worker_ids(worker_id);
    attempt.set_started_at_ms(Wall());
    WriteBatch batch;
    batch.Put(Table::kAssignments, a.assignment_id(), a.SerializeAsString());
    batch.Put(Table::kAttempts, AttemptKey(job.job_id(), job.attempt()),
              attempt.SerializeAsString());
    AddEvent(job, batch, "assigned",
             absl::StrCat("attempt ", job.attempt(), ": planning on worker ", worker_id, " (",
                          workers_.at(worker_id).record.name(), ")"),
             worker_id);
    SetJobState(job, batch, mq::v1::JOB_STATE_PLANNING,
                absl::StrCat("inspecting the checkpoint on worker ",
                             workers_.at(worker_id).record.name()),
                worker_id);
    PutJob(batch, job);
    if (!Commit(batch).ok()) return;
    assignments_[a.assignment_id()] = a;
    *queued_job = job;
    WorkerEntry& w = workers_.at(worker_id);
    w.assignment_id = a.assignment_id();
    w.delivered = false;
    if (metrics_) metrics_->job_attempts->Increment();
  }
}

void Coordinator::Tick() {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t before = changes_;
  const int64_t now = Mono();
  for (auto& [id, w] : workers_) {
    if (!w.dead && now - w.last_heartbeat_ms > options_.lease_ms) {
      ExpireWorker(id, absl::StrCat("no heartbeat for ", now - w.last_heartbeat_ms,
                                    " ms (lease ", options_.lease_ms, " ms)"));
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
  const size_t attempts_before = assignments_.size();
  ScheduleQueued();
  if (assignments_.size() != attempts_before) ++changes_;
  if (changes_ != before) {
    UpdateGauges();
    cv_.notify_all();
  }
}

}  // namespace mq::server
