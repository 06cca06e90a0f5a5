#include "worker/pipeline/gang.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <exception>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace mq::pipeline {

struct Gang::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  std::chrono::milliseconds timeout;
};

namespace {

// Runs a c10d call; any exception (a peer closed its connection, a timeout) is UNAVAILABLE.
template <typename Fn>
absl::Status Guard(const char* what, Fn&& fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("gang ", what, " failed: ", e.what()));
  }
}

}  // namespace

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
  auto impl = std::make_unique<Impl>();
  impl->timeout = options.timeout;
  absl::Status s = Guard("rendezvous", [&] {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = options.rank == 0;
    so.numWorkers = options.world_size;
    so.waitWorkers = true;
    so.timeout = options.join_timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(options.rendezvous.substr(0, colon), so);
    impl->store = c10::make_intrusive<c10d::PrefixStore>("mq-gang/" + options.key, tcp);
    auto go = c10d::ProcessGroupGloo::Options::create();
    go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(options.local_host));
    go->timeout = options.timeout;
    impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, options.rank,
                                                           options.world_size, go);
  });
  if (!s.ok()) return s;
  return std::unique_ptr<Gang>(new Gang(options.rank, options.world_size, std::move(impl)));
}

absl::Status Gang::AllReduceSum(at::Tensor& t) {
  if (size_ == 1) return absl::OkStatus();
  return Guard("all-reduce", [&] {
    std::vector<at::Tensor> v{t};
    impl_->pg->allreduce(v)->wait(impl_->timeout);
  });
}

absl::Status Gang::Broadcast(at::Tensor& t, int root) {
  if (size_ == 1) return absl::OkStatus();
  return Guard("broadcast", [&] {
    std::vector<at::Tensor> v{t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    impl_->pg->broadcast(v, o)->wait(impl_->timeout);
  });
}

absl::StatusOr<at::Tensor> Gang::AllToAllRows(const at::Tensor& send,
                                              const std::vector<int64_t>& send_counts,
                                              std::vector<int64_t>* recv_counts) {
  recv_counts->assign(size_, 0);
  if (size_ == 1) {
    (*recv_counts)[0] = send_counts.at(0);
    return send;
  }
  at::Tensor counts_out = at::tensor(send_counts, at::kLong);
  at::Tensor counts_in = at::empty({size_}, at::kLong);
  std::vector<int64_t> ones(size_, 1);
  absl::Status s = Guard("count exchange", [&] {
    impl_->pg->alltoall_base(counts_in, counts_out, ones, ones)->wait(impl_->timeout);
  });
  if (!s.ok()) return s;
  for (int r = 0; r < size_; ++r) (*recv_counts)[r] = counts_in[r].item<int64_t>();
  return AllToAllRowsKnown(send, send_counts, *recv_counts);
}

absl::StatusOr<at::Tensor> Gang::AllToAllRowsKnown(const at::Tensor& send,
                                                   const std::vector<int64_t>& send_counts,
                                                   const std::vector<int64_t>& recv_counts) {
  if (size_ == 1) return send;
  int64_t total = 0;
  for (int64_t c : recv_counts) total += c;
  std::vector<int64_t> shape = send.sizes().vec();
  shape[0] = total;
  at::Tensor recv = at::empty(shape, send.options());
  // Gloo's all-to-all moves flat elements: split sizes are rows (dim 0), as c10d expects.
  std::vector<int64_t> out_splits = recv_counts, in_splits = send_counts;
  at::Tensor src = send.contiguous();
  absl::Status s = Guard("all-to-all", [&] {
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
