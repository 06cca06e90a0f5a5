// Input checks shared by worker/quant (internal header, not part of the public API).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "absl/status/status.h"

namespace mq::quant {

// OK for a 2-D floating-point tensor with both dimensions > 0 and every element finite;
// otherwise InvalidArgument naming `what`, e.g. `weight has shape [0, 4]: must be 2-D with
// both dimensions > 0` or `weight contains NaN or Inf`.
absl::Status ValidateWeight(const at::Tensor& w, const std::string& what);

// "[2, 3]".
std::string SizesString(const at::Tensor& t);

}  // namespace mq::quant
