// Torch glue for FP8 block dequantization (see kernels/torch/fp8_ops.h).
#include "kernels/torch/fp8_ops.h"

#include <ATen/ATen.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/torch/glue.h"
#include "mq/kernels/fp8_dequant.h"

#if MQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mq::kernels {

absl::Status Fp8DequantTorchSupported(const c10::Device& device) {
  return glue::SupportedOn(device, "the FP8 dequantization kernel", Fp8BlockDequantIsSupported);
}

absl::StatusOr<at::Tensor> Fp8BlockDequantCuda(const at::Tensor& codes,
                                               const at::Tensor& scale_inv) {
  if (!codes.defined() || codes.dim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("codes has shape ", glue::Sizes(codes), ": must be 2-D [R, C]"));
  }
  if (!codes.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("codes is on ", codes.device().str(), ": must be on a CUDA device"));
  }
  const int64_t rows = codes.size(0);
  const int64_t cols = codes.size(1);
  if (absl::Status s = glue::Check(codes, "codes", at::kByte, {rows, cols}, codes.device());
      !s.ok()) {
    return s;
  }
  if (absl::Status s = glue::Check(scale_inv, "scale_inv", at::kFloat,
                                   {Fp8ScaleBlocks(rows), Fp8ScaleBlocks(cols)}, codes.device());
      !s.ok()) {
    return s;
  }
#if MQ_WITH_CUDA
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty({rows, cols}, codes.options().dtype(at::kBFloat16));
  if (absl::Status s = LaunchFp8BlockDequant(
          codes.data_ptr<uint8_t>(), scale_inv.data_ptr<float>(), rows, cols,
          reinterpret_cast<uint16_t*>(out.data_ptr()),
          c10::cuda::getCurrentCUDAStream(codes.device().index()).stream());
      !s.ok()) {
    return s;
  }
  return out;
#else
  return absl::UnimplementedError(
      "mq was built without CUDA: reconfigure with -DMQ_ENABLE_CUDA=ON on a machine with nvcc");
#endif
}

}  // namespace mq::kernels
