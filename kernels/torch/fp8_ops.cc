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
  using glue::Sizes;
  if (!codes.defined() || codes.dim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("codes has shape ", Sizes(codes), ": must be 2-D [R, C]"));
  }
  if (!codes.is_cuda() || codes.scalar_type() != at::kByte || !codes.is_contiguous()) {
    return absl::InvalidArgumentError(
        absl::StrCat("codes (", std::string(c10::toString(codes.scalar_type())), " on ",
                     codes.device().str(), "): must be contiguous uint8 on a CUDA device"));
  }
  const int64_t rows = codes.size(0);
  const int64_t cols = codes.size(1);
  if (!scale_inv.defined() || scale_inv.dim() != 2 ||
      scale_inv.size(0) != Fp8ScaleBlocks(rows) || scale_inv.size(1) != Fp8ScaleBlocks(cols)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scale_inv has shape ", Sizes(scale_inv), ": must be [", Fp8ScaleBlocks(rows), ", ",
        Fp8ScaleBlocks(cols), "] for codes of shape ", Sizes(codes)));
  }
  if (scale_inv.device() != codes.device() || scale_inv.scalar_type() != at::kFloat ||
      !scale_inv.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scale_inv (", std::string(c10::toString(scale_inv.scalar_type())), " on ",
        scale_inv.device().str(), "): must be contiguous float32 on ", codes.device().str()));
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
