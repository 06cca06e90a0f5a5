// FP8 (e4m3fn) 128x128 block dequantization to bf16 (FORMATS.md §2.3):
//
//   out[i][j] = bf16_rne(float(fp8_e4m3fn(w[i][j])) * scale_inv[i / 128][j / 128])
//
// one fp32 multiply and one round-to-nearest-even to bf16. Edge blocks of any size use their
// own scale entry. `scale_inv` is row-major [ceil(rows/128), ceil(cols/128)]; `w` and the
// output are row-major [rows, cols] with no padding.
//
// NaN: a NaN product (the fp8 codes 0x7F/0xFF, or a NaN/Inf-times-zero scale) is written as the
// canonical bf16 NaN 0x7FFF (what CUDA's cvt.rn.bf16 instructions, and so torch on CUDA,
// produce) by both paths, so the CPU and GPU results are bit-identical for every input. Products
// that round past the bf16 range give ±Inf.
//
// The CPU reference and the CUDA kernel produce the same bits for every input. The CPU path
// assumes the default floating-point environment (no flush-to-zero / denormals-are-zero), as
// torch's CPU conversions do.
//
// This header compiles without CUDA: cudaStream_t is only forward-declared.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace mq::kernels {

// DeepSeek-V3's weight_block_size ([128, 128]).
inline constexpr int64_t kFp8BlockSize = 128;

// Number of scale rows/columns for a dimension of `n` elements: ceil(n / 128).
constexpr int64_t Fp8ScaleBlocks(int64_t n) { return (n + kFp8BlockSize - 1) / kFp8BlockSize; }

// CPU reference. `w` holds rows·cols fp8 codes, `out_bf16` receives rows·cols bf16 bit
// patterns (they must not overlap); pointers have their type's natural alignment.
// `num_threads` <= 0 picks a count from the size (one thread per ~1M elements, at most
// hardware_concurrency and 16); 1 runs on the calling thread only. Thread-safe: keeps no state.
// rows or cols of 0 is a no-op; negative sizes are a caller bug (checked in debug builds only).
void Fp8BlockDequantCpu(const uint8_t* w, const float* scale_inv, int64_t rows, int64_t cols,
                        uint16_t* out_bf16, int num_threads = 0);

// The same rule for one element: the exact bits both paths produce.
uint16_t Fp8DequantOne(uint8_t code, float scale_inv);

// True when this build contains the CUDA kernels (MQ_ENABLE_CUDA=ON).
bool Fp8DequantCudaBuilt();

// OK when the CUDA kernel can run on `device`: FailedPrecondition naming the device and what is
// missing when there is no such device, when its compute capability is below 9.0 (Hopper), or
// when this binary holds no code for its architecture (rebuild with MQ_CUDA_ARCHS); Unimplemented
// when mq was built without CUDA.
absl::Status Fp8BlockDequantIsSupported(int device);

// Enqueues the dequantization on `stream` (device pointers; `w`, `scale_inv` and `out_bf16` in
// device memory of the current device). Returns after the launch, not after completion; the
// caller synchronizes the stream before reading `out_bf16`. Any alignment works; cols % 8 == 0
// with 8-byte-aligned `w` and 16-byte-aligned `out_bf16` (cudaMalloc gives 256) takes the
// vectorized path (16 codes per thread, near memcpy bandwidth). InvalidArgument
// naming the argument for negative sizes or null pointers with a non-empty matrix; Internal with
// the CUDA error text when the launch fails; Unimplemented without CUDA. Does not call
// Fp8BlockDequantIsSupported (call it once per device up front).
absl::Status LaunchFp8BlockDequant(const uint8_t* w, const float* scale_inv, int64_t rows,
                                   int64_t cols, uint16_t* out_bf16, cudaStream_t stream);

}  // namespace mq::kernels
