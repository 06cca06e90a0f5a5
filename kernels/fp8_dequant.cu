// CUDA kernel for FP8 128x128 block dequantization (see mq/kernels/fp8_dequant.h).
//
// Memory-bound. In the common case (cols % 8 == 0, 8-byte-aligned codes, 16-byte-aligned
// output) a thread converts 8 consecutive codes of one row per chunk — one 8-byte load and one
// 16-byte store, both coalesced across the warp — and takes 2 chunks per loop iteration
// (16 codes, loads issued before converting). Measured on an H200: 94-97% of a device-to-device
// memcpy moving the same bytes (3.9 TB/s on 18432x7168); 16 codes per chunk with two 16-byte
// stores per thread reached only 75-87% (the stores no longer coalesce), and more unrolling did
// not help. Narrower chunks (4, 2, 1) handle ragged rows and unaligned pointers. A chunk width
// divides 128, so a chunk never straddles a scale block and needs one scale.
//
// Conversion per pair of codes: cvt.rn.f16x2.e4m3x2 (exact: every e4m3fn value is an f16 value;
// NaN stays NaN), f16 -> f32 (exact), one fp32 multiply (no FMA contraction, denormals kept:
// never build this with --use_fast_math / -ftz=true), cvt.rn.bf16x2.f32 (round to nearest
// even, every NaN -> 0x7FFF). The CPU reference reproduces exactly these steps.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda_image.h"
#include "kernels/fp8_dequant_cuda.h"

namespace mq::kernels::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kBlock = 128;  // FP8 scale block edge
constexpr int64_t kMaxGrid = int64_t{1} << 20;
// Chunks per thread per loop iteration on the 8-wide path (see Fp8BlockDequantKernel).
constexpr int kUnrollWide = 2;

// Two codes (low byte = lower address = first element) -> two bf16 packed the same way.
__device__ __forceinline__ uint32_t DequantPair(uint16_t codes, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(codes, __NV_E4M3);
  const float2 f = __half22float2(__half2(h));
  const __nv_bfloat162 b = __floats2bfloat162_rn(__fmul_rn(f.x, scale), __fmul_rn(f.y, scale));
  return *reinterpret_cast<const uint32_t*>(&b);
}

__device__ __forceinline__ uint16_t DequantSingle(uint8_t code, float scale) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(code, __NV_E4M3);
  const __nv_bfloat16 b = __float2bfloat16_rn(__fmul_rn(__half2float(__half(h)), scale));
  return *reinterpret_cast<const uint16_t*>(&b);
}

// kVec codes as one load: 8 -> uint2, 4 -> 32 bits, 2 -> 16 bits, 1 -> 8 bits.
template <int kVec>
struct CodeVec;
template <>
struct CodeVec<8> {
  using Type = uint2;
};
template <>
struct CodeVec<4> {
  using Type = unsigned int;
};
template <>
struct CodeVec<2> {
  using Type = unsigned short;
};
template <>
struct CodeVec<1> {
  using Type = unsigned char;
};

// Converts the kVec codes in `in` and stores them at `out` (aligned to 2·kVec bytes).
template <int kVec>
__device__ __forceinline__ void ConvertStore(const typename CodeVec<kVec>::Type& in, float scale,
                                             uint16_t* __restrict__ out) {
  if constexpr (kVec == 1) {
    *out = DequantSingle(in, scale);
  } else {
    uint16_t pairs[kVec / 2];
    memcpy(pairs, &in, sizeof(in));
    uint32_t res[kVec / 2];
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) res[i] = DequantPair(pairs[i], scale);
    if constexpr (kVec == 8) {
      *reinterpret_cast<uint4*>(out) = make_uint4(res[0], res[1], res[2], res[3]);
    } else if constexpr (kVec == 4) {
      *reinterpret_cast<uint2*>(out) = make_uint2(res[0], res[1]);
    } else {
      static_assert(kVec == 2, "kVec must be 1, 2, 4 or 8");
      *reinterpret_cast<uint32_t*>(out) = res[0];
    }
  }
}

