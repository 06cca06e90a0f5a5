// The coordinator's state machine: jobs, attempts, assignments and the worker registry.
//
// Threading: every public method may be called from any thread; one mutex serializes all
// state changes (the single state-machine lock). Durability: a method returns OK only after
// its changes are in the store (a synced batch), so whatever a client or worker was told
// survives a crash. Heartbeats and progress are kept in memory only.
//
// Recovery (Recover): load every table, bump the coordinator epoch, give every known worker a
// fresh lease, and only then may the gRPC layer start serving.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "mq/v1/job_service.pb.h"
#include "mq/v1/worker_service.pb.h"
#include "server/auth/tokens.h"
#include "server/coordinator_metrics.h"
#include "server/scheduling/gang.h"
#include "server/storage/store.h"

namespace mq::server {

struct CoordinatorOptions {
  // A worker silent for longer than this is dead; its work goes to another worker.
  int64_t lease_ms = 10000;
  // How often workers are told to heartbeat.
  int64_t heartbeat_interval_ms = 2000;
  // A planned job waits this long for a full gang (spec.gang_size workers) before it runs on
  // a smaller one; only when fewer than spec.gang_size capable workers are alive at all.
  int64_t gang_wait_ms = 30000;
  // Monotonic clock in milliseconds; tests inject their own.
  std::function<int64_t()> monotonic_ms;
  // Wall clock in milliseconds (record timestamps); tests may inject their own.
  std::function<int64_t()> wall_ms;
  // Ended jobs (SUCCEEDED, FAILED, CANCELLED) kept in memory besides every live one: the
  // newest `retain_ended_jobs` by end time, or, when retain_ended_ms > 0, those that ended
  // within that many milliseconds (wall clock). Older ones stay in the store only: GetJob,
  // WatchJob, CancelJob, ResumeJob and idempotent submits still find them there; ListJobs
  // does not list them.
  int64_t retain_ended_jobs = 1000;
  int64_t retain_ended_ms = 0;
  // An ended assignment is forgotten (memory and store) this long after the sweep first saw it,
  // once its job ended or moved on to a later attempt; a report for it is then NOT_FOUND.
  int64_t ended_assignment_grace_ms = 60000;
  // Where jobs may read and write (mq-coordinator --allow-read / --allow-write): checked at
  // submit, resume and inspection, and sent with every assignment for the worker to check
  // again after resolving symlinks. Not enforced by default.
  mq::v1::PathPolicy path_policy;
};

// Version of the records layout in the store; Recover refuses a newer one.
inline constexpr uint32_t kSchemaVersion = 1;
// Entries of arrays indexed by mq::v1::JobState (0 = unspecified .. EVALUATING).
inline constexpr int kJobStates = 9;
// The worker capability an EVALUATE assignment needs.
inline constexpr char kEvaluateCapability[] = "evaluate";

class Coordinator {
 public:
  // Loads all state from `store` (which must outlive the coordinator).
  static absl::StatusOr<std::unique_ptr<Coordinator>> Recover(Store* store,
                                                              CoordinatorOptions options,
                                                              CoordinatorMetrics* metrics);

  // --- JobService ---
  // `caller` (server/auth) becomes the job's owner and the principal of its first event; an
  // idempotency key belongs to the principal that first used it.
  absl::StatusOr<mq::v1::SubmitJobResponse> SubmitJob(const mq::v1::SubmitJobRequest& request,
                                                      const Caller& caller = Caller::Anonymous());
  absl::StatusOr<mq::v1::GetJobResponse> GetJob(const mq::v1::GetJobRequest& request);
  absl::StatusOr<mq::v1::ListJobsResponse> ListJobs(const mq::v1::ListJobsRequest& request);
  // Only the job's owner or an admin (PERMISSION_DENIED otherwise).
  absl::StatusOr<mq::v1::CancelJobResponse> CancelJob(const mq::v1::CancelJobRequest& request,
                                                      const Caller& caller = Caller::Anonymous());
  absl::StatusOr<mq::v1::ResumeJobResponse> ResumeJob(const mq::v1::ResumeJobRequest& request,
                                                      const Caller& caller = Caller::Anonymous());
  // Runs an inspection on a live worker; waits until `deadline_ms` (monotonic).
  absl::StatusOr<mq::v1::InspectModelResponse> InspectModel(
      const mq::v1::InspectModelRequest& request, int64_t deadline_ms);
  mq::v1::ListWorkersResponse ListWorkers();

