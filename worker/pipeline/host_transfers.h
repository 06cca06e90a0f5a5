// Hidden-state chunks between page-locked host memory and the compute device (gang_runner.h).
//
// On a CUDA device with overlap on, the copies run on a copy stream beside the compute stream,
// so that PCIe transfers overlap the layer's kernels: a sequence of uploads keeps the next
// chunk's copy in flight while the current chunk computes, and downloads are queued without
// waiting. Elsewhere (a CPU device, or overlap off) every call is a plain copy and Wait() does
// nothing.
//
// Host tensors come from AllocateHost: on a CUDA device page-locked (so that copies can run
// asynchronously) and packed into slabs (worker/model/plan.h PlanPinnedSlabs: torch's pinned
// allocator rounds every allocation up to a power of two, which one tensor per chunk would pay
// for with up to 2x, 14% for DeepSeek-V3's chunks); a slab is freed when the last of its tensors
// is.
//
// Contract: a device tensor from Uploads::Next() may be used on the compute stream (the current
// stream of the device when Next() is called) at once; a host tensor written by DownloadInto()
// holds its bytes only after Wait(), except for an Upload of it, which the copy stream orders
// after the download. Device memory: at most two chunks of an upload sequence are on the device
// at once.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: one thread (the runner's) uses an instance and the Uploads it returned.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <vector>

namespace mq::pipeline {

class HostTransfers {
 public:
  HostTransfers(at::Device device, bool overlap);
  ~HostTransfers();
  HostTransfers(const HostTransfers&) = delete;
  HostTransfers& operator=(const HostTransfers&) = delete;

  // Whether copies run on a copy stream (a CUDA device with overlap on).
  bool overlapping() const;

  // Device copies of `hosts` (host tensors), in order.
  class Uploads {
   public:
    Uploads(Uploads&&) noexcept;
    ~Uploads();
    // The next host tensor's device copy, ready for the compute stream; queues the copy of the
    // one after it. Called at most hosts.size() times.
    at::Tensor Next();

   private:
    friend class HostTransfers;
    struct Pending;
    Uploads(HostTransfers* owner, std::vector<at::Tensor> hosts);
    void Queue(size_t i);
    HostTransfers* owner_;
    std::vector<at::Tensor> hosts_;
    size_t next_ = 0;
    std::vector<std::unique_ptr<Pending>> pending_;  // by index; empty once handed out
  };
  Uploads Upload(std::vector<at::Tensor> hosts);

  // Host tensors of these shapes and `dtype`, in order (see above).
  std::vector<at::Tensor> AllocateHost(const std::vector<std::vector<int64_t>>& shapes,
                                       at::ScalarType dtype) const;

  // Copies `t` (device, written on the compute stream) into `host` (from AllocateHost, same shape
  // and dtype).
  void DownloadInto(const at::Tensor& t, const at::Tensor& host);

  // Blocks until every queued copy is done.
  void Wait();

 private:
  struct Streams;
  at::Device device_;
  std::unique_ptr<Streams> streams_;  // null: plain copies
};

// A second CUDA stream of a device (one per instance, from torch's pool) for work that runs
// beside the compute stream on another thread: Run(fn) makes it fn's current stream and waits for
// it before returning, so the tensors fn made are complete and may be used on any stream. They
// come from this stream's pool of the caching allocator, and blocks freed there are reused only by
// later work on this stream: the caller must not free such a tensor while another stream's work
// on it is still queued. On a CPU device Run(fn) just calls fn. One thread at a time.
class SideStream {
 public:
  explicit SideStream(at::Device device);
  ~SideStream();
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  void Run(const std::function<void()>& fn) const;

 private:
  struct Stream;
  std::unique_ptr<Stream> stream_;  // null: a CPU device
};

}  // namespace mq::pipeline
