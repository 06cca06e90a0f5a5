#include "server/grpc_services.h"

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/util.h"

namespace mq::server {
namespace {

// Milliseconds (monotonic) until the RPC's deadline, capped at `cap_ms`.
int64_t DeadlineMs(grpc::ServerContext* ctx, const Coordinator* c, int64_t cap_ms) {
  const auto left = ctx->deadline() - std::chrono::system_clock::now();
  int64_t left_ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count();
  if (left_ms > cap_ms || left_ms < 0) left_ms = left_ms < 0 ? 0 : cap_ms;
  return c->options().monotonic_ms() + left_ms;
}

// Upper-case gRPC code names, as go-grpc-prometheus labels them ("OK", "INVALID_ARGUMENT").
const char* CodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

void Record(CoordinatorMetrics* metrics, const char* method, const grpc::Status& status,
            std::chrono::steady_clock::time_point start) {
  if (!metrics) return;
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  metrics->grpc_handled
      ->Add({{"grpc_method", method}, {"grpc_code", CodeName(status.error_code())}})
      .Increment();
  metrics->grpc_seconds->Add({{"grpc_method", method}}, FastBuckets()).Observe(secs);
}

// Whether `fn` may change state: such calls are refused while the coordinator is not serving.
enum class Kind { kRead, kChange };

const Authenticator& Insecure() {
  static const Authenticator* none = new Authenticator();
  return *none;
}

// The caller of `ctx`, authorized for `need` (UNAUTHENTICATED / PERMISSION_DENIED otherwise).
absl::StatusOr<Caller> Admit(const Authenticator* auth, const grpc::ServerContextBase& ctx,
                             Need need, const char* method) {
  auto caller = (auth ? *auth : Insecure()).Authenticate(ctx);
  if (!caller.ok()) return caller.status();
  if (absl::Status s = Authorize(*caller, need, method); !s.ok()) return s;
  return caller;
}

// Admits the caller, then runs `fn(caller)` (returning absl::StatusOr<Response>), fills
// `response`, records metrics.
template <typename Response, typename Fn>
grpc::Status Handle(Coordinator* coordinator, CoordinatorMetrics* metrics,
                    const Authenticator* auth, const grpc::ServerContextBase& ctx,
                    const char* method, Need need, Kind kind, Response* response, Fn fn) {
  const auto start = std::chrono::steady_clock::now();
  grpc::Status status;
  auto caller = Admit(auth, ctx, need, method);
  absl::Status serving = !caller.ok()            ? caller.status()
                         : kind == Kind::kChange ? coordinator->CheckServing()
                                                 : absl::OkStatus();
  if (!serving.ok()) {
    status = ToGrpcStatus(serving);
  } else {
    auto result = fn(*caller);
    if (result.ok()) {
      *response = *std::move(result);
    } else {
      status = ToGrpcStatus(result.status());
    }
  }
  Record(metrics, method, status, start);
  return status;
}

// Runs `call` for worker `worker_id` once the caller is shown to hold that id.
template <typename Call>
auto AsWorker(Coordinator* coordinator, const std::string& worker_id, const Caller& caller,
              Call call) -> decltype(call()) {
  if (absl::Status s = coordinator->AuthorizeWorker(worker_id, caller); !s.ok()) return s;
  return call();
}

// Takes one of `limit` slots of `in_use` for the life of the object, or fails to.
class Slot {
 public:
  Slot(std::atomic<int>& in_use, int limit) : in_use_(in_use) {
    taken_ = in_use_.fetch_add(1) < limit;
    if (!taken_) in_use_.fetch_sub(1);
  }
  ~Slot() {
    if (taken_) in_use_.fetch_sub(1);
  }
  bool taken() const { return taken_; }

