// Private to kernels/*.cu: whether this binary holds code (SASS or JIT-able PTX) of a set of
// kernels for a device — the last step of every launcher's IsSupported check.
#pragma once

#include <cuda_runtime_api.h>

#include <initializer_list>

namespace mq::kernels::detail {

// cudaSuccess when every kernel in `kernels` (device function pointers cast to const void*) can
// run on `device`; the first CUDA error otherwise (cudaErrorInvalidDeviceFunction,
// cudaErrorNoKernelImageForDevice...). Restores the caller's current device.
inline cudaError_t CheckKernelImages(int device, std::initializer_list<const void*> kernels) {
  int previous = 0;
  if (cudaError_t e = cudaGetDevice(&previous); e != cudaSuccess) return e;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return e;
  cudaError_t e = cudaSuccess;
  cudaFuncAttributes attributes;
  for (const void* kernel : kernels) {
    e = cudaFuncGetAttributes(&attributes, kernel);
    if (e != cudaSuccess) break;
  }
  cudaSetDevice(previous);
  return e;
}

}  // namespace mq::kernels::detail
