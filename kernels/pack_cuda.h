// Private to kernels/: the raw CUDA entry points of pack.cu, free of absl so that nvcc never
// sees absl headers. pack_host.cc wraps them in absl::Status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mq::kernels::detail {

// Launches the row packing on `stream` (arguments already validated: rows and cols > 0,
// ld_codes >= cols, (rows - 1) * ld_codes + cols fits int64, non-null codes and packed;
// out_of_range may be null).
cudaError_t LaunchPackInt4Raw(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                              int32_t* packed, int64_t* out_of_range, cudaStream_t stream);

// The transposed packing, same preconditions.
cudaError_t LaunchPackInt4TransposedRaw(const int8_t* codes, int64_t rows, int64_t cols,
                                        int64_t ld_codes, int32_t* packed, int64_t* out_of_range,
                                        cudaStream_t stream);

// cudaSuccess when this binary holds code (SASS or JIT-able PTX) of every packing kernel for
// `device`; the CUDA error otherwise (cudaErrorInvalidDeviceFunction, cudaErrorNoKernelImage...).
// Restores the caller's current device.
cudaError_t CheckPackInt4Image(int device);

}  // namespace mq::kernels::detail
