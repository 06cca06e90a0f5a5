#include "worker/quant/rtn.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "worker/quant/validate.h"

namespace mq::quant {

absl::StatusOr<QuantizedWeight> QuantizeRtn(const at::Tensor& w, const GridOptions& options) {
  if (absl::Status s = ValidateGridOptions(options); !s.ok()) return s;
  if (absl::Status s = ValidateWeight(w, "weight"); !s.ok()) return s;
  at::Tensor wf = w.to(at::kFloat);
  Grid grid = ComputeGrid(wf, options);
  const int64_t cols = wf.size(1);
  at::Tensor scale = ExpandGroups(grid.scales, cols, options.group_size);
  at::Tensor zero = grid.zero_points.defined()
                        ? ExpandGroups(grid.zero_points, cols, options.group_size)
                        : at::Tensor();
  return MakeQuantizedWeight(QuantizeCodes(wf, scale, zero, options.bits), grid, options);
}

}  // namespace mq::quant
