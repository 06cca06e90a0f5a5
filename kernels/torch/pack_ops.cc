// Torch glue for int4 packing (see kernels/torch/pack_ops.h).
#include "kernels/torch/pack_ops.h"

#include <ATen/ATen.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/torch/glue.h"
#include "mq/kernels/pack.h"

#if MQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mq::kernels {
namespace {

using glue::Sizes;

}  // namespace

absl::Status PackInt4TorchSupported(const c10::Device& device) {
  return glue::SupportedOn(device, "the int4 packing kernels", PackInt4IsSupported);
}

absl::Status PackInt4Cuda(const at::Tensor& codes, PackInt4CudaResult* out) {
  if (out == nullptr) return absl::InvalidArgumentError("out is null");
  if (!codes.defined() || codes.dim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("codes has shape ", Sizes(codes), ": must be 2-D [R, C]"));
  }
  if (!codes.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("codes is on ", codes.device().str(), ": must be on a CUDA device"));
  }
  if (codes.scalar_type() != at::kChar) {
    return absl::InvalidArgumentError(
        absl::StrCat("codes has dtype ", std::string(c10::toString(codes.scalar_type())),
                     ": must be ", std::string(c10::toString(at::kChar)), " (int8)"));
  }
  if (!codes.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat("codes ", Sizes(codes), " must be contiguous"));
  }
#if MQ_WITH_CUDA
  const int64_t rows = codes.size(0);
  const int64_t cols = codes.size(1);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor packed = at::empty({rows, Int4PackedWords(cols)}, codes.options().dtype(at::kInt));
  at::Tensor out_of_range = at::zeros({1}, codes.options().dtype(at::kLong));
  if (absl::Status s =
          LaunchPackInt4(codes.data_ptr<int8_t>(), rows, cols, cols, packed.data_ptr<int32_t>(),
                         out_of_range.data_ptr<int64_t>(),
                         c10::cuda::getCurrentCUDAStream(codes.device().index()).stream());
      !s.ok()) {
    return s;
  }
  out->packed = std::move(packed);
  out->out_of_range = std::move(out_of_range);
  return absl::OkStatus();
#else
  return absl::UnimplementedError(
      "mq was built without CUDA: reconfigure with -DMQ_ENABLE_CUDA=ON on a machine with nvcc");
#endif
}

}  // namespace mq::kernels
