// Host side of the MoE combine launcher: argument checks, the architecture gate and CUDA error
// mapping. Built with or without CUDA (MQ_WITH_CUDA); without it every GPU entry point answers
// Unimplemented.
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/device_check.h"
#include "mq/kernels/moe_combine.h"

#if MQ_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/moe_combine_cuda.h"
#endif

namespace mq::kernels {

bool MoeCombineCudaBuilt() { return MQ_WITH_CUDA != 0; }

absl::Status MoeCombineIsSupported(int device) {
#if MQ_WITH_CUDA
  return detail::CheckDevice(
      device, {"the MoE combine kernel", 9, "the torch combine (worker/pipeline/moe_combine.h)",
               detail::CheckMoeCombineImage});
#else
  (void)device;
  return detail::NoCudaError();
#endif
}

absl::Status LaunchMoeCombine(const uint16_t* rows, const float* weights, int64_t row_count,
                              int64_t cols, const int64_t* entries, int64_t k, int64_t t_count,
                              const int64_t* tokens, uint16_t* out, int64_t out_rows,
                              cudaStream_t stream) {
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"row_count", row_count},
                                {"cols", cols},
                                {"t_count", t_count},
                                {"out_rows", out_rows}}) {
    if (v < 0) return absl::InvalidArgumentError(absl::StrCat(name, " = ", v, ": must be >= 0"));
  }
  if (k < 1 || k > kMaxCombineExperts) {
    return absl::InvalidArgumentError(
        absl::StrCat("k = ", k, ": must be in [1, ", kMaxCombineExperts, "]"));
  }
  if (t_count == 0 || cols == 0) return absl::OkStatus();
  if (row_count == 0 || out_rows == 0) {
    return absl::InvalidArgumentError(absl::StrCat(t_count, " token columns to combine from ",
                                                   row_count, " rows into ", out_rows,
                                                   " output rows: both must be > 0"));
  }
  for (const auto& [name, p] : {std::pair<const char*, const void*>{"rows", rows},
                                {"weights", weights},
                                {"entries", entries},
                                {"tokens", tokens},
                                {"out", out}}) {
    if (p == nullptr) return absl::InvalidArgumentError(absl::StrCat(name, " is null"));
  }
#if MQ_WITH_CUDA
  if (cudaError_t err = detail::LaunchMoeCombineRaw(rows, weights, cols, entries, k, t_count,
                                                    tokens, out, stream);
      err != cudaSuccess) {
    return absl::InternalError(absl::StrCat("MoE combine launch for ", t_count, " tokens x ", cols,
                                            " columns failed: ", detail::CudaErrorText(err)));
  }
  return absl::OkStatus();
#else
  (void)stream;
  return detail::NoCudaError();
#endif
}

}  // namespace mq::kernels
