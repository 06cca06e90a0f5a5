// Private to kernels/: the raw CUDA entry points of hessian_factor.cu, free of absl so that nvcc
// never sees absl headers. hessian_factor_host.cc checks arguments and wraps them in absl::Status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace mq::kernels::detail {

struct InverseFactorRawArgs {
  int64_t n;
  bool fp64;
  bool feedback;  // FactorForm::kCholeskyFeedback
  void* a;
  float* u;
  int32_t* status;
};

// Workspace bytes for (n, precision) on the current device; empty string on success, otherwise
// the failing call.
std::string InverseFactorWorkspaceBytesRaw(int64_t n, bool fp64, size_t* bytes);

// Enqueues the factorisation on `stream`; empty string on success, otherwise the failing call.
std::string LaunchInverseFactorRaw(const InverseFactorRawArgs& args, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream);

// cudaSuccess when this binary holds code of the factorisation kernels for `device`.
cudaError_t CheckInverseFactorImage(int device);

}  // namespace mq::kernels::detail
