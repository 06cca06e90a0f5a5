#include "worker/pipeline/host_transfers.h"

#include <utility>

#include "worker/model/plan.h"

#if MQ_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mq::pipeline {

#if MQ_WITH_CUDA
namespace {

// `device` with its index: the current CUDA device when it names none.
at::Device Indexed(at::Device device) {
  return device.has_index() ? device : at::Device(at::kCUDA, c10::cuda::current_device());
}

// A stream of torch's pool on CUDA `device`.
c10::cuda::CUDAStream PooledStream(at::Device device) {
  return c10::cuda::getStreamFromPool(/*isHighPriority=*/false, Indexed(device).index());
}

}  // namespace

struct HostTransfers::Streams {
  explicit Streams(at::Device device) : copy(PooledStream(device)) {}
  c10::cuda::CUDAStream compute() const {
    return c10::cuda::getCurrentCUDAStream(copy.device_index());
  }
  // The copy stream waits for what the compute stream has queued so far.
  void CopyAfterCompute() const {
    at::cuda::CUDAEvent queued;
    queued.record(compute());
    queued.block(copy);
  }
  c10::cuda::CUDAStream copy;
};

struct HostTransfers::Uploads::Pending {
  at::Tensor device;
  at::cuda::CUDAEvent copied;
};
#else
struct HostTransfers::Streams {};
struct HostTransfers::Uploads::Pending {
  at::Tensor device;
};
#endif

HostTransfers::HostTransfers(at::Device device, bool overlap) : device_(device) {
#if MQ_WITH_CUDA
  if (overlap && device.is_cuda()) {
    device_ = Indexed(device_);
    streams_ = std::make_unique<Streams>(device_);
  }
#else
  (void)overlap;
#endif
}

HostTransfers::~HostTransfers() = default;

bool HostTransfers::overlapping() const { return streams_ != nullptr; }

HostTransfers::Uploads::Uploads(HostTransfers* owner, std::vector<at::Tensor> hosts)
    : owner_(owner), hosts_(std::move(hosts)) {
  pending_.resize(hosts_.size());
}

HostTransfers::Uploads::Uploads(Uploads&&) noexcept = default;
HostTransfers::Uploads::~Uploads() = default;

void HostTransfers::Uploads::Queue(size_t i) {
  auto p = std::make_unique<Pending>();
#if MQ_WITH_CUDA
  if (owner_->streams_) {
    const Streams& s = *owner_->streams_;
    // Allocated for the compute stream, whose earlier work may still use the block: the copy
    // waits for it, and the block is not reused before the copy is done even if the tensor is
    // dropped unused.
    p->device = at::empty(hosts_[i].sizes(), hosts_[i].options().device(owner_->device_));
    s.CopyAfterCompute();
    {
      const c10::cuda::CUDAStreamGuard guard(s.copy);
      p->device.copy_(hosts_[i], /*non_blocking=*/true);
    }
    p->device.record_stream(s.copy);
    p->copied.record(s.copy);
    pending_[i] = std::move(p);
    return;
  }
#endif
  p->device = hosts_[i].to(owner_->device_);
  pending_[i] = std::move(p);
}

at::Tensor HostTransfers::Uploads::Next() {
  const size_t i = next_++;
  if (i == 0 && !hosts_.empty()) Queue(0);
  if (i + 1 < hosts_.size()) Queue(i + 1);
  std::unique_ptr<Pending> p = std::move(pending_.at(i));
#if MQ_WITH_CUDA
  if (owner_->streams_) p->copied.block(owner_->streams_->compute());
#endif
  hosts_[i] = at::Tensor();  // the caller keeps it if it needs it
  return std::move(p->device);
}

HostTransfers::Uploads HostTransfers::Upload(std::vector<at::Tensor> hosts) {
  return Uploads(this, std::move(hosts));
}

std::vector<at::Tensor> HostTransfers::AllocateHost(const std::vector<std::vector<int64_t>>& shapes,
                                                    at::ScalarType dtype) const {
  std::vector<at::Tensor> out;
  const auto options = at::TensorOptions().dtype(dtype);
  if (!device_.is_cuda()) {
    for (const std::vector<int64_t>& shape : shapes) out.push_back(at::empty(shape, options));
    return out;
  }
  const int64_t item = static_cast<int64_t>(c10::elementSize(dtype));
  std::vector<int64_t> bytes;
  for (const std::vector<int64_t>& shape : shapes) {
    bytes.push_back(item * static_cast<int64_t>(c10::multiply_integers(shape)));
  }
  for (const model::PinnedSlab& slab : model::PlanPinnedSlabs(bytes)) {
    const at::Tensor block =
        at::empty({slab.bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    for (int64_t k = 0; k < slab.count; ++k) {
      const size_t i = static_cast<size_t>(slab.first + k);
      out.push_back(block.narrow(0, slab.offsets[k], bytes[i]).view(dtype).view(shapes[i]));
    }
  }
  return out;
}

void HostTransfers::DownloadInto(const at::Tensor& t, const at::Tensor& host) {
#if MQ_WITH_CUDA
  if (streams_ && t.is_cuda()) {
    streams_->CopyAfterCompute();
    {
      const c10::cuda::CUDAStreamGuard guard(streams_->copy);
      host.copy_(t, /*non_blocking=*/true);
    }
    t.record_stream(streams_->copy);  // t's block is not reused before the copy is done
    return;
  }
#endif
  host.copy_(t);
}

void HostTransfers::Wait() {
#if MQ_WITH_CUDA
  if (streams_) streams_->copy.synchronize();
#endif
}

#if MQ_WITH_CUDA
struct SideStream::Stream {
  explicit Stream(at::Device device) : stream(PooledStream(device)) {}
  c10::cuda::CUDAStream stream;
};
#else
struct SideStream::Stream {};
#endif

SideStream::SideStream(at::Device device) {
#if MQ_WITH_CUDA
  if (device.is_cuda()) stream_ = std::make_unique<Stream>(device);
#else
  (void)device;
#endif
}

SideStream::~SideStream() = default;

void SideStream::Run(const std::function<void()>& fn) const {
#if MQ_WITH_CUDA
  if (stream_) {
    c10::cuda::CUDAStreamGuard on_side(stream_->stream);
    fn();
    stream_->stream.synchronize();
    return;
  }
#endif
  fn();
}

}  // namespace mq::pipeline
