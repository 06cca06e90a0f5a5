// The MoE block's combine on the GPU: each token's routed experts' output rows, weighted by the
// router, summed into the token's row of `out`, in one pass over the rows (bf16):
//
//   for each token column t, with o = out[tokens[t]] and p_j = entries[j][t] (j = 0..k-1, the
//   token's rows by ascending expert):
//     o = bf16_rne(float(o) + float(bf16_rne(float(rows[p_j]) * weights[p_j])))   for j = 0..k-1
//
// which is bit for bit what the pipeline's torch combine computes (worker/pipeline/moe_combine.h:
// each product rounded to bf16, each sum rounded to bf16, in ascending expert order; NaN written
// as CUDA's canonical bf16 NaN, as torch on CUDA does).
//
// This header compiles without CUDA: cudaStream_t is only forward-declared.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace mq::kernels {

// The most routed experts per token the kernel takes.
inline constexpr int64_t kMaxCombineExperts = 64;

// True when this build contains the CUDA kernels (MQ_ENABLE_CUDA=ON).
bool MoeCombineCudaBuilt();

// OK when the kernel can run on `device`: FailedPrecondition naming the device and what is
// missing (no such device, compute capability below 9.0, no code for its architecture in this
// binary); Unimplemented when mq was built without CUDA.
absl::Status MoeCombineIsSupported(int device);

// Enqueues the combine on `stream` (device pointers). rows: bf16 bits [row_count, cols];
// weights: fp32 [row_count]; entries: int64 [k, t_count] row-major, each in [0, row_count);
// tokens: int64 [t_count], distinct, each in [0, out_rows); out: bf16 bits [out_rows, cols],
// read and written. Indices are the caller's to get right (they are not checked on the device).
// Returns after the launch. InvalidArgument naming the argument for negative sizes, k outside
// [1, kMaxCombineExperts] or null pointers with work to do; Internal with the CUDA error text
// when the launch fails; Unimplemented without CUDA.
absl::Status LaunchMoeCombine(const uint16_t* rows, const float* weights, int64_t row_count,
                              int64_t cols, const int64_t* entries, int64_t k, int64_t t_count,
                              const int64_t* tokens, uint16_t* out, int64_t out_rows,
                              cudaStream_t stream);

}  // namespace mq::kernels
