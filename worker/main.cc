// mq-worker: one process per GPU (or one CPU process in development). Registers with the
// coordinator, heartbeats, runs assignments and reports.

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/channel.h"
#include "common/flags.h"
#include "common/listen_socket.h"
#include "common/metrics.h"
#include "common/util.h"
#include "worker/device_info.h"
#include "worker/worker.h"
#include "worker/worker_metrics.h"

namespace {

// A port on `host` that is free now (bound to port 0 and released): the worker's gang
// rendezvous port, advertised to the coordinator. `host` (an IP literal or a name, resolved)
// must be an address of this host, as rank 0's store listens there only.
absl::StatusOr<int> FreePort(const std::string& host) {
  absl::StatusOr<int> fd = mq::ListenOn(host, 0);
  if (!fd.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gang-host = \"", host,
                     "\": must be an address of this host (an IP literal or a name "
                     "resolving to one; the gang rendezvous store listens there only): ",
                     fd.status().message()));
  }
  absl::StatusOr<int> port = mq::BoundPort(*fd);
  ::close(*fd);
  return port;
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "mq-worker: %s\n", message.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  mq::worker::DefaultCudaAllocatorConfig();
  std::string coordinator;
  std::string device = "cpu";
  std::string name;
  std::string scratch_dir;
  std::string metrics_listen;
  int64_t poll_wait_ms = 5000;
  std::string gang_host = "127.0.0.1";
  int64_t gang_port = 0;
  int64_t gang_join_timeout_ms = 120000;
  std::string experts_per_pass_flag = "auto";
  std::string dispatch_tokens_flag = "auto";
  int64_t checkpoint_every = 0;
  int64_t cpu_threads = 0;
  bool overlap_writes = true;
  bool prefetch = true;
  bool stage = true;
  bool overlap_transfers = true;
  bool preload = true;
  std::string profile_layers_flag;
  std::string profile_dir;
  mq::ChannelSecurity security;
  std::string token_file;
  bool help = false;
  mq::Flags flags;
  flags.String("coordinator", &coordinator, "coordinator HOST:PORT (default $MQ_COORDINATOR)");
  flags.String("device", &device, "cpu or cuda:N (default cpu)");
  flags.String("name", &name, "worker name, [A-Za-z0-9._-]{1,64} (default HOSTNAME-PID)");
  flags.String("scratch-dir", &scratch_dir, "directory for temporary data (default /tmp/mq-scratch)");
  flags.String("metrics-listen", &metrics_listen, "serve Prometheus /metrics on HOST:PORT");
  flags.Int("poll-wait-ms", &poll_wait_ms, "long-poll duration for new work (default 5000)");
  flags.String("gang-host", &gang_host,
               "address peers use to reach this worker's gang rendezvous, which listens on it "
               "only: an address of this host or a name resolving to one (default 127.0.0.1)");
  flags.Int("gang-port", &gang_port,
            "port of this worker's gang rendezvous when it is rank 0 (default 0: a free port; "
            "-1: run no quantize assignments)");
  flags.Int("gang-join-timeout-ms", &gang_join_timeout_ms,
            "how long a gang's rendezvous may take before the attempt is given up (default "
            "120000)");
  flags.String("experts-per-pass", &experts_per_pass_flag,
               "routed experts whose Hessians are held (and solved in one batch) at once; bounds "
               "memory: a DeepSeek-V3 expert's Hessians take 222 MB (default auto: the job's plan "
               "chooses the fewest passes that fit this worker's device; 0 = all of a rank's; "
               "a job runs with its plan's value on every rank)");
  flags.String("dispatch-tokens", &dispatch_tokens_flag,
               "calibration tokens, over the whole gang, whose routed rows an MoE layer sends to "
               "their experts at once; bounds memory: DeepSeek-V3 holds 3 x 8 rows of 14 KB per "
               "token (sent, received, returned), spread over the gang (default auto: the job's "
               "plan chooses the fewest rounds that fit this worker's device; 0 = all)");
  flags.Int("checkpoint-every", &checkpoint_every,
            "layers per hidden-state checkpoint in the scratch directory (tokens x hidden x 2 "
            "bytes each, ~30 GB per rank for DeepSeek-V3 at 512 x 4096): a resumed job replays at "
            "most this many minus one committed layers (default 0: the smallest count that keeps "
            "checkpoint writes within 3% of a layer's time; at least the job's layer count: "
            "none)");
  flags.Int("cpu-threads", &cpu_threads,
            "threads for host-side tensor work (default 0: 4 with a CUDA device, so that one "
            "worker per GPU does not oversubscribe the host; every core with --device cpu)");
  flags.Bool("overlap-writes", &overlap_writes,
             "write and report each layer on a second thread while the next layer runs (default "
             "true; --overlap-writes=false finishes each layer before starting the next)");
  flags.Bool("prefetch-next-layer", &prefetch,
             "read the next layer's weights into the page cache while a layer computes (default "
             "true)");
  flags.Bool("stage-next-layer", &stage,
             "on a GPU, the prefetch copies the next layer's weights into page-locked host memory, "
             "so that its load is only transfers to the device (default true; needs "
             "--prefetch-next-layer; false: the load copies them itself)");
  flags.Bool("overlap-transfers", &overlap_transfers,
             "on a GPU, copy hidden states between host and device on a second CUDA stream "
             "while the layer computes (default true)");
  flags.Bool("preload-next-layer", &preload,
             "on a GPU, load the next layer's weights onto the device while a layer solves, "
             "where the job's plan finds room for them (default true; false: never)");
  flags.String("profile-layers", &profile_layers_flag,
               "comma-separated layer numbers whose steps are profiled (kernel-level, for "
               "benchmarks): a Chrome trace and a per-stage summary per layer in --profile-dir");
  flags.String("profile-dir", &profile_dir,
               "existing directory for --profile-layers' files (mq-profile-<job>-layer<L>-"
               "rank<R>.json and .txt; existing files are never overwritten)");
  flags.String("tls-ca", &security.ca_file,
               "CA (PEM) that signed the coordinator's certificate (default: the system's roots)");
  flags.String("tls-server-name", &security.server_name,
               "name in the coordinator's certificate, when it differs from --coordinator's host");
  flags.String("tls-cert", &security.cert_file,
               "client certificate (PEM) for mTLS: identifies this worker to a coordinator "
               "with --tls-ca");
  flags.String("tls-key", &security.key_file, "private key (PEM) of --tls-cert");
  flags.String("token-file", &token_file,
               "worker join token (a token of role worker; default $MQ_TOKEN_FILE)");
  flags.Bool("insecure", &security.insecure,
             "plaintext, no credentials: only for a coordinator run with --insecure");
  flags.Bool("help", &help, "show this help");
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(std::string(s.message()));
  if (help) {
    std::cout << "usage: mq-worker --coordinator HOST:PORT (--tls-ca FILE (--token-file FILE | "
                 "--tls-cert FILE --tls-key FILE) | --insecure) [--device cpu|cuda:N] "
                 "[--name NAME] [--scratch-dir DIR]\n"
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
  if (token_file.empty()) {
    const char* env = std::getenv("MQ_TOKEN_FILE");
    token_file = env ? env : "";
  }
  if (security.insecure && (!token_file.empty() || !security.cert_file.empty())) {
    return Fail("--insecure sends no credentials; drop --token-file/--tls-cert, or --insecure");
  }
  if (!security.insecure && token_file.empty() && security.cert_file.empty()) {
    return Fail(
        "a credential is required: --token-file FILE (a worker token) or --tls-cert and "
        "--tls-key (a client certificate), with --tls-ca for the coordinator's CA; or "
        "--insecure for a coordinator run with --insecure");
  }
  if (!token_file.empty()) {
    auto token = mq::ReadTokenFile("token-file", token_file);
    if (!token.ok()) return Fail(std::string(token.status().message()));
    security.token = *token;
  }
  auto channel =
      mq::SecureChannel(coordinator, security, mq::worker::CoordinatorChannelArgs());
  if (!channel.ok()) return Fail(std::string(channel.status().message()));
  if (poll_wait_ms < 100 || poll_wait_ms > 60000) {
    return Fail(absl::StrCat("--poll-wait-ms = ", poll_wait_ms, ": must be between 100 and 60000"));
  }
  if (gang_port < -1 || gang_port > 65535) {
    return Fail(absl::StrCat("--gang-port = ", gang_port, ": must be -1, 0 or 1..65535"));
  }
  if (gang_join_timeout_ms < 1000 || gang_join_timeout_ms > 3600000) {
    return Fail(absl::StrCat("--gang-join-timeout-ms = ", gang_join_timeout_ms,
                             ": must be between 1000 and 3600000"));
  }
  // "auto" = mq::model::kChooseSetting (-1): the plan chooses.
  int64_t experts_per_pass = -1, dispatch_tokens = -1;
  if (experts_per_pass_flag != "auto" &&
      (!absl::SimpleAtoi(experts_per_pass_flag, &experts_per_pass) || experts_per_pass < 0 ||
       experts_per_pass > 4096)) {
    return Fail(absl::StrCat("--experts-per-pass = ", experts_per_pass_flag,
                             ": must be auto (chosen by the plan), 0 (all) or 1..4096"));
  }
  if (checkpoint_every < 0 || checkpoint_every > 100000) {
    return Fail(absl::StrCat("--checkpoint-every = ", checkpoint_every,
                             ": must be between 0 (chosen by the cost model) and 100000"));
  }
  if (cpu_threads < 0 || cpu_threads > 4096) {
    return Fail(absl::StrCat("--cpu-threads = ", cpu_threads,
                             ": must be between 0 (automatic) and 4096"));
  }
  if (dispatch_tokens_flag != "auto" &&
      (!absl::SimpleAtoi(dispatch_tokens_flag, &dispatch_tokens) || dispatch_tokens < 0)) {
    return Fail(absl::StrCat("--dispatch-tokens = ", dispatch_tokens_flag,
                             ": must be auto (chosen by the plan), 0 (all at once) or a positive "
                             "token count"));
  }
  std::vector<int> profile_layers;
  for (absl::string_view part : absl::StrSplit(profile_layers_flag, ',', absl::SkipEmpty())) {
    int layer = -1;
    if (!absl::SimpleAtoi(part, &layer) || layer < 0 || layer > 100000) {
      return Fail(absl::StrCat("--profile-layers = ", profile_layers_flag,
                               ": must be comma-separated layer numbers (0..100000)"));
    }
    profile_layers.push_back(layer);
  }
  if (!profile_layers.empty()) {
    std::error_code dir_ec;
    if (profile_dir.empty() || !std::filesystem::is_directory(profile_dir, dir_ec)) {
      return Fail(absl::StrCat("--profile-dir = \"", profile_dir,
                               "\": --profile-layers needs --profile-dir, an existing directory"));
    }
  }
  if (gang_port >= 0) {  // also checks --gang-host when --gang-port is given
    absl::StatusOr<int> port = FreePort(gang_host);
    if (!port.ok()) return Fail(std::string(port.status().message()));
    if (gang_port == 0) gang_port = *port;
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
  options.gang_host = gang_host;
  options.gang_join_timeout_ms = gang_join_timeout_ms;
  options.experts_per_pass = experts_per_pass;
  options.dispatch_tokens = dispatch_tokens;
  options.checkpoint_every = checkpoint_every;
  options.cpu_threads = static_cast<int>(cpu_threads);
  options.overlap_writes = overlap_writes;
  options.prefetch_next_layer = prefetch;
  options.stage_next_layer = stage;
  options.overlap_transfers = overlap_transfers;
  options.preload_next_layer = preload;
  options.profile_layers = profile_layers;
  options.profile_dir = profile_dir;
  options.gang_port = gang_port < 0 ? 0 : static_cast<int>(gang_port);
  mq::worker::Worker worker(options, *info, &metrics, *channel);
  return worker.Run(stop);
}
