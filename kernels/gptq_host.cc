// Host side of the GPTQ solve launcher: argument checks, the architecture gate and error mapping.
// Built with or without CUDA (MQ_WITH_CUDA); without it every GPU entry point answers
// Unimplemented.
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/device_check.h"
#include "kernels/gptq_internal.h"
#include "mq/kernels/gptq.h"

#if MQ_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/gptq_cuda.h"
#endif

namespace mq::kernels {
namespace {

constexpr int kMinMajor = 9;


}  // namespace

absl::Status ValidateGptqSolveArgs(const GptqSolveArgs& a) {
  if (a.batch < 0) return absl::InvalidArgumentError(absl::StrCat("batch = ", a.batch, ": must be >= 0"));
  if (a.batch == 0) return absl::OkStatus();
  if (a.rows <= 0) return absl::InvalidArgumentError(absl::StrCat("rows = ", a.rows, ": must be > 0"));
  if (a.cols <= 0) return absl::InvalidArgumentError(absl::StrCat("cols = ", a.cols, ": must be > 0"));
  if (a.rows > (int64_t{1} << 31) - 1 || a.cols > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows x cols = ", a.rows, " x ", a.cols, ": each must be < 2^31"));
  }
  if (a.group_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("group_size = ", a.group_size, ": must be > 0 (per-channel = cols)"));
  }
  if (a.bits < 2 || a.bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("bits = ", a.bits, ": must be in [2, 8]"));
  }
  if (a.wt == nullptr) return absl::InvalidArgumentError("wt is null");
  if (a.u == nullptr) return absl::InvalidArgumentError("u (pointer table) is null");
  if (a.perm == nullptr) return absl::InvalidArgumentError("perm (pointer table) is null");
  if (a.scales_t == nullptr) return absl::InvalidArgumentError("scales_t is null");
  if (a.codes_t == nullptr) return absl::InvalidArgumentError("codes_t is null");
  for (int64_t b = 0; b < a.batch; ++b) {
    if (a.u[b] == nullptr) return absl::InvalidArgumentError(absl::StrCat("u[", b, "] is null"));
    if (a.perm[b] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("perm[", b, "] is null"));
    }
  }
  return absl::OkStatus();
}

bool GptqCudaBuilt() { return MQ_WITH_CUDA != 0; }

size_t GptqSolveWorkspaceBytes(const GptqSolveArgs& args) {
#if MQ_WITH_CUDA
  return detail::GptqWorkspaceBytesRaw(args.batch, args.rows, args.cols);
#else
  (void)args;
  return 0;
#endif
}

absl::Status GptqIsSupported(int device) {
#if MQ_WITH_CUDA
  return detail::CheckDevice(device, {"the GPTQ kernels", kMinMajor,
                                      "the CPU/ATen path (QuantizeGptq)", detail::CheckGptqImage});
#else
  (void)device;
  return detail::NoCudaError();
#endif
}

absl::Status LaunchGptqSolve(const GptqSolveArgs& args, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  if (absl::Status s = ValidateGptqSolveArgs(args); !s.ok()) return s;
  if (args.batch == 0) return absl::OkStatus();
#if MQ_WITH_CUDA
  const size_t need = GptqSolveWorkspaceBytes(args);
  if (workspace == nullptr || workspace_bytes < need) {
    return absl::InvalidArgumentError(absl::StrCat("workspace of ", workspace_bytes,
                                                   " bytes: must hold at least ", need, " bytes"));
  }
  detail::GptqRawArgs raw{args.batch, args.rows,    args.cols,     args.group_size,
                          args.bits,  args.wt,      args.u,        args.perm,
                          args.scales_t, args.zeros_t, args.codes_t,
                          args.update_math == GptqUpdateMath::kTf32, args.w0};
  if (std::string err = detail::LaunchGptqSolveRaw(raw, workspace, stream); !err.empty()) {
    return absl::InternalError(absl::StrCat("GPTQ solve of ", args.batch, " x [", args.rows, ", ",
                                            args.cols, "]: ", err));
  }
  return absl::OkStatus();
#else
  (void)workspace;
  (void)workspace_bytes;
  (void)stream;
  return detail::NoCudaError();
#endif
}

}  // namespace mq::kernels
