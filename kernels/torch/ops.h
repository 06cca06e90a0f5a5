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
#include "mq/kernels/hessian_factor.h"

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
//   w0        fp32 [B, I, O] contiguous copy of wt before the solve: the Cholesky-feedback form
//             (u then holds R); undefined: GPTQ's inverse-factor form
// Enqueued on the current stream of wt's device; returns after the launches.
absl::Status GptqSolveBatched(const at::Tensor& wt, const std::vector<at::Tensor>& u,
                              const std::vector<at::Tensor>& perm, const at::Tensor& scales_t,
                              const at::Tensor& zeros_t, const at::Tensor& codes_t, int bits,
                              int64_t group_size, GptqUpdateMath math,
                              const at::Tensor& w0 = at::Tensor());

// OK when the GPU Hessian factorisation (mq/kernels/hessian_factor.h) can run on `device`.
absl::Status InverseFactorTorchSupported(const c10::Device& device);

// The factor of `form` (mq/kernels/hessian_factor.h: GPTQ's normalized upper factor of a⁻¹, or
// the Cholesky-feedback matrix) on CUDA: `a` fp64 or fp32
// [n, n] contiguous, symmetric, OVERWRITTEN. Sets *u to a new fp32 [n, n] tensor and *status to
// a new int32 device scalar (0 = valid; 1-3 as in the header), both on a's device, enqueued on
// the current stream without a host sync.
absl::Status InverseFactor(const at::Tensor& a, FactorForm form, at::Tensor* u, at::Tensor* status);

}  // namespace mq::kernels
