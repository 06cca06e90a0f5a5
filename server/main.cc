// mq-coordinator: accepts jobs over gRPC, schedules them onto workers, keeps its state in
// RocksDB. Start-up order: open the store, recover, serve gRPC, then report ready.

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <vector>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/channel.h"
#include "common/flags.h"
#include "common/metrics.h"
#include "common/util.h"
#include "server/coordinator.h"
#include "server/auth/authenticator.h"
#include "server/grpc_services.h"
#include "server/validation.h"

namespace {

// Threads of the sync gRPC server (ResourceQuota).
constexpr int kMaxServerThreads = 512;

int Fail(const std::string& message) {
  std::fprintf(stderr, "mq-coordinator: %s\n", message.c_str());
  return 2;
}

// The gRPC port's credentials: TLS from --tls-cert/--tls-key, client certificates (workers)
// verified against --tls-ca when given; plaintext only with --insecure.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    bool insecure, const std::string& cert, const std::string& key, const std::string& ca) {
  if (insecure) return grpc::InsecureServerCredentials();
  auto cert_pem = mq::ReadPemFile("tls-cert", cert);
  if (!cert_pem.ok()) return cert_pem.status();
  auto key_pem = mq::ReadPemFile("tls-key", key);
  if (!key_pem.ok()) return key_pem.status();
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_key_cert_pairs.push_back({*key_pem, *cert_pem});
  if (!ca.empty()) {
    auto ca_pem = mq::ReadPemFile("tls-ca", ca);
    if (!ca_pem.ok()) return ca_pem.status();
    options.pem_root_certs = *ca_pem;
    // Optional for the peer (clients use tokens), verified when presented (workers).
    options.client_certificate_request = GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

// mq-coordinator add-token --tokens-file FILE --principal NAME --role ROLE
int AddTokenCommand(int argc, char** argv) {
  std::string tokens_file, principal, role;
  bool help = false;
  mq::Flags flags;
  flags.String("tokens-file", &tokens_file, "the tokens file to append to (created 0600)");
  flags.String("principal", &principal, "who the token identifies: 1..64 of [A-Za-z0-9._@-]");
  flags.String("role", &role, "viewer, submitter, admin or worker");
  flags.Bool("help", &help, "show this help");
  if (absl::Status s = flags.Parse(argc, argv, 2); !s.ok()) return Fail(std::string(s.message()));
  if (help) {
    std::cout << "usage: mq-coordinator add-token --tokens-file FILE --principal NAME --role "
                 "ROLE\nPrints a new bearer token once and appends its SHA-256 to the file; a "
                 "running coordinator reads the file at start.\n"
              << flags.Usage();
    return 0;
  }
  if (tokens_file.empty() || principal.empty() || role.empty()) {
    return Fail("add-token: --tokens-file, --principal and --role are required");
  }
  auto parsed = mq::server::ParseRole(role);
  if (!parsed.ok()) return Fail(absl::StrCat("--role: ", parsed.status().message()));
  auto token = mq::server::AddToken(tokens_file, principal, *parsed);
  if (!token.ok()) return Fail(std::string(token.status().message()));
  std::cout << *token << "\n";
  std::fprintf(stderr,
               "mq-coordinator: added %s (%s) to %s; the token above is shown only now (restart "
               "the coordinator to use it)\n",
               principal.c_str(), role.c_str(), tokens_file.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "add-token") return AddTokenCommand(argc, argv);
  std::string listen = "127.0.0.1:50051";
  std::string data_dir;
  std::string metrics_listen;
  std::string ready_file;
  int64_t lease_ms = 10000;
  int64_t heartbeat_interval_ms = 2000;
  int64_t gang_wait_ms = 30000;
  std::string retain_ended_jobs = "1000";
  int64_t max_watch_streams = 4096;
  int64_t max_long_polls = 256;
  int64_t store_reserve_mb = mq::server::kDefaultStoreReserveBytes >> 20;
  std::string tls_cert, tls_key, tls_ca, tokens_file, health_listen;
  bool insecure = false;
  std::vector<std::string> allow_read;
  std::vector<std::string> allow_write;
  bool reflection = false;
  bool help = false;
  mq::Flags flags;
  flags.String("listen", &listen,
               "gRPC address HOST:PORT (port 0 picks one; default 127.0.0.1:50051)");
  flags.String("data-dir", &data_dir, "directory of the RocksDB state store (required)");
  flags.String("metrics-listen", &metrics_listen, "serve Prometheus /metrics on HOST:PORT");
  flags.String("ready-file", &ready_file, "write the bound HOST:PORT here once ready");
  flags.Int("lease-ms", &lease_ms, "a worker silent this long is dead (default 10000)");
  flags.Int("heartbeat-interval-ms", &heartbeat_interval_ms,
            "how often workers heartbeat (default 2000)");
  flags.Int("gang-wait-ms", &gang_wait_ms,
            "a planned job waits this long for a full gang before running on fewer workers, "
            "when fewer than its gang size are alive (default 30000)");
  flags.String("retain-ended-jobs", &retain_ended_jobs,
               "ended jobs kept in memory besides the live ones: the newest N (e.g. 1000) or "
               "those ended within a duration (3600s, 30m, 24h, 7d); older ones stay in the "
               "store, where status still finds them (default 1000)");
  flags.Int("max-watch-streams", &max_watch_streams,
            "open WatchJob streams at most; more are refused with RESOURCE_EXHAUSTED (default "
            "4096; a stream holds no thread)");
  flags.Int("max-long-polls", &max_long_polls,
            "PollAssignment calls waiting at once at most, one per worker is normal; more are "
            "refused with RESOURCE_EXHAUSTED (default 256, of 512 server threads)");
  flags.Int("store-reserve-mb", &store_reserve_mb,
            "free space the state store keeps on its device: below it, changes are refused "
            "(UNAVAILABLE, health NOT_SERVING) until room is made (default 32)");
  flags.String("tls-cert", &tls_cert, "server certificate chain (PEM) of the gRPC port");
  flags.String("tls-key", &tls_key, "private key (PEM) of --tls-cert");
  flags.String("tls-ca", &tls_ca,
               "CA (PEM) whose client certificates identify workers (mTLS; optional: workers "
               "may use worker tokens instead)");
  flags.String("tokens-file", &tokens_file,
               "bearer tokens: lines PRINCIPAL ROLE sha256:HEX (see `mq-coordinator add-token "
               "--help`); required with TLS");
  flags.Bool("insecure", &insecure,
             "serve plaintext gRPC with no authentication: anyone who reaches the port may do "
             "anything (demos on one machine only)");
  flags.String("health-listen", &health_listen,
               "also serve grpc.health.v1 alone, in plaintext, on HOST:PORT (for probes that "
               "cannot speak TLS)");
  flags.Repeated("allow-read", &allow_read,
                 "jobs may read models, datasets and tokenizers only under this absolute "
                 "directory (repeatable; --allow-read / allows any); required with TLS; with "
                 "--insecure and neither flag, paths are unrestricted");
  flags.Repeated("allow-write", &allow_write,
                 "jobs may write outputs only under this absolute directory (repeatable)");
  flags.Bool("enable-reflection", &reflection, "serve gRPC server reflection (v1alpha)");
  flags.Bool("help", &help, "show this help");
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(std::string(s.message()));
  if (help) {
    std::cout << "usage: mq-coordinator --listen HOST:PORT --data-dir DIR (--tls-cert FILE "
                 "--tls-key FILE --tokens-file FILE [--tls-ca FILE] | --insecure) "
                 "[--metrics-listen HOST:PORT]\n"
                 "       mq-coordinator add-token --tokens-file FILE --principal NAME --role "
                 "ROLE\n"
              << flags.Usage();
    return 0;
  }
  if (!flags.positional().empty()) {
    return Fail("unexpected argument \"" + flags.positional().front() + "\"");
  }
  if (data_dir.empty()) return Fail("--data-dir is required: the state store's directory");
  if (lease_ms < 100 || lease_ms > 3600000) {
    return Fail(absl::StrCat("--lease-ms = ", lease_ms, ": must be between 100 and 3600000"));
  }
  if (heartbeat_interval_ms < 10 || heartbeat_interval_ms >= lease_ms) {
    return Fail(absl::StrCat("--heartbeat-interval-ms = ", heartbeat_interval_ms,
                             ": must be at least 10 and below --lease-ms (", lease_ms, ")"));
  }
  if (gang_wait_ms < 0 || gang_wait_ms > 86400000) {
    return Fail(
        absl::StrCat("--gang-wait-ms = ", gang_wait_ms, ": must be between 0 and 86400000"));
  }
  auto retention = mq::server::ParseEndedJobRetention(retain_ended_jobs);
  if (!retention.ok()) return Fail(std::string(retention.status().message()));
  if (max_watch_streams < 1 || max_watch_streams > 1000000) {
    return Fail(absl::StrCat("--max-watch-streams = ", max_watch_streams,
                             ": must be between 1 and 1000000"));
  }
  // The sync server has kMaxServerThreads threads; long polls and inspections must leave most
  // of them to short RPCs (heartbeats, reports, status).
  if (max_long_polls < 1 || max_long_polls > kMaxServerThreads / 2) {
    return Fail(absl::StrCat("--max-long-polls = ", max_long_polls, ": must be between 1 and ",
                             kMaxServerThreads / 2));
  }
  // Without a reserve RocksDB runs into the end of the device, where it can abort.
  if (store_reserve_mb < 1 || store_reserve_mb > 1 << 20) {
    return Fail(
        absl::StrCat("--store-reserve-mb = ", store_reserve_mb, ": must be between 1 and 1048576"));
  }
  auto path_policy = mq::server::MakePathPolicy(allow_read, allow_write);
  if (!path_policy.ok()) return Fail(std::string(path_policy.status().message()));
  if (listen.find(':') == std::string::npos) {
    return Fail("--listen = \"" + listen + "\": must be HOST:PORT");
  }
  if (insecure && (!tls_cert.empty() || !tls_key.empty() || !tls_ca.empty() ||
                   !tokens_file.empty())) {
    return Fail(
        "--insecure turns TLS and authentication off; it cannot be combined with --tls-cert, "
        "--tls-key, --tls-ca or --tokens-file");
  }
  if (!insecure && (tls_cert.empty() || tls_key.empty() || tokens_file.empty())) {
    return Fail(
        "TLS and authentication are required: pass --tls-cert, --tls-key and --tokens-file "
        "(and --tls-ca for workers with client certificates), or --insecure to serve plaintext "
        "without authentication (demos only)");
  }
  if (!insecure && allow_read.empty() && allow_write.empty()) {
    return Fail(
        "--allow-read and --allow-write are required: the directories jobs may read models and "
        "datasets from and write outputs to (repeatable; `--allow-read /` allows any); only "
        "--insecure runs without them");
  }
  auto credentials = ServerCredentials(insecure, tls_cert, tls_key, tls_ca);
  if (!credentials.ok()) return Fail(std::string(credentials.status().message()));
  std::unique_ptr<mq::server::Authenticator> authenticator;
  if (insecure) {
    authenticator = std::make_unique<mq::server::Authenticator>();
  } else {
    auto tokens = mq::server::TokenTable::Load(tokens_file);
    if (!tokens.ok()) return Fail(std::string(tokens.status().message()));
    authenticator = std::make_unique<mq::server::Authenticator>(*std::move(tokens));
  }

  // Signals are taken by sigwait below; block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  mq::MetricsRegistry metrics_registry;
  mq::server::CoordinatorMetrics metrics(metrics_registry.registry());
  metrics.ready->Set(0);
  if (!metrics_listen.empty()) {
    if (absl::Status s = metrics_registry.Serve(metrics_listen); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }

  auto store = mq::server::OpenRocksDbStore(data_dir, store_reserve_mb << 20);
  if (!store.ok()) return Fail(std::string(store.status().message()));
  mq::server::CoordinatorOptions options;
  options.lease_ms = lease_ms;
  options.heartbeat_interval_ms = heartbeat_interval_ms;
  options.gang_wait_ms = gang_wait_ms;
  options.retain_ended_jobs = retention->jobs;
  options.retain_ended_ms = retention->ms;
  options.path_policy = *std::move(path_policy);
  auto coordinator = mq::server::Coordinator::Recover(store->get(), options, &metrics);
  if (!coordinator.ok()) return Fail(std::string(coordinator.status().message()));

  mq::server::ServiceLimits limits;
  limits.max_watch_streams = static_cast<int>(max_watch_streams);
  limits.max_long_polls = static_cast<int>(max_long_polls);
  mq::server::JobServiceImpl job_service(coordinator->get(), &metrics, limits,
                                         authenticator.get());
  mq::server::WorkerServiceImpl worker_service(coordinator->get(), &metrics, limits,
                                               authenticator.get());
  grpc::EnableDefaultHealthCheckService(true);
  if (reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, *credentials, &port);
  builder.RegisterService(&job_service);
  builder.RegisterService(&worker_service);
  builder.SetMaxReceiveMessageSize(16 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 60000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  grpc::ResourceQuota quota("mq-coordinator");
  quota.SetMaxThreads(kMaxServerThreads);
  builder.SetResourceQuota(quota);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    return Fail("--listen = \"" + listen + "\": cannot listen there (in use or invalid)");
  }
  const std::string bound = listen.substr(0, listen.rfind(':')) + ":" + std::to_string(port);
  // The plaintext health port: its own server, with only the default health service.
  std::unique_ptr<grpc::Server> health_server;
  if (!health_listen.empty()) {
    grpc::ServerBuilder health_builder;
    int health_port = 0;
    health_builder.AddListeningPort(health_listen, grpc::InsecureServerCredentials(),
                                    &health_port);
    health_server = health_builder.BuildAndStart();
    if (!health_server || health_port == 0) {
      return Fail("--health-listen = \"" + health_listen +
                  "\": cannot listen there (in use or invalid)");
    }
  }

  // Health and mq_coordinator_ready follow Coordinator::serving() (a failed store write takes
  // the coordinator out of service until the store writes again) until shutdown begins.
  std::vector<grpc::HealthCheckServiceInterface*> health_services = {
      server->GetHealthCheckService()};
  if (health_server) health_services.push_back(health_server->GetHealthCheckService());
  auto set_health = [&](bool ok) {
    for (grpc::HealthCheckServiceInterface* h : health_services) h->SetServingStatus(ok);
  };
  std::mutex health_mu;
  bool shutting_down = false;
  bool serving = true;
  set_health(true);
  metrics.ready->Set(1);

  std::atomic<bool> stop{false};
  std::thread ticker([&] {
    while (!stop) {
      (*coordinator)->Tick();
      const bool now = (*coordinator)->serving();
      {
        std::lock_guard<std::mutex> lock(health_mu);
        if (!shutting_down && now != serving) {
          serving = now;
          set_health(now);
          metrics.ready->Set(now ? 1 : 0);
          mq::LogLine(
              "coordinator", now ? "INFO" : "ERROR",
              now ? "health: SERVING" : "health: NOT_SERVING (the state store cannot write)");
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  if (!ready_file.empty()) {
    std::ofstream(ready_file + ".tmp") << bound << "\n";
    std::rename((ready_file + ".tmp").c_str(), ready_file.c_str());
  }
  mq::LogLine("coordinator", "INFO",
              absl::StrCat("mq-coordinator ", mq::Version(), " ready on ", bound, " (data ",
                           data_dir, ", epoch ", (*coordinator)->epoch(), ", ",
                           insecure ? "INSECURE: plaintext, no authentication"
                                    : "TLS, token authentication",
                           ")"));

  int sig = 0;
  sigwait(&signals, &sig);
  mq::LogLine("coordinator", "INFO", absl::StrCat("signal ", sig, ": shutting down"));
  {
    std::lock_guard<std::mutex> lock(health_mu);
    shutting_down = true;
    metrics.ready->Set(0);
    set_health(false);
  }
  job_service.Shutdown();
  (*coordinator)->WakeAll();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (health_server) health_server->Shutdown(std::chrono::system_clock::now());
  stop = true;
  ticker.join();
  return 0;
}
