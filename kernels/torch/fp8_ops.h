// Torch glue for FP8 block dequantization (mq/kernels/fp8_dequant.h), part of the one torch-aware
// layer over kernels/ (STYLE.md item 11): checks device, dtype, contiguity and shapes with
// messages naming the argument, allocates the output on the input's device, takes the current
// CUDA stream and calls the launcher. Built only with MQ_WITH_TORCH (target mq_kernels_torch);
// without MQ_ENABLE_CUDA every entry point answers Unimplemented.
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: calls from several threads are safe (the support answer is cached per device under
// a mutex; launches are stream-ordered).
#pragma once

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"

namespace mq::kernels {

// OK when the FP8 dequantization kernel can run for tensors on `device`; the reason otherwise.
// The answer for each device is computed once and cached.
absl::Status Fp8DequantTorchSupported(const c10::Device& device);

// bf16 [R, C] = fp8 codes [R, C] (uint8, contiguous, CUDA) times their 128×128 block's
// scale_inv (fp32 [ceil(R/128), ceil(C/128)], contiguous, same device), bit for bit the CPU
// reference's values. Enqueued on the current stream of the codes' device; returns without
// synchronizing. InvalidArgument naming the argument that is wrong; the launcher's errors
// otherwise.
absl::StatusOr<at::Tensor> Fp8BlockDequantCuda(const at::Tensor& codes, const at::Tensor& scale_inv);

}  // namespace mq::kernels