  // WatchJob support: the job's snapshot and its events with seq >= `from_seq`.
  absl::StatusOr<mq::v1::WatchJobResponse> JobSnapshot(const std::string& job_id, int64_t from_seq);
  // Blocks until the state changes after `seen` or until `deadline_ms`; returns the counter.
  uint64_t WaitForChange(uint64_t seen, int64_t deadline_ms);
  uint64_t change_counter();

  // --- WorkerService ---
  // Binds the worker id to `caller.principal` and issues a session secret. Re-registering an
  // id needs the same principal, and while the id's worker is alive also its current session
  // (caller.worker_session): a second registration of a live id is refused.
  absl::StatusOr<mq::v1::RegisterWorkerResponse> RegisterWorker(
      const mq::v1::RegisterWorkerRequest& request, const Caller& caller = Caller::Anonymous());
  // OK when `caller` may act as worker `worker_id`: the id is registered, to caller's principal,
  // and caller carries its current session. NOT_FOUND (register again) for an unknown id,
  // PERMISSION_DENIED otherwise. Every WorkerService call but RegisterWorker passes this first.
  absl::Status AuthorizeWorker(const std::string& worker_id, const Caller& caller);
  absl::StatusOr<mq::v1::HeartbeatResponse> Heartbeat(const mq::v1::HeartbeatRequest& request);
  absl::StatusOr<mq::v1::PollAssignmentResponse> PollAssignment(
      const mq::v1::PollAssignmentRequest& request, int64_t deadline_ms);
  absl::StatusOr<mq::v1::ReportProgressResponse> ReportProgress(
      const mq::v1::ReportProgressRequest& request);
  absl::StatusOr<mq::v1::CompleteAssignmentResponse> CompleteAssignment(
      const mq::v1::CompleteAssignmentRequest& request);
  // One rank finished one pipeline step. Idempotent per (assignment, step, rank); the step
  // commits (durably, with the job's progress and an event) once every rank of the gang
  // reported. A committed step is never changed again.
  absl::StatusOr<mq::v1::ReportLayerResponse> ReportLayer(
      const mq::v1::ReportLayerRequest& request);

  // Expires leases and assigns queued work. The server calls it a few times a second.
  // While not serving (below) it does neither and instead retries the store every second.
  void Tick();

  // Serving state. A failed store write (disk full, I/O error) takes the coordinator out of
  // service: every later write is refused without touching the store, CheckServing answers
  // UNAVAILABLE naming the cause, and the gRPC layer refuses changes and reports NOT_SERVING
  // (reads are still answered, from memory). Tick retries the store (Store::Recover: reopen and
  // a synced probe write) every second; once it succeeds the coordinator drops its in-memory
  // state, reloads it from the store as after a restart (a new epoch, fresh leases) and serves
  // again. What was in memory but not written is gone; nothing acknowledged is.
  bool serving();
  // OK while serving, else UNAVAILABLE "state store write failed: CAUSE; ...".
  absl::Status CheckServing();

  // Wakes every waiter (long polls, watches) so shutdown does not wait for their deadlines.
  void WakeAll();

  int64_t epoch() const { return epoch_; }
  const CoordinatorOptions& options() const { return options_; }

 private:
  struct WorkerEntry {
    mq::v1::WorkerRecord record;
    int64_t last_heartbeat_ms = 0;  // monotonic
    bool dead = false;
    bool recovered = false;     // loaded from the store by Load (see recovered_heartbeat_ms_)
    std::string assignment_id;  // live assignment (persisted or an inspection), if any
    bool delivered = false;
    // The coordinator ended an assignment this worker had received (abort, cancel): it may
    // still be running it, so it gets no new work until it polls again.
    bool needs_poll = false;
    // With needs_poll: the job of that assignment. No new assignment of that job is handed out
    // until this worker polls again or is declared dead (two attempts never share a directory).
    std::string ended_job_id;
  };
  struct Inspection {
    mq::v1::Assignment assignment;
    std::string worker_id;
    bool done = false;
    absl::Status status;
    mq::v1::InspectReport report;
  };