// Grid-stride over tiles of kUnroll·kThreads chunks of kVec codes: each thread issues the
// loads of its kUnroll chunks (coalesced across the block) before converting any, to keep more
// bytes in flight. Index is uint32_t when every index fits.
template <int kVec, int kUnroll, typename Index>
__global__ void __launch_bounds__(kThreads)
    Fp8BlockDequantKernel(const uint8_t* __restrict__ w, const float* __restrict__ scale_inv,
                          Index chunks, Index chunks_per_row, Index cols, Index col_blocks,
                          uint16_t* __restrict__ out) {
  using Vec = typename CodeVec<kVec>::Type;
  constexpr Index kTile = static_cast<Index>(kThreads) * kUnroll;
  const Index stride = static_cast<Index>(gridDim.x) * kTile;
  for (Index base = static_cast<Index>(blockIdx.x) * kTile + threadIdx.x; base < chunks;
       base += stride) {
    Vec in[kUnroll];
    float scale[kUnroll];
    Index offset[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const Index chunk = base + static_cast<Index>(k) * kThreads;
      if (chunk < chunks) {
        const Index row = chunk / chunks_per_row;
        const Index col = (chunk - row * chunks_per_row) * kVec;
        offset[k] = row * cols + col;
        in[k] = __ldcs(reinterpret_cast<const Vec*>(w + offset[k]));
        scale[k] = __ldg(scale_inv + (row / kBlock) * col_blocks + col / kBlock);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (base + static_cast<Index>(k) * kThreads < chunks) {
        ConvertStore<kVec>(in[k], scale[k], out + offset[k]);
      }
    }
  }
}

template <int kVec, int kUnroll, typename Index>
cudaError_t Launch(const uint8_t* w, const float* scale_inv, int64_t rows, int64_t cols,
                   uint16_t* out, cudaStream_t stream, int64_t grid) {
  const int64_t chunks_per_row = cols / kVec;
  const int64_t col_blocks = (cols + kBlock - 1) / kBlock;
  Fp8BlockDequantKernel<kVec, kUnroll, Index><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      w, scale_inv, static_cast<Index>(rows * chunks_per_row), static_cast<Index>(chunks_per_row),
      static_cast<Index>(cols), static_cast<Index>(col_blocks), out);
  return cudaGetLastError();
}

template <int kVec, int kUnroll = kVec == 8 ? kUnrollWide : 1>
cudaError_t LaunchVec(const uint8_t* w, const float* scale_inv, int64_t rows, int64_t cols,
                      uint16_t* out, cudaStream_t stream) {
  const int64_t chunks = rows * (cols / kVec);
  const int64_t tile = int64_t{kThreads} * kUnroll;
  const int64_t grid = std::min<int64_t>((chunks + tile - 1) / tile, kMaxGrid);
  // 32-bit indices when no element offset, chunk index or index + stride can reach 2^32.
  const int64_t limit = int64_t{1} << 32;
  if (rows * cols + 2 * grid * tile < limit) {
    return Launch<kVec, kUnroll, uint32_t>(w, scale_inv, rows, cols, out, stream, grid);
  }
  return Launch<kVec, kUnroll, uint64_t>(w, scale_inv, rows, cols, out, stream, grid);
}

bool Aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

cudaError_t LaunchFp8BlockDequantRaw(const uint8_t* w, const float* scale_inv, int64_t rows,
                                     int64_t cols, uint16_t* out_bf16, cudaStream_t stream) {
  // The widest chunk that divides the row and matches both pointers' alignment.
  auto fits = [&](int64_t vec) {
    return cols % vec == 0 && Aligned(w, vec) && Aligned(out_bf16, 2 * vec);
  };
  if (fits(8)) return LaunchVec<8>(w, scale_inv, rows, cols, out_bf16, stream);
  if (fits(4)) return LaunchVec<4>(w, scale_inv, rows, cols, out_bf16, stream);
  if (fits(2)) return LaunchVec<2>(w, scale_inv, rows, cols, out_bf16, stream);
  return LaunchVec<1>(w, scale_inv, rows, cols, out_bf16, stream);
}

cudaError_t CheckFp8DequantImage(int device) {
  return CheckKernelImages(
      device, {
                  reinterpret_cast<const void*>(&Fp8BlockDequantKernel<8, kUnrollWide, uint32_t>),
                  reinterpret_cast<const void*>(&Fp8BlockDequantKernel<1, 1, uint64_t>),
              });
}

}  // namespace mq::kernels::detail
