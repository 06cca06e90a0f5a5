// mq-watch-load: opens many WatchJob streams on one job from one process (callback client API,
// spread over several connections) and reports, as JSON lines on stdout:
//   1. once every stream has its first message or has ended (or --settle-seconds passed):
//      {"opened", "accepted", "refused", "refused_message", "other", "other_message",
//       "settle_ms"}  (accepted: got a first message; refused: ended RESOURCE_EXHAUSTED)
//   2. once every stream has ended (or --hold-seconds passed, then the rest are cancelled):
//      {"ended_ok", "saw_terminal", "cancelled", "ended_other", "other_message"}
// Used by tests/integration/test_bounded_work.py to hold 1,000 watchers while a job runs.

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/flags.h"
#include "mq/v1/job_service.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace {

struct Totals {
  std::mutex mu;
  std::condition_variable cv;
  int settled = 0;  // got a first message or ended
  int done = 0;
  int accepted = 0;
  int refused = 0;
  int other = 0;  // ended before a first message with another code
  int ended_ok = 0;
  int saw_terminal = 0;
  int cancelled = 0;
  int ended_other = 0;
  std::string refused_message;
  std::string other_message;
};

bool Terminal(mq::v1::JobState s) {
  return s == mq::v1::JOB_STATE_SUCCEEDED || s == mq::v1::JOB_STATE_FAILED ||
         s == mq::v1::JOB_STATE_CANCELLED;
}

class Watcher final : public grpc::ClientReadReactor<mq::v1::WatchJobResponse> {
 public:
  Watcher(mq::v1::JobService::Stub* stub, const std::string& job_id, Totals* totals)
      : totals_(totals) {
    request_.set_job_id(job_id);
    stub->async()->WatchJob(&ctx_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows
    {
      std::lock_guard<std::mutex> lock(totals_->mu);
      if (!first_) {
        first_ = true;
        ++totals_->accepted;
        ++totals_->settled;
        totals_->cv.notify_all();
      }
      if (Terminal(response_.job().state())) terminal_ = true;
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& s) override {
    std::lock_guard<std::mutex> lock(totals_->mu);
    if (!first_) {
      ++totals_->settled;
      if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        ++totals_->refused;
        totals_->refused_message = s.error_message();
      } else {
        ++totals_->other;
        totals_->other_message = std::to_string(s.error_code()) + ": " + s.error_message();
      }
    } else if (s.ok()) {
      ++totals_->ended_ok;
      if (terminal_) ++totals_->saw_terminal;
    } else if (s.error_code() == grpc::StatusCode::CANCELLED) {
      ++totals_->cancelled;
    } else {
      ++totals_->ended_other;
      totals_->other_message = std::to_string(s.error_code()) + ": " + s.error_message();
    }
    ++totals_->done;
    totals_->cv.notify_all();
  }

  void Cancel() { ctx_.TryCancel(); }

 private:
  Totals* totals_;
  grpc::ClientContext ctx_;
  mq::v1::WatchJobRequest request_;
  mq::v1::WatchJobResponse response_;
  bool first_ = false;     // guarded by totals_->mu
  bool terminal_ = false;  // guarded by totals_->mu
};

}  // namespace

int main(int argc, char** argv) {
  std::string coordinator;
  std::string job_id;
  int64_t streams = 1000;
  int64_t connections = 10;
  int64_t settle_seconds = 60;
  int64_t hold_seconds = 600;
  mq::Flags flags;
  flags.String("coordinator", &coordinator, "HOST:PORT of mq-coordinator");
  flags.String("job", &job_id, "job id to watch");
  flags.Int("streams", &streams, "WatchJob streams to open (default 1000)");
  flags.Int("connections", &connections, "connections to spread them over (default 10)");
  flags.Int("settle-seconds", &settle_seconds, "wait this long for first answers (default 60)");
  flags.Int("hold-seconds", &hold_seconds,
            "then wait this long for the streams to end before cancelling them (default 600)");
  if (auto s = flags.Parse(argc, argv);
      !s.ok() || coordinator.empty() || job_id.empty() || streams < 1 || connections < 1) {
    std::fprintf(stderr,
                 "mq-watch-load: %s\nusage: mq-watch-load --coordinator HOST:PORT --job ID\n%s",
                 s.ok() ? "--coordinator, --job and positive counts are required"
                        : std::string(s.message()).c_str(),
                 flags.Usage().c_str());
    return 2;
  }

  std::vector<std::unique_ptr<mq::v1::JobService::Stub>> stubs;
  for (int64_t i = 0; i < connections; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per channel
    args.SetInt("mq.watch_load.channel", static_cast<int>(i));
    stubs.push_back(mq::v1::JobService::NewStub(
        grpc::CreateCustomChannel(coordinator, grpc::InsecureChannelCredentials(), args)));
  }
  Totals totals;
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<Watcher>> watchers;
  for (int64_t i = 0; i < streams; ++i) {
    watchers.push_back(std::make_unique<Watcher>(stubs[i % connections].get(), job_id, &totals));
  }
  {
    std::unique_lock<std::mutex> lock(totals.mu);
    totals.cv.wait_for(lock, std::chrono::seconds(settle_seconds),
                       [&] { return totals.settled == streams; });
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - start)
                        .count();
    nlohmann::json line = {{"opened", streams},
                           {"accepted", totals.accepted},
                           {"refused", totals.refused},
                           {"refused_message", totals.refused_message},
                           {"other", totals.other},
                           {"other_message", totals.other_message},
                           {"settle_ms", ms}};
    std::printf("%s\n", line.dump().c_str());
    std::fflush(stdout);
    totals.cv.wait_for(lock, std::chrono::seconds(hold_seconds),
                       [&] { return totals.done == streams; });
  }
  for (auto& w : watchers) w->Cancel();
  {
    std::unique_lock<std::mutex> lock(totals.mu);
    totals.cv.wait(lock, [&] { return totals.done == streams; });
    nlohmann::json line = {{"ended_ok", totals.ended_ok},
                           {"saw_terminal", totals.saw_terminal},
                           {"cancelled", totals.cancelled},
                           {"ended_other", totals.ended_other},
                           {"other_message", totals.other_message}};
    std::printf("%s\n", line.dump().c_str());
    std::fflush(stdout);
  }
  return 0;
}
