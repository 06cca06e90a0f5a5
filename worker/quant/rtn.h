// Round-to-nearest quantization on the shared grid (grid.h): the baseline GPTQ is measured
// against and GPTQ's last-resort fallback.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: a pure function, no shared state; CPU or CUDA tensors, results on the input's device.
#pragma once

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "worker/quant/grid.h"

namespace mq::quant {

// Quantizes `w` ([O, I], O, I > 0, any float dtype, all finite) with the grid of
// ComputeGrid(w, options) and codes = clamp(round(w / s + zp), qmin, qmax).
// InvalidArgument naming the field for bad options, a non-2-D or empty weight, a non-float
// dtype, or a non-finite element ("weight contains NaN or Inf").
absl::StatusOr<QuantizedWeight> QuantizeRtn(const at::Tensor& w, const GridOptions& options);

}  // namespace mq::quant
