// Private to kernels/: the raw CUDA entry points of moe_combine.cu, free of absl so that nvcc
// never sees absl headers. moe_combine_host.cc checks arguments and wraps them in absl::Status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mq::kernels::detail {

// Launches the combine on `stream` (arguments already validated; t_count, cols, k > 0).
cudaError_t LaunchMoeCombineRaw(const uint16_t* rows, const float* weights, int64_t cols,
                                const int64_t* entries, int64_t k, int64_t t_count,
                                const int64_t* tokens, uint16_t* out, cudaStream_t stream);

// cudaSuccess when this binary holds code of the combine kernels for `device`.
cudaError_t CheckMoeCombineImage(int device);

}  // namespace mq::kernels::detail