  Coordinator(Store* store, CoordinatorOptions options, CoordinatorMetrics* metrics);
  absl::Status Load();
  // Store failure handling (mu_ held): the UNAVAILABLE answered while not serving; one retry
  // of the store and, when it writes again, a reload; forgetting all in-memory state.
  absl::Status NotServingError() const;
  void StopServing(const absl::Status& cause);
  void RetryStore();
  void ResetState();

  // Helpers; all require mu_ held.
  absl::Status Commit(const WriteBatch& batch);
  // The event's principal: `principal` if given, else the worker's (when `worker_id` is set),
  // else Caller::kCoordinator.
  void AddEvent(mq::v1::JobRecord& job, WriteBatch& batch, const std::string& kind,
                const std::string& message, const std::string& worker_id = "",
                const std::string& principal = "");
  void PutJob(WriteBatch& batch, const mq::v1::JobRecord& job);
  void SetJobState(mq::v1::JobRecord& job, WriteBatch& batch, mq::v1::JobState state,
                   const std::string& message, const std::string& worker_id = "",
                   const std::string& principal = "");
  absl::StatusOr<mq::v1::AttemptRecord> LoadAttempt(const std::string& job_id, int attempt);
  // Ends a live assignment in `batch` (and its attempt); the caller decides the job's fate.
  absl::Status EndAssignment(mq::v1::AssignmentRecord& a, WriteBatch& batch,
                             mq::v1::AttemptState attempt_state, const std::string& reason,
                             bool completed);
  // After a failed/aborted attempt: queue the job again or fail it when out of attempts.
  // `infrastructure`: the attempt does not count against spec.max_attempts (up to
  // 10 x max_attempts such attempts). A reported infrastructure failure (not `worker_lost`,
  // which already waited out a lease) also backs off: the job stays QUEUED (or FINALIZING)
  // for InfrastructureRetryDelayMs before it is scheduled again, and the same failure
  // (FailureSignature) kMaxIdenticalInfrastructureFailures times in a row without a step
  // committed fails the job with that failure's message (server/scheduling/retry.h).
  void RetryOrFail(mq::v1::JobRecord& job, WriteBatch& batch, const std::string& reason,
                   bool infrastructure = false, bool worker_lost = false);
  // A failed assignment named damaged output files (request.corrupt_files): for each, one
  // `file_corrupt` event; the earliest committed step whose reports list any of them and every
  // later step are uncommitted in `batch` (their steps go to `uncommitted`: erase them from
  // layers_ once the batch is committed). Returns the reason to fail the job with when a file was
  // found damaged spec.max_attempts times since the job was submitted or last resumed, else "".
  std::string UncommitCorruptFiles(mq::v1::JobRecord& job, WriteBatch& batch,
                                   const mq::v1::CompleteAssignmentRequest& request,
                                   std::vector<int>* uncommitted);
  // Sets the state of a stored attempt in `batch`.
  absl::Status PutAttemptState(const std::string& job_id, int attempt, mq::v1::AttemptState state,
                               const std::string& message, WriteBatch& batch);
  // Ends in `batch` every live assignment of (job, attempt) but `except_id`; the new records
  // go to `ended` (apply them with ApplyEnded once the batch is committed).
  void EndLiveAssignments(const std::string& job_id, int attempt, const std::string& reason,
                          const std::string& except_id, WriteBatch& batch,
                          std::vector<mq::v1::AssignmentRecord>* ended);
  void ApplyEnded(const std::vector<mq::v1::AssignmentRecord>& ended);
  void ExpireWorker(const std::string& worker_id, const std::string& reason);
  void ScheduleQueued();
  // A new attempt of `job` (whose `attempt` it increments) by `worker_ids` (rank order), and
  // one of its assignments; neither is stored.
  mq::v1::AttemptRecord NewAttempt(mq::v1::JobRecord& job, const std::string& phase,
                                   const std::vector<std::string>& worker_ids, int start_step);
  mq::v1::AssignmentRecord NewAssignment(const mq::v1::JobRecord& job, mq::v1::AssignmentKind kind,
                                         const std::string& worker_id, int rank, int world_size,
                                         int start_step);
  // After its batch committed: records `a` and gives it to its worker.
  void HandOut(const mq::v1::AssignmentRecord& a);
  void SchedulePlan(const std::string& job_id);
  void ScheduleGang(const std::string& job_id);
  void ScheduleFinalize(const std::string& job_id);
  // EVALUATING jobs (and queued evaluation jobs) without a live assignment: one worker with the
  // "evaluate" capability measures the output (or the candidate).
  void ScheduleEvaluate(const std::string& job_id);
  // A waiting job's message (why it waits), stored only when it changed.
  void SetWaitingMessage(mq::v1::JobRecord job, const std::string& message);
  bool HasLiveAssignment(const std::string& job_id) const;
  // Number of leading steps (0, 1, ...) that are committed.
  int CommittedPrefix(const std::string& job_id) const;
  int CommittedCount(const std::string& job_id) const;
  std::vector<WorkerView> WorkerViews() const;
  absl::Status CheckAssignmentOwner(const std::string& worker_id, const std::string& assignment_id,
                                    int64_t lease_epoch, mq::v1::AssignmentRecord** live);
  void ApplyPlanResult(mq::v1::JobRecord& job, WriteBatch& batch,
                       const mq::v1::InspectReport& report);
  // ALREADY_EXISTS naming the holder when a live worker other than `worker_id` has `name`.
  absl::Status CheckNameFree(const std::string& name, const std::string& worker_id) const;
  // ReportProgress with publish = true by the holder of `a` (null: it already completed).
  // OK only for the live FINALIZE assignment of the job's current attempt in FINALIZING;
  // durably marks the job publishing (event "publishing"). Otherwise ABORTED.
  absl::Status Publish(const mq::v1::ReportProgressRequest& request,
                       mq::v1::AssignmentRecord* live);
  // An ended assignment of `job_id` may still be running on a live worker (needs_poll).
  bool MayStillRun(const std::string& job_id) const;
  // Marks the worker of the ended assignment `a` (if it received it) as needing a poll.
  void EndedOnWorker(const mq::v1::AssignmentRecord& a);
  // FAILED_PRECONDITION naming the job when `spec`'s output equals, contains or lies inside
  // the output of a job that has not ended (other than `self_id`).
  absl::Status CheckOutputFree(const mq::v1::JobSpec& spec, const std::string& self_id) const;
  // The job from memory or, when it was evicted (retention), from the store.
  absl::StatusOr<mq::v1::JobRecord> FindJob(const std::string& job_id);
  // Retention: evicts ended jobs beyond options' bounds and forgets ended assignments that no
  // report needs any more. Called by Tick and at the end of Load.
  void ForgetEnded();
  void UpdateGauges();
  void Changed();
  int64_t Mono() const { return options_.monotonic_ms(); }
  int64_t Wall() const { return options_.wall_ms(); }

