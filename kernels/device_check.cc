#include "kernels/device_check.h"

#include "absl/strings/str_cat.h"

namespace mq::kernels::detail {

absl::Status NoCudaError() {
  return absl::UnimplementedError(
      "mq was built without CUDA: reconfigure with -DMQ_ENABLE_CUDA=ON on a machine with nvcc");
}

#if MQ_WITH_CUDA
std::string CudaErrorText(cudaError_t err) {
  return absl::StrCat(cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

absl::Status CheckDevice(int device, const DeviceRequirement& req) {
  int count = 0;
  if (cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
    return absl::FailedPreconditionError(
        absl::StrCat("no usable CUDA device (cudaGetDeviceCount: ", CudaErrorText(err), ")"));
  }
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", device, " does not exist: ", count,
                     " device(s) visible, valid ids are [0, ", count, ")"));
  }
  cudaDeviceProp prop;
  if (cudaError_t err = cudaGetDeviceProperties(&prop, device); err != cudaSuccess) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", device, ": cudaGetDeviceProperties: ", CudaErrorText(err)));
  }
  const std::string which = absl::StrCat("CUDA device ", device, " (", prop.name,
                                         ", compute capability ", prop.major, ".", prop.minor, ")");
  if (prop.major < req.min_major) {
    return absl::FailedPreconditionError(
        absl::StrCat(which, ": ", req.kernel, " need compute capability ", req.min_major,
                     ".0 (Hopper) or newer; use ", req.cpu_hint, " on this machine"));
  }
  if (cudaError_t err = req.image(device); err != cudaSuccess) {
    return absl::FailedPreconditionError(absl::StrCat(
        which, ": this build has no code of ", req.kernel,
        " for it (built for MQ_CUDA_ARCHS=", MQ_CUDA_ARCHS_STR,
        "; reconfigure with -DMQ_CUDA_ARCHS=", prop.major, prop.minor, "): ", CudaErrorText(err)));
  }
  return absl::OkStatus();
}
#endif

}  // namespace mq::kernels::detail
