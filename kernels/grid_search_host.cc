// Host side of the MSE grid search launcher: argument checks, the architecture gate and CUDA
// error mapping. Built with or without CUDA (MQ_WITH_CUDA); without it every GPU entry point
// answers Unimplemented.
#include <cstdint>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/device_check.h"
#include "mq/kernels/grid_search.h"

#if MQ_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/grid_search_cuda.h"
#endif

namespace mq::kernels {

absl::Status ValidateGridSearchArgs(const GridSearchArgs& a) {
  const GridSearchConfig& c = a.config;
  if (c.group_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("group_size = ", c.group_size, ": must be > 0 (per-channel: cols)"));
  }
  if (c.bits < 2 || c.bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("bits = ", c.bits, ": must be in [2, 8]"));
  }
  if (c.n_points < 2) {
    return absl::InvalidArgumentError(absl::StrCat("n_points = ", c.n_points, ": must be >= 2"));
  }
  if (!(c.min_shrink > 0.0 && c.min_shrink <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_shrink = ", c.min_shrink, ": must be in (0, 1]"));
  }
  if (!(c.norm > 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat("norm = ", c.norm, ": must be > 0"));
  }
  if (a.rows < 0) {
    return absl::InvalidArgumentError(absl::StrCat("rows = ", a.rows, ": must be >= 0"));
  }
  if (a.cols < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cols = ", a.cols, ": must be >= 0"));
  }
  if (a.cols > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("cols = ", a.cols, ": must be < 2^31"));
  }
  if (a.rows == 0 || a.cols == 0) return absl::OkStatus();
  if (a.rows > std::numeric_limits<int64_t>::max() / a.cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows x cols = ", a.rows, " x ", a.cols, ": element count overflows int64"));
  }
  if (a.w == nullptr) return absl::InvalidArgumentError("w is null for a non-empty matrix");
  if (a.scales == nullptr) {
    return absl::InvalidArgumentError("scales is null for a non-empty matrix");
  }
  if (!c.symmetric && a.zero_points == nullptr) {
    return absl::InvalidArgumentError(
        "zero_points is null: must point to [rows, G] floats when symmetric = false");
  }
  if (c.symmetric && a.zero_points != nullptr) {
    return absl::InvalidArgumentError("zero_points is set: must be null when symmetric = true");
  }
  return absl::OkStatus();
}

bool GridSearchCudaBuilt() { return MQ_WITH_CUDA != 0; }

absl::Status GridSearchIsSupported(int device) {
#if MQ_WITH_CUDA
  // No architecture floor: the kernel uses nothing newer than warp shuffles, so any device this
  // binary has code for will do.
  const detail::DeviceRequirement requirement{"the grid search kernel", 0, "the CPU/ATen path",
                                              detail::CheckGridSearchImage};
  return detail::CheckDevice(device, requirement);
#else
  (void)device;
  return detail::NoCudaError();
#endif
}

absl::Status LaunchGridSearch(const GridSearchArgs& args, cudaStream_t stream) {
  if (absl::Status s = ValidateGridSearchArgs(args); !s.ok()) return s;
  if (args.rows == 0 || args.cols == 0) return absl::OkStatus();
#if MQ_WITH_CUDA
  const GridSearchConfig& c = args.config;
  const detail::GridSearchRawArgs raw{args.w, args.rows,   args.cols,       c.group_size,
                                      c.bits, c.symmetric, c.n_points,      c.min_shrink,
                                      c.norm, args.scales, args.zero_points};
  if (cudaError_t err = detail::LaunchGridSearchRaw(raw, stream); err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("grid search launch for [", args.rows, ", ", args.cols,
                                            "] group_size ", c.group_size,
                                            " failed: ", detail::CudaErrorText(err)));
  }
  return absl::OkStatus();
#else
  (void)stream;
  return detail::NoCudaError();
#endif
}

}  // namespace mq::kernels
