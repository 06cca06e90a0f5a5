// Private to kernels/: the raw CUDA entry points of fp8_dequant.cu, free of absl so that nvcc
// never sees absl headers. fp8_dequant_host.cc wraps them in absl::Status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mq::kernels::detail {

// Launches the dequant kernel on `stream` (sizes already validated, rows and cols > 0).
cudaError_t LaunchFp8BlockDequantRaw(const uint8_t* w, const float* scale_inv, int64_t rows,
                                     int64_t cols, uint16_t* out_bf16, cudaStream_t stream);

// cudaSuccess when this binary holds code (SASS or JIT-able PTX) of the dequant kernels for
// `device`; the CUDA error otherwise (cudaErrorInvalidDeviceFunction, cudaErrorNoKernelImage...).
// Restores the caller's current device.
cudaError_t CheckFp8DequantImage(int device);

}  // namespace mq::kernels::detail
