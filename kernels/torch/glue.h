// Helpers shared by the torch glue files of kernels/torch/ (ops.cc, grid_ops.cc, pack_ops.cc,
// fp8_ops.cc, combine_ops.cc).
// For torch code only (includes ATen).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "absl/status/status.h"

namespace mq::kernels::glue {

// "[2, 3]", or "undefined".
std::string Sizes(const at::Tensor& t);

// InvalidArgument naming `name` unless `t` is a contiguous tensor of `dtype` and `sizes` on
// `device`.
absl::Status Check(const at::Tensor& t, const std::string& name, at::ScalarType dtype,
                   at::IntArrayRef sizes, const c10::Device& device);

// FailedPrecondition for a non-CUDA device ("<kernels> run on CUDA devices only"); otherwise
// is_supported(index) for the device's index (the current device when it has none), computed
// once per (check, index) for the life of the process.
absl::Status SupportedOn(const c10::Device& device, const char* kernels,
                         absl::Status (*is_supported)(int));

}  // namespace mq::kernels::glue
