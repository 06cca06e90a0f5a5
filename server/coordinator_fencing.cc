// The coordinator's ownership, fencing and retention rules (see coordinator.h): one output
// directory per live job, unique names among live workers, the publish fence of a FINALIZE
// assignment, and how much history a long-lived coordinator keeps in memory. Every function
// here requires mu_ held.

#include <algorithm>
#include <iterator>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/names.h"
#include "common/util.h"
#include "server/coordinator.h"
#include "server/validation.h"

namespace mq::server {

using mq::v1::AssignmentRecord;
using mq::v1::JobRecord;

absl::Status Coordinator::CheckOutputFree(const mq::v1::JobSpec& spec,
                                          const std::string& self_id) const {
  const std::string path = NormalLocationPath(spec.output_uri());
  if (spec.output_uri().empty()) return absl::OkStatus();  // an evaluation job writes nothing
  for (const auto& [id, job] : jobs_) {
    if (id == self_id || IsTerminal(job.state()) || job.spec().output_uri().empty()) continue;
    const std::string other = NormalLocationPath(job.spec().output_uri());
    const PathOverlap overlap = ComparePaths(path, other);
    if (overlap == PathOverlap::kNone) continue;
    const char* relation = overlap == PathOverlap::kSame     ? "is the output"
                           : overlap == PathOverlap::kInside ? "lies inside the output"
                                                             : "contains the output";
    return absl::FailedPreconditionError(absl::StrCat(
        "spec.output_uri = ", path, " ", relation, " ", other, " of job ", id, " (",
        JobStateName(job.state()), "): choose another directory or wait for that job to end"));
  }
  return absl::OkStatus();
}

absl::Status Coordinator::CheckNameFree(const std::string& name,
                                        const std::string& worker_id) const {
  for (const auto& [id, w] : workers_) {
    if (id == worker_id || w.dead || w.record.name() != name) continue;
    const std::string& host = w.record.capabilities().hostname();
    return absl::AlreadyExistsError(absl::StrCat(
        "worker name \"", name, "\" is held by live worker ", id, ", registered from host ",
        host.empty() ? "(unknown)" : host,
        ": choose another --name, or wait until that worker is declared dead (silent for ",
        options_.lease_ms, " ms)"));
  }
  return absl::OkStatus();
}

absl::Status Coordinator::Publish(const mq::v1::ReportProgressRequest& request,
                                  AssignmentRecord* live) {
  const AssignmentRecord& a = assignments_.at(request.assignment_id());
  if (a.kind() != mq::v1::ASSIGNMENT_KIND_FINALIZE) {
    return absl::AbortedError(absl::StrCat("assignment ", a.assignment_id(),
                                           " is not a finalize assignment; only a finalize "
                                           "assignment publishes a manifest"));
  }
  const JobRecord& current = jobs_.at(a.job_id());  // an assignment's job is in memory
  if (!live) {
    // Its result was accepted. A repeated request after a successful finalize gets the same
    // answer; after a failed one the attempt is over.
    if (current.state() == mq::v1::JOB_STATE_SUCCEEDED && current.attempt() == a.attempt()) {
      return absl::OkStatus();
    }
    return absl::AbortedError(absl::StrCat("assignment ", a.assignment_id(), " already ended (",
                                           a.end_reason(), "); it may not publish"));
  }
  if (current.state() != mq::v1::JOB_STATE_FINALIZING || current.attempt() != a.attempt()) {
    return absl::AbortedError(absl::StrCat("job ", a.job_id(), " is ",
                                           JobStateName(current.state()), " at attempt ",
                                           current.attempt(), "; assignment ", a.assignment_id(),
                                           " (attempt ", a.attempt(), ") may not publish"));
  }
  if (current.publishing()) return absl::OkStatus();  // repeated (lost answer)
  JobRecord job = current;
  job.set_publishing(true);
  job.set_updated_at_ms(Wall());
  WriteBatch batch;
  AddEvent(job, batch, "publishing",
           absl::StrCat("attempt ", a.attempt(),
                        ": every output file is written; publishing the manifest (the job can "
                        "no longer be cancelled)"),
           request.worker_id());
  PutJob(batch, job);
  if (absl::Status s = Commit(batch); !s.ok()) return s;
  jobs_[job.job_id()] = std::move(job);
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> Coordinator::FindJob(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it != jobs_.end()) return it->second;
  auto value = store_->Get(Table::kJobs, job_id);
  if (!value.ok()) return value.status();
  if (!value->has_value()) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " does not exist"));
  }
  JobRecord job;
  if (!job.ParseFromString(**value)) {
    return absl::DataLossError(
        absl::StrCat("state store: record jobs/", job_id, " does not parse"));
  }
  return job;
}

