// CPU reference for FP8 128x128 block dequantization (see mq/kernels/fp8_dequant.h).
//
// Every output element is Fp8DequantOne(code, scale). For blocks with enough rows the work is
// done through a per-block table: the 256 possible outputs of the block (one per code) are
// computed with Fp8DequantOne once, then each element is a table lookup. Both forms run the
// same function per code, so they give the same bits.
#include "mq/kernels/fp8_dequant.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace mq::kernels {
namespace {

static_assert(std::endian::native == std::endian::little, "mq assumes a little-endian host");

// Exact f32 value of every e4m3fn code: sign, 4-bit exponent (bias 7), 3-bit mantissa; exponent
// 0 is subnormal (m/8)·2^-6; S.1111.111 is NaN; there is no Inf.
std::array<float, 256> MakeFp8Table() {
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code) {
    const int exponent = (code >> 3) & 0xF;
    const int mantissa = code & 0x7;
    float magnitude;
    if (exponent == 0xF && mantissa == 0x7) {
      magnitude = std::numeric_limits<float>::quiet_NaN();
    } else if (exponent == 0) {
      magnitude = std::ldexp(static_cast<float>(mantissa), -9);
    } else {
      magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
    }
    table[code] = (code & 0x80) ? -magnitude : magnitude;
  }
  return table;
}

const std::array<float, 256>& Fp8Table() {
  static const std::array<float, 256> table = MakeFp8Table();
  return table;
}

// f32 -> bf16 bits, round to nearest even; every NaN -> 0x7FFF (CUDA's canonical NaN).
inline uint16_t Bf16Rne(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// out[i] = table[w[i]] for i < n; eight codes per 64-bit load and four results per 64-bit
// store (about 1.5x faster than the plain loop, which reloads after every 2-byte store).
inline void LookupRun(const uint8_t* w, const uint16_t* table, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t codes;
    std::memcpy(&codes, w + i, sizeof(codes));
    // Written out: GCC -O2 does not unroll a k-loop here and then shifts by %cl.
    const uint64_t lo = uint64_t{table[codes & 0xFF]} | uint64_t{table[(codes >> 8) & 0xFF]} << 16 |
                        uint64_t{table[(codes >> 16) & 0xFF]} << 32 |
                        uint64_t{table[(codes >> 24) & 0xFF]} << 48;
    const uint64_t hi =
        uint64_t{table[(codes >> 32) & 0xFF]} | uint64_t{table[(codes >> 40) & 0xFF]} << 16 |
        uint64_t{table[(codes >> 48) & 0xFF]} << 32 | uint64_t{table[codes >> 56]} << 48;
    std::memcpy(out + i, &lo, sizeof(lo));
    std::memcpy(out + i + 4, &hi, sizeof(hi));
  }
  for (; i < n; ++i) out[i] = table[w[i]];
}

// Rows of a block row below this are converted element by element (building a 256-entry
// table per block would cost more than it saves).
constexpr int64_t kMinRowsForTable = 8;

// Dequantizes block rows [block_row_begin, block_row_end).
void DequantBlockRows(const uint8_t* w, const float* scale_inv, int64_t rows, int64_t cols,
                      uint16_t* out, int64_t block_row_begin, int64_t block_row_end) {
  const std::array<float, 256>& fp8 = Fp8Table();
  const int64_t col_blocks = Fp8ScaleBlocks(cols);
  std::vector<uint16_t> tables;  // [col_blocks][256] for the current block row
  for (int64_t br = block_row_begin; br < block_row_end; ++br) {
    const int64_t row_begin = br * kFp8BlockSize;
    const int64_t row_end = std::min(rows, row_begin + kFp8BlockSize);
    const float* scales = scale_inv + br * col_blocks;
    if (row_end - row_begin < kMinRowsForTable) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        const uint8_t* w_row = w + r * cols;
        uint16_t* out_row = out + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          out_row[c] = Bf16Rne(fp8[w_row[c]] * scales[c / kFp8BlockSize]);
        }
      }
      continue;
    }
    tables.resize(static_cast<size_t>(col_blocks) * 256);
    for (int64_t bc = 0; bc < col_blocks; ++bc) {
      const float scale = scales[bc];
      uint16_t* table = tables.data() + bc * 256;
      for (int code = 0; code < 256; ++code) table[code] = Bf16Rne(fp8[code] * scale);
    }
    for (int64_t r = row_begin; r < row_end; ++r) {
      const uint8_t* w_row = w + r * cols;
      uint16_t* out_row = out + r * cols;
      for (int64_t bc = 0; bc < col_blocks; ++bc) {
        const uint16_t* table = tables.data() + bc * 256;
        const int64_t c_begin = bc * kFp8BlockSize;
        const int64_t c_end = std::min(cols, c_begin + kFp8BlockSize);
        LookupRun(w_row + c_begin, table, out_row + c_begin, c_end - c_begin);
      }
    }
  }
}

// Elements per thread below which another thread is not worth starting.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 20;
constexpr int kMaxThreads = 16;

}  // namespace

uint16_t Fp8DequantOne(uint8_t code, float scale_inv) {
  return Bf16Rne(Fp8Table()[code] * scale_inv);
}

void Fp8BlockDequantCpu(const uint8_t* w, const float* scale_inv, int64_t rows, int64_t cols,
                        uint16_t* out_bf16, int num_threads) {
  assert(rows >= 0 && cols >= 0);
  if (rows <= 0 || cols <= 0) return;
  const int64_t block_rows = Fp8ScaleBlocks(rows);
  int64_t threads = num_threads;
  if (threads <= 0) {
    const int64_t by_size = std::max<int64_t>(1, rows * cols / kMinElementsPerThread);
    const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
    threads = std::min<int64_t>({by_size, hardware, kMaxThreads});
  }
  threads = std::min(threads, block_rows);
  if (threads <= 1) {
    DequantBlockRows(w, scale_inv, rows, cols, out_bf16, 0, block_rows);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads - 1));
  auto range = [&](int64_t t) { return block_rows * t / threads; };
  for (int64_t t = 1; t < threads; ++t) {
    workers.emplace_back(DequantBlockRows, w, scale_inv, rows, cols, out_bf16, range(t),
                         range(t + 1));
  }
  DequantBlockRows(w, scale_inv, rows, cols, out_bf16, range(0), range(1));
  for (std::thread& worker : workers) worker.join();
}

}  // namespace mq::kernels
