// Host side of the FP8 dequant launcher: argument checks, the architecture gate and CUDA error
// mapping. Built with or without CUDA (MQ_WITH_CUDA); without it every GPU entry point answers
// Unimplemented.
#include <limits>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/device_check.h"
#include "mq/kernels/fp8_dequant.h"

#if MQ_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/fp8_dequant_cuda.h"
#endif

namespace mq::kernels {
namespace {

#if MQ_WITH_CUDA
using detail::CudaErrorText;
#else
absl::Status NoCuda() { return detail::NoCudaError(); }
#endif

// Minimum compute capability (major) the kernel is gated on: Hopper.
constexpr int kMinMajor = 9;

}  // namespace

bool Fp8DequantCudaBuilt() { return MQ_WITH_CUDA != 0; }

absl::Status Fp8BlockDequantIsSupported(int device) {
#if MQ_WITH_CUDA
  return detail::CheckDevice(device, {"the FP8 dequant kernel", kMinMajor,
                                      "the CPU path (Fp8BlockDequantCpu)",
                                      detail::CheckFp8DequantImage});
#else
  (void)device;
  return NoCuda();
#endif
}

absl::Status LaunchFp8BlockDequant(const uint8_t* w, const float* scale_inv, int64_t rows,
                                   int64_t cols, uint16_t* out_bf16, cudaStream_t stream) {
  if (rows < 0) return absl::InvalidArgumentError(absl::StrCat("rows = ", rows, ": must be >= 0"));
  if (cols < 0) return absl::InvalidArgumentError(absl::StrCat("cols = ", cols, ": must be >= 0"));
  if (rows == 0 || cols == 0) return absl::OkStatus();
  if (rows > std::numeric_limits<int64_t>::max() / cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows x cols = ", rows, " x ", cols, ": element count overflows int64"));
  }
  if (w == nullptr) return absl::InvalidArgumentError("w is null for a non-empty matrix");
  if (scale_inv == nullptr) {
    return absl::InvalidArgumentError("scale_inv is null for a non-empty matrix");
  }
  if (out_bf16 == nullptr) {
    return absl::InvalidArgumentError("out_bf16 is null for a non-empty matrix");
  }
#if MQ_WITH_CUDA
  if (cudaError_t err =
          detail::LaunchFp8BlockDequantRaw(w, scale_inv, rows, cols, out_bf16, stream);
      err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("FP8 dequant launch for [", rows, ", ", cols,
                                            "] failed: ", CudaErrorText(err)));
  }
  return absl::OkStatus();
#else
  (void)stream;
  return NoCuda();
#endif
}

}  // namespace mq::kernels
