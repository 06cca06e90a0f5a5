#include "worker/quant/hessian.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "worker/quant/grid.h"
#include "worker/quant/validate.h"

namespace mq::quant {

HessianAccumulator::HessianAccumulator(int64_t in_features, c10::Device device)
    : in_features_(in_features),
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
  if (half && rows.is_cuda()) {
    sum_.add_(at::mm(rows.t(), rows, at::kFloat));
  } else {
    at::Tensor f = rows.to(at::kFloat);
    sum_.addmm_(f.t(), f);
  }
  tokens_ += n;
  return absl::OkStatus();
}

absl::Status HessianAccumulator::Merge(const HessianAccumulator& other) {
  return MergeSum(other.sum_, other.tokens_);
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
  if (!AllFinite(sum_)) {
    return absl::InvalidArgumentError(
        absl::StrCat("hessian of ", tokens_, " tokens contains NaN or Inf"));
  }
  if (tokens_ == 0) return at::zeros_like(sum_);
  return sum_.mul(2.0 / static_cast<double>(tokens_));
}

}  // namespace mq::quant
