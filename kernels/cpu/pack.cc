// CPU reference for int4 packing (see mq/kernels/pack.h). Each word is built by the same
// PackInt4Bytes the CUDA kernels use, from eight codes gathered into one 64-bit value (one
// 8-byte load for a full word of the row packing).
#include "mq/kernels/pack.h"

#include <bit>
#include <cassert>
#include <cstring>

#include "kernels/pack_word.h"

namespace mq::kernels {
namespace {

static_assert(std::endian::native == std::endian::little, "mq assumes a little-endian host");

// Places `code` in byte k of `bytes`.
inline uint64_t SetByte(uint64_t bytes, int k, int8_t code) {
  const int shift = 8 * k;
  return (bytes & ~(uint64_t{0xFF} << shift)) | (uint64_t{static_cast<uint8_t>(code)} << shift);
}

// Stores the word and returns its out-of-range count.
inline int64_t Store(uint64_t bytes, int32_t* out) {
  const detail::Int4Word w = detail::PackInt4Bytes(bytes);
  std::memcpy(out, &w.word, sizeof(w.word));
  return w.out_of_range;
}

}  // namespace

int64_t PackInt4Cpu(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                    int32_t* packed) {
  assert(rows >= 0 && cols >= 0 && ld_codes >= cols);
  if (rows <= 0 || cols <= 0) return 0;
  const int64_t words = Int4PackedWords(cols);
  const int64_t full = cols / kInt4PerWord;
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = codes + r * ld_codes;
    int32_t* out = packed + r * words;
    for (int64_t w = 0; w < full; ++w) {
      uint64_t bytes;
      std::memcpy(&bytes, row + w * kInt4PerWord, sizeof(bytes));
      bad += Store(bytes, out + w);
    }
    if (full < words) {
      uint64_t bytes = detail::kInt4PadBytes;
      for (int64_t c = full * kInt4PerWord; c < cols; ++c) {
        bytes = SetByte(bytes, static_cast<int>(c - full * kInt4PerWord), row[c]);
      }
      bad += Store(bytes, out + full);
    }
  }
  return bad;
}

int64_t PackInt4TransposedCpu(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                              int32_t* packed) {
  assert(rows >= 0 && cols >= 0 && ld_codes >= cols);
  if (rows <= 0 || cols <= 0) return 0;
  const int64_t words = Int4PackedWords(rows);
  int64_t bad = 0;
  for (int64_t w = 0; w < words; ++w) {
    const int64_t r0 = w * kInt4PerWord;
    const int64_t n = rows - r0 < kInt4PerWord ? rows - r0 : kInt4PerWord;
    for (int64_t c = 0; c < cols; ++c) {
      uint64_t bytes = detail::kInt4PadBytes;
      for (int64_t k = 0; k < n; ++k) {
        bytes = SetByte(bytes, static_cast<int>(k), codes[(r0 + k) * ld_codes + c]);
      }
      bad += Store(bytes, packed + w * cols + c);
    }
  }
  return bad;
}

}  // namespace mq::kernels
