// Private to kernels/: the raw CUDA entry point of gptq.cu, free of absl so that nvcc never sees
// absl headers. gptq_host.cc checks the arguments and wraps the result in absl::Status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace mq::kernels::detail {

struct GptqRawArgs {
  int64_t batch, rows, cols, group_size;
  int bits;
  float* wt;
  const float* const* u_host;       // B device pointers
  const int32_t* const* perm_host;  // B device pointers
  const float* scales_t;
  const float* zeros_t;
  int8_t* codes_t;
  bool tf32;
  const float* w0;  // non-null: Cholesky-feedback form
};

// Bytes of workspace (error block, pointer tables).
size_t GptqWorkspaceBytesRaw(int64_t batch, int64_t rows, int64_t cols);

// Runs the solve (arguments already validated, batch > 0). Empty string on success, otherwise
// the failing call and its CUDA/cuBLAS error text.
std::string LaunchGptqSolveRaw(const GptqRawArgs& args, void* workspace, cudaStream_t stream);

// cudaSuccess when this binary holds code of the GPTQ kernel for `device`.
cudaError_t CheckGptqImage(int device);

}  // namespace mq::kernels::detail
