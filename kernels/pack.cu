// CUDA kernels for int4 packing (see mq/kernels/pack.h).
//
// Memory-bound: one byte read and half a byte written per code. Each thread builds whole words
// (one word = eight codes -> one int32, PackInt4Bytes from pack_word.h, the function the CPU
// reference uses).
//  * Row packing: a word's eight codes are consecutive in memory; when they lie inside the row
//    and start 8-byte aligned they come in one 8-byte load (coalesced across the warp, as are
//    the 4-byte stores); otherwise (the short last word of a row, unaligned rows) byte by byte.
//    A thread issues the loads of kUnroll words before packing any, to keep more bytes in flight.
//  * Transposed packing: a word's codes are eight rows of one column; consecutive threads take
//    consecutive columns, so each of the eight byte loads is coalesced across the warp.
// Out-of-range codes are summed per thread, then per warp (shuffles), and each warp that saw any
// adds its sum to the caller's 64-bit counter with one atomic.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda_image.h"
#include "kernels/pack_cuda.h"
#include "kernels/pack_word.h"

namespace mq::kernels::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kPerWord = 8;
constexpr int64_t kMaxGrid = int64_t{1} << 20;
// Words per thread per loop iteration of the row kernel.
constexpr int kUnroll = 2;

// Places `code` in byte k of `bytes`.
__device__ __forceinline__ uint64_t SetByte(uint64_t bytes, int k, int8_t code) {
  const int shift = 8 * k;
  return (bytes & ~(uint64_t{0xFF} << shift)) |
         (static_cast<uint64_t>(static_cast<uint8_t>(code)) << shift);
}

// The eight codes starting at `p`, of which the first `valid` (>= 1) belong to the row; the
// others are padding (u = 0).
template <typename Index>
__device__ __forceinline__ uint64_t LoadRowWord(const int8_t* p, Index valid) {
  if (valid >= static_cast<Index>(kPerWord) && (reinterpret_cast<uintptr_t>(p) & 7u) == 0) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    return static_cast<uint64_t>(v.x) | (static_cast<uint64_t>(v.y) << 32);
  }
  uint64_t bytes = kInt4PadBytes;
#pragma unroll
  for (int k = 0; k < kPerWord; ++k) {
    if (static_cast<Index>(k) < valid) bytes = SetByte(bytes, k, p[k]);
  }
  return bytes;
}

// Adds the warp's sum of `bad` to *counter (when not null). Every lane of the warp calls it.
__device__ __forceinline__ void AddOutOfRange(unsigned long long bad, unsigned long long* counter) {
  if (counter == nullptr) return;
  if (!__any_sync(0xFFFFFFFFu, bad != 0)) return;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    bad += __shfl_down_sync(0xFFFFFFFFu, bad, offset);
  }
  if ((threadIdx.x & 31u) == 0) atomicAdd(counter, bad);
}

// Grid-stride over tiles of kUnroll·kThreads words of the row packing (word i = row i /
// words_per_row). Index is uint32_t when every index fits.
template <typename Index>
__global__ void __launch_bounds__(kThreads)
    PackInt4RowsKernel(const int8_t* __restrict__ codes, Index total_words, Index words_per_row,
                       Index cols, Index ld, int32_t* __restrict__ packed,
                       unsigned long long* __restrict__ out_of_range) {
  constexpr Index kTile = static_cast<Index>(kThreads) * kUnroll;
  const Index stride = static_cast<Index>(gridDim.x) * kTile;
  unsigned long long bad = 0;
  for (Index base = static_cast<Index>(blockIdx.x) * kTile + threadIdx.x; base < total_words;
       base += stride) {
    uint64_t bytes[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const Index i = base + static_cast<Index>(k) * kThreads;
      if (i < total_words) {
        const Index row = i / words_per_row;
        const Index col = (i - row * words_per_row) * kPerWord;
        bytes[k] = LoadRowWord(codes + row * ld + col, cols - col);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const Index i = base + static_cast<Index>(k) * kThreads;
      if (i < total_words) {
        const Int4Word w = PackInt4Bytes(bytes[k]);
        packed[i] = static_cast<int32_t>(w.word);
        bad += w.out_of_range;
      }
    }
  }
  AddOutOfRange(bad, out_of_range);
}

// Grid-stride over the words of the transposed packing (word i = word row i / cols, column
// i % cols; rows 8·(i / cols) + k).
template <typename Index>
__global__ void __launch_bounds__(kThreads)
    PackInt4ColsKernel(const int8_t* __restrict__ codes, Index total_words, Index rows, Index cols,
                       Index ld, int32_t* __restrict__ packed,
                       unsigned long long* __restrict__ out_of_range) {
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  unsigned long long bad = 0;
  for (Index i = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; i < total_words;
       i += stride) {
    const Index word_row = i / cols;
    const Index col = i - word_row * cols;
    const Index row0 = word_row * kPerWord;
    const int8_t* p = codes + row0 * ld + col;
    uint64_t bytes = kInt4PadBytes;
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) {
      if (row0 + static_cast<Index>(k) < rows) {
        bytes = SetByte(bytes, k, __ldcs(p + static_cast<Index>(k) * ld));
      }
    }
    const Int4Word w = PackInt4Bytes(bytes);
    packed[i] = static_cast<int32_t>(w.word);
    bad += w.out_of_range;
  }
  AddOutOfRange(bad, out_of_range);
}