 private:
  std::atomic<int>& in_use_;
  bool taken_ = false;
};

bool IsTerminalState(mq::v1::JobState state) {
  return state == mq::v1::JOB_STATE_SUCCEEDED || state == mq::v1::JOB_STATE_FAILED ||
         state == mq::v1::JOB_STATE_CANCELLED;
}

// A WatchJob refused at once (too many streams, shutting down).
class RefusedWatch final : public grpc::ServerWriteReactor<mq::v1::WatchJobResponse> {
 public:
  explicit RefusedWatch(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

// The open WatchJob streams and the thread that feeds them (see the header). Each stream's
// state is guarded by mu_; gRPC calls (StartWrite, Finish) are made without it, because their
// reactions may run on the calling thread. A stream is `busy` while the pump builds its next
// message or a write is in flight, and `finished` once Finish was called (only the one who set
// it calls Finish); the reactor deletes itself in OnDone.
class WatchPump {
 public:
  WatchPump(Coordinator* coordinator, CoordinatorMetrics* metrics, int max_streams)
      : coordinator_(coordinator), metrics_(metrics), max_streams_(max_streams) {
    thread_ = std::thread([this] { Loop(); });
  }

  ~WatchPump() {
    Stop();
    // The server is shut down before its services are destroyed, so every stream is done.
  }

  grpc::ServerWriteReactor<mq::v1::WatchJobResponse>* Open(const mq::v1::WatchJobRequest& r) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      return Refuse(
          grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down"));
    }
    if (static_cast<int>(open_.size()) >= max_streams_) {
      return Refuse(grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          absl::StrCat("too many open WatchJob streams (", max_streams_,
                       ", mq-coordinator --max-watch-streams); retry later, or poll GetJob")));
    }
    auto* watch = new Watch(this, r.job_id());
    open_.insert(watch);
    if (metrics_) metrics_->watch_streams->Set(static_cast<double>(open_.size()));
    kicked_ = true;
    return watch;
  }

  // Ends every open stream with UNAVAILABLE, refuses new ones, stops the thread.
  void Stop() {
    std::vector<Watch*> to_finish;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
      for (Watch* w : open_) {
        if (!w->busy && !w->finished) {
          w->finished = true;
          to_finish.push_back(w);
        }
      }
    }
    coordinator_->WakeAll();
    if (thread_.joinable()) thread_.join();
    for (Watch* w : to_finish) {
      FinishWatch(w,
                  grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down"));
    }
  }

 private:
  class Watch final : public grpc::ServerWriteReactor<mq::v1::WatchJobResponse> {
   public:
    Watch(WatchPump* pump, std::string job_id) : pump_(pump), job_id(std::move(job_id)) {}
    void OnWriteDone(bool ok) override { pump_->WriteDone(this, ok); }
    void OnCancel() override { pump_->Cancelled(this); }
    void OnDone() override {
      pump_->Done(this);
      delete this;
    }

    WatchPump* const pump_;
    const std::string job_id;
    const std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    // Guarded by the pump's mu_.
    bool busy = false;
    bool finished = false;
    bool cancelled = false;
    bool terminal = false;             // the last message written showed the job ended
    bool written_any = false;          // a message was written; `written_at` is valid
    uint64_t written_at = 0;           // the change counter of the last message written
    int64_t next_seq = 0;              // events below this were sent
    mq::v1::WatchJobResponse message;  // the message being written
  };

  grpc::ServerWriteReactor<mq::v1::WatchJobResponse>* Refuse(const grpc::Status& status) {
    Record(metrics_, "WatchJob", status, std::chrono::steady_clock::now());
    return new RefusedWatch(status);
  }

  void FinishWatch(Watch* w, const grpc::Status& status) {
    Record(metrics_, "WatchJob", status, w->start);
    w->Finish(status);
  }

  void WriteDone(Watch* w, bool ok) {
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      w->busy = false;
      if (!ok) w->cancelled = true;
      if (w->finished) return;
      if (w->cancelled) {
        status = grpc::Status(grpc::StatusCode::CANCELLED, "the watcher went away");
      } else if (w->terminal) {
        status = grpc::Status::OK;
      } else if (stopping_) {
        status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
      } else {
        kicked_ = true;  // a change may have come while the write was in flight
        return;
      }
      w->finished = true;
    }
    FinishWatch(w, status);
  }

