// Host side of the int4 packing launchers: argument checks, the architecture gate and CUDA error
// mapping. Built with or without CUDA (MQ_WITH_CUDA); without it every GPU entry point answers
// Unimplemented.
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/device_check.h"
#include "mq/kernels/pack.h"

#if MQ_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/pack_cuda.h"
#endif

namespace mq::kernels {
namespace {

// Checks the launcher arguments; OK with *empty = true when there is nothing to pack.
absl::Status ValidateLaunchArgs(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                                const int32_t* packed, bool* empty) {
  *empty = false;
  if (rows < 0) return absl::InvalidArgumentError(absl::StrCat("rows = ", rows, ": must be >= 0"));
  if (cols < 0) return absl::InvalidArgumentError(absl::StrCat("cols = ", cols, ": must be >= 0"));
  if (ld_codes < cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("ld_codes = ", ld_codes, ": must be >= cols = ", cols));
  }
  if (rows == 0 || cols == 0) {
    *empty = true;
    return absl::OkStatus();
  }
  // The last code read is at (rows - 1) * ld_codes + cols - 1.
  if (rows - 1 > (std::numeric_limits<int64_t>::max() - cols) / ld_codes) {
    return absl::InvalidArgumentError(absl::StrCat("rows x ld_codes = ", rows, " x ", ld_codes,
                                                   ": the code extent overflows int64"));
  }
  if (codes == nullptr) return absl::InvalidArgumentError("codes is null for a non-empty matrix");
  if (packed == nullptr) {
    return absl::InvalidArgumentError("packed is null for a non-empty matrix");
  }
  return absl::OkStatus();
}

}  // namespace

bool PackInt4CudaBuilt() { return MQ_WITH_CUDA != 0; }

absl::Status PackInt4IsSupported(int device) {
#if MQ_WITH_CUDA
  return detail::CheckDevice(device, {"the int4 packing kernels", /*min_major=*/0,
                                      "the ATen packing", detail::CheckPackInt4Image});
#else
  (void)device;
  return detail::NoCudaError();
#endif
}

absl::Status LaunchPackInt4(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                            int32_t* packed, int64_t* out_of_range, cudaStream_t stream) {
  bool empty = false;
  if (absl::Status s = ValidateLaunchArgs(codes, rows, cols, ld_codes, packed, &empty); !s.ok()) {
    return s;
  }
  if (empty) return absl::OkStatus();
#if MQ_WITH_CUDA
  if (cudaError_t err =
          detail::LaunchPackInt4Raw(codes, rows, cols, ld_codes, packed, out_of_range, stream);
      err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("int4 packing launch for [", rows, ", ", cols,
                                            "] failed: ", detail::CudaErrorText(err)));
  }
  return absl::OkStatus();
#else
  (void)out_of_range;
  (void)stream;
  return detail::NoCudaError();
#endif
}

absl::Status LaunchPackInt4Transposed(const int8_t* codes, int64_t rows, int64_t cols,
                                      int64_t ld_codes, int32_t* packed, int64_t* out_of_range,
                                      cudaStream_t stream) {
  bool empty = false;
  if (absl::Status s = ValidateLaunchArgs(codes, rows, cols, ld_codes, packed, &empty); !s.ok()) {
    return s;
  }
  if (empty) return absl::OkStatus();
#if MQ_WITH_CUDA
  if (cudaError_t err = detail::LaunchPackInt4TransposedRaw(codes, rows, cols, ld_codes, packed,
                                                            out_of_range, stream);
      err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("transposed int4 packing launch for [", rows, ", ",
                                            cols, "] failed: ", detail::CudaErrorText(err)));
  }
  return absl::OkStatus();
#else
  (void)out_of_range;
  (void)stream;
  return detail::NoCudaError();
#endif
}

}  // namespace mq::kernels
