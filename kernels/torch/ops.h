// The one torch-aware layer over kernels/ (STYLE.md item 11): checks device, dtype, contiguity
// and shapes of ATen tensors with messages naming the argument, takes the current CUDA stream,
// allocates workspaces and calls the raw launchers. Built only with MQ_WITH_TORCH (target
// mq_kernels_torch); without MQ_ENABLE_CUDA every entry point answers Unimplemented.
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: stateless; calls on one device from several threads are safe (stream-ordered).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "mq/kernels/gptq.h"

namespace mq::kernels {

// OK when the GPTQ CUDA path can run for tensors on `device` (a CUDA device, kernels built and
// supported there); the reason otherwise.
absl::Status GptqTorchSupported(const c10::Device& device);

// The batched GPTQ solve (mq/kernels/gptq.h) on CUDA tensors of one device:
//   wt        fp32 [B, I, O] contiguous, updated in place
//   u         B tensors fp32 [I, I] contiguous (may repeat: shared Hessians)
//   perm      B tensors int32 [I] contiguous
//   scales_t  fp32 [B, G, O] contiguous, G = ceil(I / group_size)
//   zeros_t   fp32 [B, G, O] contiguous, or undefined (symmetric)
//   codes_t   int8 [B, I, O] contiguous (output)
// Enqueued on the current stream of wt's device; returns after the launches.
absl::Status GptqSolveBatched(const at::Tensor& wt, const std::vector<at::Tensor>& u,
                              const std::vector<at::Tensor>& perm, const at::Tensor& scales_t,
                              const at::Tensor& zeros_t, const at::Tensor& codes_t, int bits,
                              int64_t group_size, GptqUpdateMath math);

}  // namespace mq::kernels
