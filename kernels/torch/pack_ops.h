// Torch glue for the int4 packing kernels (mq/kernels/pack.h), part of the one torch-aware layer
// over kernels/ (STYLE.md item 11): checks device, dtype, contiguity and shape with messages
// naming the argument, allocates the outputs on the input's device, takes the current CUDA
// stream and calls the launcher. Built only with MQ_WITH_TORCH (target mq_kernels_torch);
// without MQ_ENABLE_CUDA every entry point answers Unimplemented.
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: calls from several threads are safe (the support answer is cached per device under
// a mutex; launches are stream-ordered).
#pragma once

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"

namespace mq::kernels {

// OK when PackInt4Cuda can run for tensors on `device` (a CUDA device, kernels built and holding
// code for it); the reason otherwise. The answer for each device is computed once and cached.
absl::Status PackInt4TorchSupported(const c10::Device& device);

struct PackInt4CudaResult {
  at::Tensor packed;        // int32 [R, ceil(C/8)] on the codes' device
  at::Tensor out_of_range;  // int64 [1] on the same device: number of codes outside [-8, 7]
};

// Packs contiguous int8 codes [R, C] on a CUDA device along dim 1 (the layout of
// mq/kernels/pack.h). Enqueued on the current stream of the codes' device; returns without
// synchronizing, so out_of_range must be read (e.g. with .item(), which waits) before `packed`
// is trusted. InvalidArgument naming `codes` when it is not a 2-D contiguous int8 CUDA tensor or
// `out` is null; the launcher's errors otherwise.
absl::Status PackInt4Cuda(const at::Tensor& codes, PackInt4CudaResult* out);

}  // namespace mq::kernels
