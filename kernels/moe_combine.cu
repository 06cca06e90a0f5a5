// The MoE combine kernel (see mq/kernels/moe_combine.h): one block per token column at a time,
// its k row positions and weights in shared memory, each thread 8 columns (16 bytes) at a time
// when the rows allow it, else one.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda_image.h"
#include "kernels/moe_combine_cuda.h"
#include "mq/kernels/moe_combine.h"

namespace mq::kernels::detail {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGrid = 1 << 20;

__device__ __forceinline__ float ToFloat(uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}

__device__ __forceinline__ uint16_t ToBf16(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// One column: the token's sum so far, then each weighted row, each step rounded to bf16.
__device__ __forceinline__ uint16_t Step(uint16_t acc, uint16_t row, float weight) {
  const uint16_t product = ToBf16(__fmul_rn(ToFloat(row), weight));
  return ToBf16(__fadd_rn(ToFloat(acc), ToFloat(product)));
}

template <int kVec>
__global__ void __launch_bounds__(kThreads)
    MoeCombineKernel(const uint16_t* __restrict__ rows, const float* __restrict__ weights,
                     int64_t cols, const int64_t* __restrict__ entries, int k, int64_t t_count,
                     const int64_t* __restrict__ tokens, uint16_t* __restrict__ out) {
  __shared__ int64_t position[kMaxCombineExperts];
  __shared__ float weight[kMaxCombineExperts];
  const int64_t chunks = cols / kVec;
  for (int64_t t = blockIdx.x; t < t_count; t += gridDim.x) {
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      const int64_t p = entries[j * t_count + t];
      position[j] = p;
      weight[j] = weights[p];
    }
    __syncthreads();
    uint16_t* o = out + tokens[t] * cols;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      if constexpr (kVec == 8) {
        uint4 acc = reinterpret_cast<const uint4*>(o)[c];
        uint16_t* a = reinterpret_cast<uint16_t*>(&acc);
        for (int j = 0; j < k; ++j) {
          const uint4 r = reinterpret_cast<const uint4*>(rows + position[j] * cols)[c];
          const uint16_t* x = reinterpret_cast<const uint16_t*>(&r);
#pragma unroll
          for (int i = 0; i < 8; ++i) a[i] = Step(a[i], x[i], weight[j]);
        }
        reinterpret_cast<uint4*>(o)[c] = acc;
      } else {
        uint16_t acc = o[c];
        for (int j = 0; j < k; ++j) acc = Step(acc, rows[position[j] * cols + c], weight[j]);
        o[c] = acc;
      }
    }
    __syncthreads();  // position/weight are rewritten for the next token
  }
}

bool Aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

cudaError_t LaunchMoeCombineRaw(const uint16_t* rows, const float* weights, int64_t cols,
                                const int64_t* entries, int64_t k, int64_t t_count,
                                const int64_t* tokens, uint16_t* out, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min(t_count, kMaxGrid));
  if (cols % 8 == 0 && Aligned(rows, 16) && Aligned(out, 16)) {
    MoeCombineKernel<8><<<grid, kThreads, 0, stream>>>(rows, weights, cols, entries,
                                                       static_cast<int>(k), t_count, tokens, out);
  } else {
    MoeCombineKernel<1><<<grid, kThreads, 0, stream>>>(rows, weights, cols, entries,
                                                       static_cast<int>(k), t_count, tokens, out);
  }
  return cudaGetLastError();
}

cudaError_t CheckMoeCombineImage(int device) {
  return CheckKernelImages(device, {reinterpret_cast<const void*>(&MoeCombineKernel<8>),
                                    reinterpret_cast<const void*>(&MoeCombineKernel<1>)});
}

}  // namespace mq::kernels::detail
