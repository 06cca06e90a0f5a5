#include "worker/pipeline/gang.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if MQ_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <unistd.h>

#include <chrono>
#include <exception>
#include <optional>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/error_text.h"
#include "common/listen_socket.h"
#include "common/sha256.h"
#include "common/util.h"

namespace mq::pipeline {

struct Gang::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  std::chrono::milliseconds timeout;
  at::Device device = at::kCPU;  // where collectives run
};

namespace {

// Runs a c10d call; any exception (a peer closed its connection, a timeout) is UNAVAILABLE
// "gang <what> failed: <the exception's message>", without its stack trace; the full text,
// trace included, goes to the log.
template <typename Fn>
absl::Status Guard(const std::string& what, Fn&& fn) {
  const std::string lead = absl::StrCat("gang ", what, " failed: ");
  try {
    fn();
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    LogLine("gang", "WARN", absl::StrCat(lead, e.what()));
    return absl::UnavailableError(absl::StrCat(lead, WithoutBacktrace(e.what_without_backtrace())));
  } catch (const std::exception& e) {
    LogLine("gang", "WARN", absl::StrCat(lead, e.what()));
    return absl::UnavailableError(absl::StrCat(lead, WithoutBacktrace(e.what())));
  }
}

// Values derived from the attempt's secret, each for one purpose (so that neither reveals the
// secret nor the other): the store keys' prefix, and the check value rank 0 publishes. c10d
// names keys in its error messages, which are logged, so the keys never carry the secret itself.
std::string SecretKeyPrefix(const std::string& secret) {
  return Sha256Hex("mq-gang-keys\n" + secret).substr(0, 32);
}
std::string SecretCheck(const std::string& secret) { return Sha256Hex("mq-gang-check\n" + secret); }

}  // namespace

absl::Status Gang::Exchange(const char* what, const std::function<void()>& fn) {
  // Work queued before the collective finishes first, so that only the exchange is timed.
  if (impl_->device.is_cuda()) at::zeros({1}, at::TensorOptions().device(impl_->device)).cpu();
  const auto start = std::chrono::steady_clock::now();
  absl::Status s = Guard(what, fn);
  exchange_seconds_ +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return s;
}

Gang::Gang(int rank, int size, std::unique_ptr<Impl> impl)
    : rank_(rank), size_(size), impl_(std::move(impl)) {}

Gang::~Gang() = default;

