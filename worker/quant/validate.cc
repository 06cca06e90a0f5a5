#include "worker/quant/validate.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/quant/grid.h"

namespace mq::quant {

std::string SizesString(const at::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

absl::Status ValidateWeight(const at::Tensor& w, const std::string& what) {
  if (!w.defined()) return absl::InvalidArgumentError(absl::StrCat(what, " is undefined"));
  if (w.dim() != 2 || w.size(0) == 0 || w.size(1) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has shape ", SizesString(w),
                                                   ": must be 2-D with both dimensions > 0"));
  }
  if (!at::isFloatingType(w.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has dtype ",
                                                   std::string(c10::toString(w.scalar_type())),
                                                   ": must be a floating-point type"));
  }
  if (!AllFinite(w)) return absl::InvalidArgumentError(absl::StrCat(what, " contains NaN or Inf"));
  return absl::OkStatus();
}

}  // namespace mq::quant
