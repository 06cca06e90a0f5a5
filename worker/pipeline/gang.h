// A gang: the K worker processes running one quantize attempt together, joined in one c10d
// process group (the rendezvous store is served by rank 0 at the address the coordinator hands
// out, listening on rank 0's gang host only; its keys live under the attempt's secret): NCCL
// between CUDA devices when built with MQ_ENABLE_NCCL, else Gloo, which moves tensors through host
// memory (floating point as fp32, exact for bf16). Collectives used by the layer pipeline: sum
// all-reduce, broadcast, and an all-to-all of rows with per-rank counts (token dispatch to expert
// owners and back, and the row counts ahead of it).
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: one thread drives a gang; collectives are called in the same order on every rank.
// Failure: a peer that dies closes its connections, so a pending collective fails quickly with
// UNAVAILABLE (an infrastructure error: the attempt is retried, not counted). A gang of one
// needs no store and no network; every collective is then a local no-op.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mq::pipeline {

struct GangOptions {
  int rank = 0;
  int world_size = 1;
  // HOST:PORT of the rendezvous store; rank 0 serves it on PORT, listening on `local_host`
  // only (not on every interface).
  std::string rendezvous;
  // Names this gang (e.g. "<job>/<attempt>"): the store keys are prefixed with it, so a rank of
  // an older attempt reaching the same rendezvous address can never join this one.
  std::string key = "gang";
  // The attempt's rendezvous secret (issued by the coordinator, the same on every rank;
  // required when world_size > 1). Every store key lives under a value derived from it, and
  // rank 0 publishes a check value derived from it that the other ranks verify before the
  // process group forms. c10d's store has no authentication: this keeps the keys of anyone
  // without the secret apart from the gang's, it does not keep them out. Never logged.
  std::string secret;
  // The compute device: a CUDA device selects NCCL when the build has it.
  at::Device device = at::kCPU;
  // This process's address as its peers reach it (Gloo binds to it; rank 0's store listens
  // on it): an IP literal or a name resolving to an address of this host.
  std::string local_host = "127.0.0.1";
  // How long joining may take (every rank must arrive) before failing with UNAVAILABLE.
  std::chrono::milliseconds join_timeout{std::chrono::minutes(2)};
  // How long one collective may wait for the slowest rank (a layer's solve) before failing.
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
};

class Gang {
 public:
  // Joins the gang (blocks until every rank joined or `timeout`). UNAVAILABLE when the
  // rendezvous fails: rank 0 cannot listen on local_host:PORT, the store cannot be reached, or
  // the store's check value is absent or was derived from another secret (a stale or foreign
  // store); INVALID_ARGUMENT for bad options.
  static absl::StatusOr<std::unique_ptr<Gang>> Join(const GangOptions& options);
  ~Gang();

  int rank() const { return rank_; }
  int size() const { return size_; }

  // Tensors may live on any device and have any dtype: each collective moves them to the
  // backend's device (and Gloo's floating dtype) and results come back as described.
  // Whether collectives run on the compute device (NCCL) rather than through host memory.
  bool on_device() const { return nccl_; }
  // In-place element-wise sum over the gang (float, double or int64 tensors, any device).
  absl::Status AllReduceSum(at::Tensor& t);
  // In-place: every rank gets `root`'s tensor (same shape and dtype on every rank).
  absl::Status Broadcast(at::Tensor& t, int root);
  // `send` holds rows grouped by destination rank, send_counts[r] rows for rank r; every rank
  // knows what it receives, recv_counts[r] rows from rank r. Returns the rows received, grouped
  // by source rank in rank order, on the backend's device (Gloo: CPU, floating point as fp32).
  absl::StatusOr<at::Tensor> AllToAllRows(const at::Tensor& send,
                                               const std::vector<int64_t>& send_counts,
                                               const std::vector<int64_t>& recv_counts);
  absl::Status Barrier();
  // Wall seconds spent in collectives so far (each timed after the work queued before it
  // finished, so compute is not counted; waiting for a slower rank is).
  double exchange_seconds() const { return exchange_seconds_; }

 private:
  // Runs one collective: UNAVAILABLE when it fails; its time goes to exchange_seconds.
  absl::Status Exchange(const char* what, const std::function<void()>& fn);
  struct Impl;
  Gang(int rank, int size, std::unique_ptr<Impl> impl);
  // `t` on the backend's device and dtype.
  at::Tensor ForBackend(const at::Tensor& t) const;
  int rank_;
  int size_;
  bool nccl_ = false;
  double exchange_seconds_ = 0;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mq::pipeline