  Store* store_;
  CoordinatorOptions options_;
  CoordinatorMetrics* metrics_;
  int64_t epoch_ = 0;
  // Not OK after a failed store write, until RetryStore succeeds (guarded by mu_).
  absl::Status store_error_;
  int64_t store_retry_at_ms_ = 0;
  int64_t store_check_at_ms_ = 0;  // when Tick next checks that the store can write

  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t changes_ = 0;
  std::map<std::string, mq::v1::JobRecord> jobs_;
  std::map<std::string, mq::v1::AssignmentRecord> assignments_;  // every assignment, ended too
  std::map<std::string, WorkerEntry> workers_;
  std::map<std::string, std::shared_ptr<Inspection>> inspections_;
  std::map<std::string, std::string> idempotency_;  // key -> job id
  // job id -> step -> its LayerRecord (committed, or pending for some attempt).
  std::map<std::string, std::map<int, mq::v1::LayerRecord>> layers_;
  // job id -> monotonic ms since which the planned job waits for a gang (not persisted).
  std::map<std::string, int64_t> gang_wait_since_;
  // Ended assignment id -> monotonic ms when ForgetEnded first saw it (not persisted).
  std::map<std::string, int64_t> ended_seen_ms_;
  // Ended jobs evicted from memory by retention (still in the store), by JobState.
  std::array<int64_t, kJobStates> evicted_jobs_{};
  // The heartbeat time Load gave the workers it recovered; a recovered one still holding it
  // has not been heard from since (mq_workers{state="unknown"}). Monotonic ms.
  int64_t recovered_heartbeat_ms_ = -1;
  // job id -> monotonic ms before which the job is not scheduled (infrastructure backoff; not
  // persisted: a restarted coordinator retries at once).
  std::map<std::string, int64_t> retry_not_before_;
};

}  // namespace mq::server