absl::StatusOr<std::unique_ptr<Gang>> Gang::Join(const GangOptions& options) {
  if (options.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size = ", options.world_size, ": must be >= 1"));
  }
  if (options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank = ", options.rank, ": must be in [0, ",
                                                   options.world_size, ")"));
  }
  if (options.world_size == 1) {
    return std::unique_ptr<Gang>(new Gang(0, 1, nullptr));
  }
  const size_t colon = options.rendezvous.rfind(':');
  int port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(options.rendezvous.substr(colon + 1), &port) || port <= 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous = \"", options.rendezvous,
                                                   "\": must be HOST:PORT with PORT in 1..65535"));
  }
  if (options.secret.empty()) {
    // Only a coordinator older than this worker sends none; a later attempt gets one once the
    // coordinator is upgraded, so this is an infrastructure failure, not the job's.
    return absl::UnavailableError(absl::StrCat(
        "gang ", options.key, " of ", options.world_size,
        " has no rendezvous secret (Assignment.rendezvous_secret is empty: the coordinator is "
        "older than this worker); refusing to serve or join an unprotected rendezvous store"));
  }
  auto impl = std::make_unique<Impl>();
  impl->timeout = options.timeout;
  // Names the address and where it comes from: the usual cause is rank 0's advertised
  // --gang-host not being reachable from its peers (or from itself, as rank 0 connects to its
  // own store there too). The same text on every rank, so repeats are recognised as such.
  const std::string join_failed =
      absl::StrCat("cannot join gang at ", options.rendezvous,
                   " (rank 0's --gang-host/--gang-port: check that every worker of the gang can "
                   "reach it) within ",
                   options.join_timeout.count(), " ms: ");
  // Rank 0 binds the store's socket itself, to its gang host only, and hands it to c10d
  // (TCPStoreOptions::masterListenFd; the libuv backend, LibTorch's default, and the classic
  // one both take the descriptor over and close it). Left to c10d, the store would listen on
  // every interface.
  std::optional<int> listen_fd;
  if (options.rank == 0) {
    absl::StatusOr<int> fd = ListenOn(options.local_host, port);
    if (!fd.ok()) {
      return absl::UnavailableError(absl::StrCat(
          "cannot serve gang rendezvous store (this worker's --gang-host/--gang-port): ",
          fd.status().message()));
    }
    listen_fd = *fd;
  }
  c10::intrusive_ptr<c10d::Store> gang_store;  // keys under "mq-gang/<key>/"
  absl::Status s = Guard("rendezvous", [&] {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = options.rank == 0;
    so.masterListenFd = listen_fd;
    so.useLibUV = true;
    so.numWorkers = options.world_size;
    so.waitWorkers = false;  // the join barrier below waits, keyed by this gang
    so.timeout = options.join_timeout;
    // From here on c10d owns the descriptor (closed with the store, or when starting it fails).
    listen_fd.reset();
    auto tcp = c10::make_intrusive<c10d::TCPStore>(options.rendezvous.substr(0, colon), so);
    gang_store = c10::make_intrusive<c10d::PrefixStore>("mq-gang/" + options.key, tcp);
  });
  if (listen_fd) ::close(*listen_fd);  // only when c10d never got it
  if (s.ok()) {
    // The secret check, before anything of the gang is exchanged: rank 0 publishes it (or finds
    // what an earlier publisher left), every other rank compares. A mismatch means the store at
    // this address is not this attempt's (a stale rank 0 or a stranger's store).
    const std::string mine = SecretCheck(options.secret);
    const std::vector<uint8_t> want(mine.begin(), mine.end());
    std::vector<uint8_t> found;
    bool absent = false;
    s = Guard("rendezvous", [&] {
      if (options.rank == 0) {
        found = gang_store->compareSet("secret-check", {}, want);
        return;
      }
      try {
        found = gang_store->get("secret-check");  // waits up to join_timeout
      } catch (const c10::DistStoreError&) {
        absent = true;
      }
    });
    if (s.ok() && (absent || found != want)) {
      return absl::UnavailableError(absl::StrCat(
          "gang rendezvous store at ", options.rendezvous, " is not this attempt's (gang ",
          options.key, "): its secret check value is ",
          absent ? absl::StrCat("absent after ", options.join_timeout.count(), " ms")
                 : "derived from another secret",
          "; rank 0 of this attempt does not serve it (a stale or foreign store at that "
          "address)"));
    }
  }
  if (s.ok()) {
    s = Guard("rendezvous", [&] {
      impl->store =
          c10::make_intrusive<c10d::PrefixStore>(SecretKeyPrefix(options.secret), gang_store);
      // Join barrier with its own deadline: every rank of THIS gang (keys carry the gang's key)
      // must arrive within join_timeout. A rank of another attempt that reached the same store
      // never sees these keys and gives up at the deadline instead of waiting in Gloo's
      // rendezvous for the whole collective timeout.
      impl->store->set(absl::StrCat("joined/", options.rank), std::vector<uint8_t>{'1'});
      std::vector<std::string> keys;
      for (int r = 0; r < options.world_size; ++r) keys.push_back(absl::StrCat("joined/", r));
      impl->store->wait(keys, options.join_timeout);
#if MQ_WITH_NCCL
      if (options.device.is_cuda()) {
        auto no = c10d::ProcessGroupNCCL::Options::create();
        no->timeout = options.timeout;
        impl->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl->store, options.rank,
                                                               options.world_size, no);
        impl->device = options.device;
        return;
      }
#endif
      auto go = c10d::ProcessGroupGloo::Options::create();
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(options.local_host));
      go->timeout = options.timeout;
      impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, options.rank,
                                                             options.world_size, go);
    });
  }
  if (!s.ok()) {
    std::string cause(s.message());
    if (const std::string lead = "gang rendezvous failed: "; cause.rfind(lead, 0) == 0) {
      cause.erase(0, lead.size());
    }
    return absl::UnavailableError(join_failed + cause);
  }
  const bool nccl = impl->device.is_cuda();
  auto gang = std::unique_ptr<Gang>(new Gang(options.rank, options.world_size, std::move(impl)));
  gang->nccl_ = nccl;
  return gang;
}

at::Tensor Gang::ForBackend(const at::Tensor& t) const {
  if (impl_->device.is_cuda()) return t.to(impl_->device).contiguous();
  return t.to(at::kCPU, at::isFloatingType(t.scalar_type()) ? at::kFloat : t.scalar_type())
      .contiguous();
}

absl::Status Gang::AllReduceSum(at::Tensor& t) {
  if (size_ == 1) return absl::OkStatus();
  return Exchange("all-reduce", [&] {
    std::vector<at::Tensor> v{ForBackend(t)};
    impl_->pg->allreduce(v)->wait(impl_->timeout);
    t.copy_(v[0]);
  });
}

absl::Status Gang::Broadcast(at::Tensor& t, int root) {
  if (size_ == 1) return absl::OkStatus();
  return Exchange("broadcast", [&] {
    std::vector<at::Tensor> v{ForBackend(t)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    impl_->pg->broadcast(v, o)->wait(impl_->timeout);
    t.copy_(v[0]);
  });
}

absl::StatusOr<at::Tensor> Gang::AllToAllRows(const at::Tensor& send,
                                                   const std::vector<int64_t>& send_counts,
                                                   const std::vector<int64_t>& recv_counts) {
  if (size_ == 1) return send;
  int64_t total = 0;
  for (int64_t c : recv_counts) total += c;
  at::Tensor src = ForBackend(send);
  std::vector<int64_t> shape = src.sizes().vec();
  shape[0] = total;
  at::Tensor recv = at::empty(shape, src.options());
  // Split sizes are rows (dim 0), as c10d expects.
  std::vector<int64_t> out_splits = recv_counts, in_splits = send_counts;
  absl::Status s = Exchange("all-to-all", [&] {
    impl_->pg->alltoall_base(recv, src, out_splits, in_splits)->wait(impl_->timeout);
  });
  if (!s.ok()) return s;
  return recv;
}

absl::Status Gang::Barrier() {
  if (size_ == 1) return absl::OkStatus();
  // A tiny all-reduce: Gloo's barrier needs no tensors but behaves the same.
  at::Tensor t = at::zeros({1}, at::kLong);
  return AllReduceSum(t);
}

}  // namespace mq::pipeline
