// Torch glue for the MSE grid search kernel (see kernels/torch/grid_ops.h).
#include "kernels/torch/grid_ops.h"

#include <ATen/ATen.h>

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/torch/glue.h"

#if MQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mq::kernels {
namespace {

using glue::Sizes;

}  // namespace

absl::Status GridSearchTorchSupported(const c10::Device& device) {
  return glue::SupportedOn(device, "the grid search kernels", GridSearchIsSupported);
}

absl::Status GridSearchMse(const at::Tensor& w, const GridSearchConfig& config, at::Tensor* scales,
                           at::Tensor* zero_points) {
  if (scales == nullptr || zero_points == nullptr) {
    return absl::InvalidArgumentError("scales and zero_points output pointers must not be null");
  }
  if (!w.defined() || w.dim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("w has shape ", Sizes(w), ": must be [R, C]"));
  }
  if (!w.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("w is on ", w.device().str(), ": must be on a CUDA device"));
  }
  if (w.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(absl::StrCat(
        "w has dtype ", std::string(c10::toString(w.scalar_type())), ": must be Float (fp32)"));
  }
  if (!w.is_contiguous()) return absl::InvalidArgumentError("w must be contiguous");
  const int64_t rows = w.size(0), cols = w.size(1);
  GridSearchArgs args;
  args.rows = rows;
  args.cols = cols;
  args.config = config;
  // The config (and sizes) first, as for an empty matrix; then again with the pointers.
  GridSearchArgs config_only = args;
  config_only.rows = 0;
  if (absl::Status s = ValidateGridSearchArgs(config_only); !s.ok()) return s;
  const bool empty = rows == 0 || cols == 0;
  const int64_t groups = GridSearchGroups(cols, config.group_size);
  at::Tensor s_out = at::empty({rows, groups}, w.options());
  at::Tensor z_out = config.symmetric ? at::Tensor() : at::empty({rows, groups}, w.options());
  if (!empty) {
    args.w = w.data_ptr<float>();
    args.scales = s_out.data_ptr<float>();
    args.zero_points = z_out.defined() ? z_out.data_ptr<float>() : nullptr;
  }
  if (absl::Status s = ValidateGridSearchArgs(args); !s.ok()) return s;
  if (!empty) {
#if MQ_WITH_CUDA
    const c10::cuda::CUDAGuard guard(w.device());
    if (absl::Status s =
            LaunchGridSearch(args, c10::cuda::getCurrentCUDAStream(w.device().index()).stream());
        !s.ok()) {
      return s;
    }
#else
    return absl::UnimplementedError(
        "mq was built without CUDA: reconfigure with -DMQ_ENABLE_CUDA=ON on a machine with nvcc");
#endif
  }
  *scales = std::move(s_out);
  *zero_points = std::move(z_out);
  return absl::OkStatus();
}

}  // namespace mq::kernels