  void Cancelled(Watch* w) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      w->cancelled = true;
      if (w->busy || w->finished) return;  // the write's completion finishes it
      w->finished = true;
    }
    FinishWatch(w, grpc::Status(grpc::StatusCode::CANCELLED, "the watcher went away"));
  }

  void Done(Watch* w) {
    std::lock_guard<std::mutex> lock(mu_);
    open_.erase(w);
    if (metrics_) metrics_->watch_streams->Set(static_cast<double>(open_.size()));
  }

  // Each round: every idle stream that has not seen the current change counter gets a new
  // snapshot (one snapshot per job and event position per round, shared by its watchers).
  void Loop() {
    uint64_t counter = coordinator_->change_counter();
    while (true) {
      std::vector<Watch*> due;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) return;
        kicked_ = false;
        for (Watch* w : open_) {
          if (w->busy || w->finished || (w->written_any && w->written_at == counter)) continue;
          w->busy = true;
          due.push_back(w);
        }
      }
      std::map<std::pair<std::string, int64_t>, absl::StatusOr<mq::v1::WatchJobResponse>> cache;
      for (Watch* w : due) {
        int64_t from_seq;
        {
          std::lock_guard<std::mutex> lock(mu_);
          from_seq = w->next_seq;
        }
        auto key = std::make_pair(w->job_id, from_seq);
        auto it = cache.find(key);
        if (it == cache.end()) {
          it = cache.emplace(key, coordinator_->JobSnapshot(w->job_id, from_seq)).first;
        }
        Send(w, it->second, counter);
      }
      // Wake on the next change, or soon to pick up new streams and finished writes.
      const int64_t deadline = coordinator_->options().monotonic_ms() + 50;
      while (true) {
        const uint64_t now = coordinator_->WaitForChange(counter, deadline);
        std::lock_guard<std::mutex> lock(mu_);
        if (now != counter || kicked_ || stopping_ ||
            coordinator_->options().monotonic_ms() >= deadline) {
          counter = now;
          break;
        }
      }
    }
  }

  void Send(Watch* w, const absl::StatusOr<mq::v1::WatchJobResponse>& snapshot, uint64_t counter) {
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (w->cancelled) {
        status = grpc::Status(grpc::StatusCode::CANCELLED, "the watcher went away");
      } else if (!snapshot.ok()) {
        status = ToGrpcStatus(snapshot.status());
      } else {
        w->message = *snapshot;
        w->next_seq = snapshot->job().event_count();
        w->written_any = true;
        w->written_at = counter;
        w->terminal = IsTerminalState(snapshot->job().state());
      }
      if (!status.ok()) {
        w->busy = false;
        w->finished = true;
      }
    }
    if (!status.ok()) {
      FinishWatch(w, status);
      return;
    }
    w->StartWrite(&w->message);  // busy until OnWriteDone
  }

  Coordinator* const coordinator_;
  CoordinatorMetrics* const metrics_;
  const int max_streams_;
  std::mutex mu_;
  std::set<Watch*> open_;  // every stream not yet done
  bool stopping_ = false;
  bool kicked_ = false;  // a stream needs the pump before the next change
  std::thread thread_;
};

JobServiceImpl::JobServiceImpl(Coordinator* coordinator, CoordinatorMetrics* metrics,
                               ServiceLimits limits, const Authenticator* auth)
    : coordinator_(coordinator),
      metrics_(metrics),
      auth_(auth),
      watches_(std::make_unique<WatchPump>(coordinator, metrics, limits.max_watch_streams)) {}

JobServiceImpl::~JobServiceImpl() = default;

void JobServiceImpl::Shutdown() { watches_->Stop(); }

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext* ctx, const mq::v1::SubmitJobRequest* r,
                                       mq::v1::SubmitJobResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "SubmitJob", Need::kSubmit, Kind::kChange, out,
                [&](const Caller& caller) { return coordinator_->SubmitJob(*r, caller); });
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* ctx, const mq::v1::GetJobRequest* r,
                                    mq::v1::GetJobResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "GetJob", Need::kView, Kind::kRead, out,
                [&](const Caller&) { return coordinator_->GetJob(*r); });
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* ctx, const mq::v1::ListJobsRequest* r,
                                      mq::v1::ListJobsResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "ListJobs", Need::kView, Kind::kRead, out,
                [&](const Caller&) { return coordinator_->ListJobs(*r); });
}

grpc::ServerWriteReactor<mq::v1::WatchJobResponse>* JobServiceImpl::WatchJob(
    grpc::CallbackServerContext* ctx, const mq::v1::WatchJobRequest* r) {
  if (auto caller = Admit(auth_, *ctx, Need::kView, "WatchJob"); !caller.ok()) {
    const grpc::Status status = ToGrpcStatus(caller.status());
    Record(metrics_, "WatchJob", status, std::chrono::steady_clock::now());
    return new RefusedWatch(status);
  }
  return watches_->Open(*r);
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* ctx, const mq::v1::CancelJobRequest* r,
                                       mq::v1::CancelJobResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "CancelJob", Need::kSubmit, Kind::kChange, out,
                [&](const Caller& caller) { return coordinator_->CancelJob(*r, caller); });
}

grpc::Status JobServiceImpl::ResumeJob(grpc::ServerContext* ctx, const mq::v1::ResumeJobRequest* r,
                                       mq::v1::ResumeJobResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "ResumeJob", Need::kSubmit, Kind::kChange, out,
                [&](const Caller& caller) { return coordinator_->ResumeJob(*r, caller); });
}