void Coordinator::ForgetEnded() {
  // 1. Ended jobs beyond the retention bounds leave memory (the store keeps their records).
  std::set<std::string> busy;  // jobs with a live assignment are never evicted
  for (const auto& [id, a] : assignments_) {
    if (!a.ended()) busy.insert(a.job_id());
  }
  std::vector<std::pair<int64_t, std::string>> ended;  // (finished_at_ms, job id)
  for (const auto& [id, job] : jobs_) {
    if (IsTerminal(job.state()) && !busy.count(id)) ended.emplace_back(job.finished_at_ms(), id);
  }
  std::set<std::string> evict;
  if (options_.retain_ended_ms > 0) {
    const int64_t cutoff = Wall() - options_.retain_ended_ms;
    for (const auto& [finished, id] : ended) {
      if (finished < cutoff) evict.insert(id);
    }
  } else if (static_cast<int64_t>(ended.size()) > options_.retain_ended_jobs) {
    std::sort(ended.begin(), ended.end());  // oldest first (ids are time-ordered on ties)
    const size_t n = ended.size() - static_cast<size_t>(options_.retain_ended_jobs);
    for (size_t i = 0; i < n; ++i) evict.insert(ended[i].second);
  }
  for (const std::string& id : evict) {
    evicted_jobs_[jobs_[id].state()]++;  // mq_jobs still counts it (the store has it)
    jobs_.erase(id);
    gang_wait_since_.erase(id);
  }
  if (!evict.empty()) {
    for (auto it = idempotency_.begin(); it != idempotency_.end();) {
      it = evict.count(it->second) ? idempotency_.erase(it) : std::next(it);
    }
    LogLine("coordinator", "INFO",
            absl::StrCat("retention: ", evict.size(), " ended job(s) left memory (kept in the ",
                         "store); ", jobs_.size(), " jobs in memory"));
    ++changes_;
  }
  for (auto it = layers_.begin(); it != layers_.end();) {
    it = jobs_.count(it->first) ? std::next(it) : layers_.erase(it);
  }

  // 2. Ended assignments no report needs any more: those of evicted jobs at once; those of
  // ended jobs or of earlier attempts after a grace period (a repeated report within it is
  // still answered as before). A report for a forgotten assignment is NOT_FOUND.
  const int64_t now = Mono();
  std::vector<std::string> forget;
  for (const auto& [id, a] : assignments_) {
    auto job = jobs_.find(a.job_id());
    if (job == jobs_.end()) {
      forget.push_back(id);
      continue;
    }
    if (!a.ended()) continue;
    if (!IsTerminal(job->second.state()) && a.attempt() >= job->second.attempt()) continue;
    const int64_t seen = ended_seen_ms_.emplace(id, now).first->second;
    if (now - seen >= options_.ended_assignment_grace_ms) forget.push_back(id);
  }
  if (forget.empty()) return;
  WriteBatch batch;
  for (const std::string& id : forget) batch.Delete(Table::kAssignments, id);
  if (!Commit(batch).ok()) return;  // tried again on the next tick
  for (const std::string& id : forget) {
    for (auto& [worker_id, w] : workers_) {
      if (w.assignment_id == id) w.assignment_id.clear();  // only a job-less (lost) one
    }
    assignments_.erase(id);
    ended_seen_ms_.erase(id);
  }
}

}  // namespace mq::server
