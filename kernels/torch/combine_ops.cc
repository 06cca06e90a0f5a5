// Torch glue for the MoE combine kernel (see kernels/torch/combine_ops.h).
#include "kernels/torch/combine_ops.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "kernels/torch/glue.h"
#include "mq/kernels/moe_combine.h"

#if MQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mq::kernels {

absl::Status MoeCombineTorchSupported(const c10::Device& device) {
  return glue::SupportedOn(device, "the MoE combine kernel", MoeCombineIsSupported);
}

absl::Status MoeCombineCuda(const at::Tensor& rows, const at::Tensor& weights,
                            const at::Tensor& entries, const at::Tensor& column_tokens,
                            at::Tensor& out) {
  if (!rows.defined() || rows.dim() != 2 || !rows.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows has shape ", glue::Sizes(rows), ": must be 2-D [N, C] on CUDA"));
  }
  if (!entries.defined() || entries.dim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("entries has shape ", glue::Sizes(entries), ": must be 2-D [k, T]"));
  }
  const c10::Device device = rows.device();
  const int64_t n = rows.size(0), c = rows.size(1), k = entries.size(0), t = entries.size(1);
  if (absl::Status s = glue::Check(rows, "rows", at::kBFloat16, {n, c}, device); !s.ok()) return s;
  if (absl::Status s = glue::Check(weights, "weights", at::kFloat, {n}, device); !s.ok()) return s;
  if (absl::Status s = glue::Check(entries, "entries", at::kLong, {k, t}, device); !s.ok()) {
    return s;
  }
  if (absl::Status s = glue::Check(column_tokens, "column_tokens", at::kLong, {t}, device);
      !s.ok()) {
    return s;
  }
  if (!out.defined() || out.dim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("out has shape ", glue::Sizes(out), ": must be 2-D [M, ", c, "]"));
  }
  if (absl::Status s = glue::Check(out, "out", at::kBFloat16, {out.size(0), c}, device); !s.ok()) {
    return s;
  }
#if MQ_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  return LaunchMoeCombine(reinterpret_cast<const uint16_t*>(rows.data_ptr()),
                          weights.data_ptr<float>(), n, c, entries.data_ptr<int64_t>(), k, t,
                          column_tokens.data_ptr<int64_t>(),
                          reinterpret_cast<uint16_t*>(out.data_ptr()), out.size(0),
                          c10::cuda::getCurrentCUDAStream(device.index()).stream());
#else
  return absl::UnimplementedError(
      "mq was built without CUDA: reconfigure with -DMQ_ENABLE_CUDA=ON on a machine with nvcc");
#endif
}

}  // namespace mq::kernels