grpc::Status JobServiceImpl::InspectModel(grpc::ServerContext* ctx,
                                          const mq::v1::InspectModelRequest* r,
                                          mq::v1::InspectModelResponse* out) {
  Slot slot(inspections_, kMaxInspections);
  return Handle(coordinator_, metrics_, auth_, *ctx, "InspectModel", Need::kSubmit, Kind::kRead,
                out, [&](const Caller&) -> absl::StatusOr<mq::v1::InspectModelResponse> {
                  if (!slot.taken()) {
                    return absl::ResourceExhaustedError(
                        absl::StrCat("too many InspectModel calls at once (", kMaxInspections,
                                     "); retry when one has finished"));
                  }
                  return coordinator_->InspectModel(*r, DeadlineMs(ctx, coordinator_, 600000));
                });
}

grpc::Status JobServiceImpl::ListWorkers(grpc::ServerContext* ctx,
                                         const mq::v1::ListWorkersRequest*,
                                         mq::v1::ListWorkersResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "ListWorkers", Need::kView, Kind::kRead, out,
                [&](const Caller&) -> absl::StatusOr<mq::v1::ListWorkersResponse> {
                  return coordinator_->ListWorkers();
                });
}

grpc::Status WorkerServiceImpl::RegisterWorker(grpc::ServerContext* ctx,
                                               const mq::v1::RegisterWorkerRequest* r,
                                               mq::v1::RegisterWorkerResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "RegisterWorker", Need::kWork, Kind::kChange,
                out,
                [&](const Caller& caller) { return coordinator_->RegisterWorker(*r, caller); });
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext* ctx,
                                          const mq::v1::HeartbeatRequest* r,
                                          mq::v1::HeartbeatResponse* out) {
  // In memory only: answered while the store cannot write, so leases survive the outage.
  return Handle(coordinator_, metrics_, auth_, *ctx, "Heartbeat", Need::kWork, Kind::kRead, out,
                [&](const Caller& caller) {
                  return AsWorker(coordinator_, r->worker_id(), caller,
                                  [&] { return coordinator_->Heartbeat(*r); });
                });
}

grpc::Status WorkerServiceImpl::PollAssignment(grpc::ServerContext* ctx,
                                               const mq::v1::PollAssignmentRequest* r,
                                               mq::v1::PollAssignmentResponse* out) {
  Slot slot(long_polls_, limits_.max_long_polls);
  if (slot.taken() && metrics_) metrics_->long_polls->Increment();
  grpc::Status status =
      Handle(coordinator_, metrics_, auth_, *ctx, "PollAssignment", Need::kWork, Kind::kRead, out,
             [&](const Caller& caller) -> absl::StatusOr<mq::v1::PollAssignmentResponse> {
               if (!slot.taken()) {
                 return absl::ResourceExhaustedError(absl::StrCat(
                     "too many PollAssignment calls waiting at once (", limits_.max_long_polls,
                     ", mq-coordinator --max-long-polls); one per worker is normal"));
               }
               return AsWorker(coordinator_, r->worker_id(), caller, [&] {
                 return coordinator_->PollAssignment(*r, DeadlineMs(ctx, coordinator_, 60000));
               });
             });
  if (slot.taken() && metrics_) metrics_->long_polls->Decrement();
  return status;
}

grpc::Status WorkerServiceImpl::ReportProgress(grpc::ServerContext* ctx,
                                               const mq::v1::ReportProgressRequest* r,
                                               mq::v1::ReportProgressResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "ReportProgress", Need::kWork, Kind::kChange,
                out, [&](const Caller& caller) {
                  return AsWorker(coordinator_, r->worker_id(), caller,
                                  [&] { return coordinator_->ReportProgress(*r); });
                });
}

grpc::Status WorkerServiceImpl::CompleteAssignment(grpc::ServerContext* ctx,
                                                   const mq::v1::CompleteAssignmentRequest* r,
                                                   mq::v1::CompleteAssignmentResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "CompleteAssignment", Need::kWork,
                Kind::kChange, out, [&](const Caller& caller) {
                  return AsWorker(coordinator_, r->worker_id(), caller,
                                  [&] { return coordinator_->CompleteAssignment(*r); });
                });
}

grpc::Status WorkerServiceImpl::ReportLayer(grpc::ServerContext* ctx,
                                            const mq::v1::ReportLayerRequest* r,
                                            mq::v1::ReportLayerResponse* out) {
  return Handle(coordinator_, metrics_, auth_, *ctx, "ReportLayer", Need::kWork, Kind::kChange, out,
                [&](const Caller& caller) {
                  return AsWorker(coordinator_, r->worker_id(), caller,
                                  [&] { return coordinator_->ReportLayer(*r); });
                });
}

}  // namespace mq::server
