// Host side of the Hessian factorisation launcher: argument checks, the device gate and error
// mapping. Built with or without CUDA (MQ_WITH_CUDA).
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/device_check.h"
#include "kernels/hessian_factor_internal.h"
#include "mq/kernels/hessian_factor.h"

#if MQ_WITH_CUDA
#include "kernels/hessian_factor_cuda.h"
#endif

namespace mq::kernels {
namespace {

absl::Status ValidateSize(int64_t n) {
  if (n <= 0 || n >= (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(absl::StrCat("n = ", n, ": must be in [1, 2^31)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateInverseFactorArgs(const InverseFactorArgs& args) {
  if (absl::Status s = ValidateSize(args.n); !s.ok()) return s;
  if (args.a == nullptr) return absl::InvalidArgumentError("a is null");
  if (args.u == nullptr) return absl::InvalidArgumentError("u is null");
  return absl::OkStatus();
}

absl::Status InverseFactorIsSupported(int device) {
#if MQ_WITH_CUDA
  // cuSOLVER and plain CUDA kernels: any architecture this binary was built for.
  return detail::CheckDevice(device, {"the Hessian factorisation kernels", 0,
                                      "the ATen factorisation", detail::CheckInverseFactorImage});
#else
  (void)device;
  return detail::NoCudaError();
#endif
}

absl::Status InverseFactorWorkspaceBytes(int64_t n, FactorDtype dtype, size_t* bytes) {
  if (absl::Status s = ValidateSize(n); !s.ok()) return s;
  if (bytes == nullptr) return absl::InvalidArgumentError("bytes is null");
#if MQ_WITH_CUDA
  if (std::string err =
          detail::InverseFactorWorkspaceBytesRaw(n, dtype == FactorDtype::kFloat64, bytes);
      !err.empty()) {
    return absl::InternalError(absl::StrCat("workspace query for n = ", n, ": ", err));
  }
  return absl::OkStatus();
#else
  (void)dtype;
  return detail::NoCudaError();
#endif
}

absl::Status LaunchInverseFactor(const InverseFactorArgs& args, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream) {
  if (absl::Status s = ValidateInverseFactorArgs(args); !s.ok()) return s;
  if (args.status == nullptr) {
    return absl::InvalidArgumentError("status is null: the GPU launcher reports through it");
  }
  if (workspace == nullptr) return absl::InvalidArgumentError("workspace is null");
#if MQ_WITH_CUDA
  detail::InverseFactorRawArgs raw{args.n,
                                   args.dtype == FactorDtype::kFloat64,
                                   args.form == FactorForm::kCholeskyFeedback,
                                   args.a,
                                   args.u,
                                   args.status};
  if (std::string err = detail::LaunchInverseFactorRaw(raw, workspace, workspace_bytes, stream);
      !err.empty()) {
    return absl::InternalError(absl::StrCat("Hessian factorisation of n = ", args.n, ": ", err));
  }
  return absl::OkStatus();
#else
  (void)workspace_bytes;
  (void)stream;
  return detail::NoCudaError();
#endif
}

}  // namespace mq::kernels
