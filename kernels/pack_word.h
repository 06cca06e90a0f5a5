// Private to kernels/: the packing of eight int4 codes into one word, shared by the CPU
// reference (cpu/pack.cc) and the CUDA kernels (pack.cu) so that both produce the same bits.
// Free of absl and of CUDA headers; under nvcc the functions are also device functions.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MQ_PACK_FN __host__ __device__ __forceinline__
#else
#define MQ_PACK_FN inline
#endif

namespace mq::kernels::detail {

// Eight int8 codes -8 (u = 0): the value of the bytes past the end of a short word.
inline constexpr uint64_t kInt4PadBytes = 0xF8F8F8F8F8F8F8F8ull;

struct Int4Word {
  uint32_t word;          // nibble k = (byte k + 8) mod 16
  uint32_t out_of_range;  // bytes of the input outside [-8, 7] (0..8)
};

// Packs the eight int8 codes held in the bytes of `bytes` (byte k, bits 8k..8k+7 = the code of
// column k) into one word, nibble k in bits 4k..4k+3.
MQ_PACK_FN Int4Word PackInt4Bytes(uint64_t bytes) {
  constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7Full;
  constexpr uint64_t kHigh1 = 0x8080808080808080ull;
  constexpr uint64_t kEight = 0x0808080808080808ull;
  constexpr uint64_t kLowNibbles = 0x0F0F0F0F0F0F0F0Full;
  constexpr uint64_t kOnes = 0x0101010101010101ull;
  // Per byte u = (code + 8) mod 256 without carries between bytes: the low 7 bits plus 8 stay
  // below 0x88, the top bit is added back with XOR.
  const uint64_t u = ((bytes & kLow7) + kEight) ^ (bytes & kHigh1);
  // A code is in range exactly when its u < 16, i.e. the high nibble of its byte is 0. Adding
  // 0x0F to that nibble (at most 0x1E, no carry out of the byte) sets bit 4 when it is nonzero.
  const uint64_t high = (u >> 4) & kLowNibbles;
  const uint64_t flags = ((high + kLowNibbles) >> 4) & kOnes;
  const uint32_t bad = static_cast<uint32_t>((flags * kOnes) >> 56);  // sum of the 8 flags
  // Gather the low nibbles: byte pairs -> bytes, byte pairs -> 16-bit halves, halves -> word.
  uint64_t n = u & kLowNibbles;
  n = (n | (n >> 4)) & 0x00FF00FF00FF00FFull;
  n = (n | (n >> 8)) & 0x0000FFFF0000FFFFull;
  n = (n | (n >> 16)) & 0x00000000FFFFFFFFull;
  return Int4Word{static_cast<uint32_t>(n), bad};
}

}  // namespace mq::kernels::detail

#undef MQ_PACK_FN
