// Torch glue for the MoE combine kernel (mq/kernels/moe_combine.h), part of the one torch-aware
// layer over kernels/ (STYLE.md item 11): checks devices, dtypes, contiguity and shapes with
// messages naming the argument, takes the current CUDA stream and calls the launcher. Built only
// with MQ_WITH_TORCH (target mq_kernels_torch); without MQ_ENABLE_CUDA it answers Unimplemented.
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
#pragma once

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"

namespace mq::kernels {

// OK when the combine kernel can run for tensors on `device`; the reason otherwise (cached per
// device).
absl::Status MoeCombineTorchSupported(const c10::Device& device);

// out[column_tokens[t]] gets token t's rows (entries[:, t], by ascending expert) weighted and
// summed as the header above says. rows bf16 [N, C], weights fp32 [N], entries int64 [k, T],
// column_tokens int64 [T], out bf16 [M, C]: all contiguous on one CUDA device. Enqueued on that
// device's current stream. InvalidArgument naming the argument that is wrong.
absl::Status MoeCombineCuda(const at::Tensor& rows, const at::Tensor& weights,
                            const at::Tensor& entries, const at::Tensor& column_tokens,
                            at::Tensor& out);

}  // namespace mq::kernels
