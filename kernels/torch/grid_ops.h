// Torch glue for the MSE grid search kernel (mq/kernels/grid_search.h): checks the ATen input
// with messages naming the argument, allocates the outputs on the input's device, takes the
// current CUDA stream and calls the launcher. Built only with MQ_WITH_TORCH (target
// mq_kernels_torch); without MQ_ENABLE_CUDA every entry point answers Unimplemented.
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: calls from several threads are safe; GridSearchTorchSupported caches its answer per
// device behind a mutex.
#pragma once

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "mq/kernels/grid_search.h"

namespace mq::kernels {

// OK when the grid search kernel can run for tensors on `device` (a CUDA device this binary has
// kernel code for); the reason otherwise. The answer for a CUDA device is computed once per
// process and device.
absl::Status GridSearchTorchSupported(const c10::Device& device);

// MSE grid search of `w` (fp32 [R, C], contiguous, on a CUDA device) under `config` (see
// mq/kernels/grid_search.h). On success `*scales` is a new fp32 [R, G] tensor on w's device and
// `*zero_points` a new fp32 [R, G] tensor when asymmetric, undefined when symmetric
// (G = GridSearchGroups(C, config.group_size)). The work is enqueued on the current stream of w's
// device; results are stream-ordered like any ATen op. InvalidArgument naming the argument for a
// bad tensor or config; Internal when the launch fails; Unimplemented without CUDA.
absl::Status GridSearchMse(const at::Tensor& w, const GridSearchConfig& config, at::Tensor* scales,
                           at::Tensor* zero_points);

}  // namespace mq::kernels