int64_t GridFor(int64_t total_words, int64_t tile) {
  return std::min<int64_t>((total_words + tile - 1) / tile, kMaxGrid);
}

// 32-bit indices when no element offset (< span), word index or index + stride can reach 2^32.
bool Fits32(int64_t span, int64_t grid, int64_t tile) {
  return span < (int64_t{1} << 32) - 2 * grid * tile;
}

}  // namespace

cudaError_t LaunchPackInt4Raw(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                              int32_t* packed, int64_t* out_of_range, cudaStream_t stream) {
  const int64_t words_per_row = (cols + kPerWord - 1) / kPerWord;
  const int64_t total = rows * words_per_row;
  const int64_t tile = int64_t{kThreads} * kUnroll;
  const int64_t grid = GridFor(total, tile);
  const int64_t span = (rows - 1) * ld_codes + cols;
  auto* counter = reinterpret_cast<unsigned long long*>(out_of_range);
  if (Fits32(span, grid, tile)) {
    PackInt4RowsKernel<uint32_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        codes, static_cast<uint32_t>(total), static_cast<uint32_t>(words_per_row),
        static_cast<uint32_t>(cols), static_cast<uint32_t>(ld_codes), packed, counter);
  } else {
    PackInt4RowsKernel<uint64_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        codes, static_cast<uint64_t>(total), static_cast<uint64_t>(words_per_row),
        static_cast<uint64_t>(cols), static_cast<uint64_t>(ld_codes), packed, counter);
  }
  return cudaGetLastError();
}

cudaError_t LaunchPackInt4TransposedRaw(const int8_t* codes, int64_t rows, int64_t cols,
                                        int64_t ld_codes, int32_t* packed, int64_t* out_of_range,
                                        cudaStream_t stream) {
  const int64_t total = (rows + kPerWord - 1) / kPerWord * cols;
  const int64_t tile = kThreads;
  const int64_t grid = GridFor(total, tile);
  const int64_t span = (rows - 1) * ld_codes + cols;
  auto* counter = reinterpret_cast<unsigned long long*>(out_of_range);
  if (Fits32(span, grid, tile)) {
    PackInt4ColsKernel<uint32_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        codes, static_cast<uint32_t>(total), static_cast<uint32_t>(rows),
        static_cast<uint32_t>(cols), static_cast<uint32_t>(ld_codes), packed, counter);
  } else {
    PackInt4ColsKernel<uint64_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        codes, static_cast<uint64_t>(total), static_cast<uint64_t>(rows),
        static_cast<uint64_t>(cols), static_cast<uint64_t>(ld_codes), packed, counter);
  }
  return cudaGetLastError();
}

cudaError_t CheckPackInt4Image(int device) {
  return CheckKernelImages(device, {
                                       reinterpret_cast<const void*>(&PackInt4RowsKernel<uint32_t>),
                                       reinterpret_cast<const void*>(&PackInt4RowsKernel<uint64_t>),
                                       reinterpret_cast<const void*>(&PackInt4ColsKernel<uint32_t>),
                                       reinterpret_cast<const void*>(&PackInt4ColsKernel<uint64_t>),
                                   });
}

}  // namespace mq::kernels::detail
