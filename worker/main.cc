// mq-worker: one process per GPU (or one CPU process in development). Registers with the
// coordinator, heartbeats, runs assignments and reports.

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/flags.h"
#include "common/metrics.h"
#include "common/util.h"
#include "worker/device_info.h"
#include "worker/worker.h"
#include "worker/worker_metrics.h"

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "mq-worker: %s\n", message.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string coordinator;
  std::string device = "cpu";
  std::string name;
  std::string scratch_dir;
  std::string metrics_listen;
  int64_t poll_wait_ms = 5000;
  bool help = false;
  mq::Flags flags;
  flags.String("coordinator", &coordinator, "coordinator HOST:PORT (default $MQ_COORDINATOR)");
  flags.String("device", &device, "cpu or cuda:N (default cpu)");
  flags.String("name", &name, "worker name, [A-Za-z0-9._-]{1,64} (default HOSTNAME-PID)");
  flags.String("scratch-dir", &scratch_dir, "directory for temporary data (default /tmp/mq-scratch)");
  flags.String("metrics-listen", &metrics_listen, "serve Prometheus /metrics on HOST:PORT");
  flags.Int("poll-wait-ms", &poll_wait_ms, "long-poll duration for new work (default 5000)");
  flags.Bool("help", &help, "show this help");
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(std::string(s.message()));
  if (help) {
    std::cout << "usage: mq-worker --coordinator HOST:PORT [--device cpu|cuda:N] [--name NAME] "
                 "[--scratch-dir DIR]\n"
              << flags.Usage();
    return 0;
  }
  if (!flags.positional().empty()) {
    return Fail("unexpected argument \"" + flags.positional().front() + "\"");
  }
  if (coordinator.empty()) {
    const char* env = std::getenv("MQ_COORDINATOR");
    coordinator = env ? env : "";
  }
  if (coordinator.empty() || coordinator.find(':') == std::string::npos) {
    return Fail("--coordinator = \"" + coordinator + "\": must be HOST:PORT (or set MQ_COORDINATOR)");
  }
  if (poll_wait_ms < 100 || poll_wait_ms > 60000) {
    return Fail(absl::StrCat("--poll-wait-ms = ", poll_wait_ms, ": must be between 100 and 60000"));
  }
  if (name.empty()) {
    char host[64] = {0};
    gethostname(host, sizeof(host) - 1);
    name = absl::StrCat(host, "-", getpid());
    for (char& c : name) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != '_') c = '-';
    }
    if (name.size() > 64) name.resize(64);
  }
  if (scratch_dir.empty()) scratch_dir = "/tmp/mq-scratch";
  std::error_code ec;
  std::filesystem::create_directories(scratch_dir, ec);
  if (ec) return Fail("--scratch-dir = \"" + scratch_dir + "\": cannot create: " + ec.message());

  auto info = mq::worker::ProbeDevice(device, scratch_dir);
  if (!info.ok()) return Fail(std::string(info.status().message()));

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  mq::MetricsRegistry registry;
  mq::worker::WorkerMetrics metrics(registry.registry(), name, device);
  if (!metrics_listen.empty()) {
    if (absl::Status s = registry.Serve(metrics_listen); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }

  std::atomic<bool> stop{false};
  std::thread signal_thread([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    mq::LogLine("worker", "INFO", absl::StrCat("signal ", sig, ": stopping"));
    stop = true;
  });
  signal_thread.detach();

  mq::worker::WorkerOptions options;
  options.coordinator = coordinator;
  options.name = name;
  options.scratch_dir = scratch_dir;
  options.poll_wait_ms = poll_wait_ms;
  mq::worker::Worker worker(options, *info, &metrics);
  return worker.Run(stop);
}
