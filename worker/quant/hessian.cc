#include "worker/quant/hessian.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "worker/quant/grid.h"
#include "worker/quant/validate.h"

namespace mq::quant {

HessianAccumulator::HessianAccumulator(int64_t in_features, c10::Device device, int64_t panel)
    : in_features_(in_features),
      panel_(panel > 0 && in_features >= 2 * panel ? panel : in_features),
      sum_(at::zeros({in_features, in_features},
                     at::TensorOptions().dtype(at::kFloat).device(device))) {}

absl::Status HessianAccumulator::Add(const at::Tensor& x) {
  if (!x.defined() || x.dim() < 1 || x.size(-1) != in_features_) {
    return absl::InvalidArgumentError(
        absl::StrCat("hessian input has shape ", x.defined() ? SizesString(x) : "undefined",
                     ": the last dimension must be in_features = ", in_features_));
  }
  if (!at::isFloatingType(x.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat("hessian input has dtype ",
                                                   std::string(c10::toString(x.scalar_type())),
                                                   ": must be a floating-point type"));
  }
  at::Tensor rows = x.reshape({-1, in_features_}).to(sum_.device());
  const int64_t n = rows.size(0);
  if (n == 0) return absl::OkStatus();
  const bool half = rows.scalar_type() == at::kBFloat16 || rows.scalar_type() == at::kHalf;
  // bf16/fp16 on CUDA: tensor-core products accumulated straight into the fp32 panel.
  const bool mixed = half && rows.is_cuda();
  at::Tensor f = (mixed ? rows : rows.to(at::kFloat)).contiguous();
  for (int64_t c0 = 0; c0 < in_features_; c0 += panel_) {
    const int64_t width = std::min(panel_, in_features_ - c0);
    const int64_t end = c0 + width;
    at::Tensor out = sum_.narrow(0, c0, width).narrow(1, 0, end);
    at::Tensor a = f.narrow(1, c0, width).t(), b = f.narrow(1, 0, end);
    if (mixed) {
      at::addmm_out(out, out, a, b, at::kFloat);
    } else {
      out.addmm_(a, b);
    }
  }
  if (panel_ < in_features_) mirrored_ = false;
  tokens_ += n;
  return absl::OkStatus();
}

const at::Tensor& HessianAccumulator::sum() const {
  Mirror();
  return sum_;
}

void HessianAccumulator::Mirror() const {
  if (mirrored_) return;
  // Panel i holds rows [c0, end) × columns [0, end); its rows' columns from `end` on are the
  // transpose of later panels' columns [c0, end).
  for (int64_t c0 = 0; c0 < in_features_; c0 += panel_) {
    const int64_t width = std::min(panel_, in_features_ - c0);
    const int64_t rest = in_features_ - c0 - width;
    if (rest == 0) continue;
    sum_.narrow(0, c0, width)
        .narrow(1, c0 + width, rest)
        .copy_(sum_.narrow(0, c0 + width, rest).narrow(1, c0, width).t());
  }
  mirrored_ = true;
}

absl::Status HessianAccumulator::Merge(const HessianAccumulator& other) {
  return MergeSum(other.sum(), other.tokens_);
}

absl::Status HessianAccumulator::MergeSum(const at::Tensor& sum, int64_t tokens) {
  if (!sum.defined() || sum.dim() != 2 || sum.size(0) != in_features_ ||
      sum.size(1) != in_features_) {
    return absl::InvalidArgumentError(
        absl::StrCat("hessian shard has shape ", sum.defined() ? SizesString(sum) : "undefined",
                     ": must be [", in_features_, ", ", in_features_, "]"));
  }
  if (tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("hessian shard tokens = ", tokens, ": must be >= 0"));
  }
  sum_.add_(sum.to(sum_.device(), at::kFloat));
  tokens_ += tokens;
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> HessianAccumulator::Finalize() const {
  Mirror();
  if (!AllFinite(sum_)) {
    return absl::InvalidArgumentError(
        absl::StrCat("hessian of ", tokens_, " tokens contains NaN or Inf"));
  }
  if (tokens_ == 0) return at::zeros_like(sum_);
  return sum_.mul(2.0 / static_cast<double>(tokens_));
}

}  // namespace mq::quant
