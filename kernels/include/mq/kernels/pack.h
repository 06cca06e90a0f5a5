// Int4 packing into int32 words, compressed-tensors `pack-quantized` layout (FORMATS.md §4.2,
// worker/quant/pack.h):
//
//   row packing (weight_packed): codes [rows, cols] -> packed int32 [rows, ceil(cols/8)];
//     word w of row r holds u = code + 8 of columns 8w+k in bits 4k..4k+3 (lowest nibble =
//     lowest column), a short last word padded with u = 0.
//   transposed packing (weight_zero_point): codes [rows, cols] -> packed int32
//     [ceil(rows/8), cols]; word w of column c holds rows 8w+k the same way (8 rows per word).
//
// Codes are signed int8 and must lie in [-8, 7]. Every function counts the codes outside that
// range; the nibble stored for such a code is (code + 8) mod 16 on every path, so the CPU
// reference and the CUDA kernels produce the same bits for every input.
//
// `codes` is row-major with a row stride of `ld_codes` elements (ld_codes >= cols; the bytes
// between cols and ld_codes are never read); `packed` is row-major with no padding and must not
// overlap `codes`. Words are stored in host order (little-endian on every supported host).
//
// This header compiles without CUDA: cudaStream_t is only forward-declared.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace mq::kernels {

// 4-bit values per int32 word.
inline constexpr int64_t kInt4PerWord = 8;

// Words holding `n` packed values: ceil(n / 8).
constexpr int64_t Int4PackedWords(int64_t n) { return (n + kInt4PerWord - 1) / kInt4PerWord; }

// CPU reference of the row packing: fills packed[rows][Int4PackedWords(cols)] and returns the
// number of codes outside [-8, 7]. Host pointers. Thread-safe: keeps no state. rows or cols of 0
// is a no-op returning 0; negative sizes or ld_codes < cols are a caller bug (checked in debug
// builds only).
int64_t PackInt4Cpu(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                    int32_t* packed);

// CPU reference of the transposed packing: fills packed[Int4PackedWords(rows)][cols] and returns
// the number of codes outside [-8, 7]. Same contract as PackInt4Cpu otherwise.
int64_t PackInt4TransposedCpu(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                              int32_t* packed);

// True when this build contains the CUDA kernels (MQ_ENABLE_CUDA=ON).
bool PackInt4CudaBuilt();

// OK when the CUDA kernels can run on `device`: FailedPrecondition naming the device when there
// is no such device or when this binary holds no code for its architecture (rebuild with
// MQ_CUDA_ARCHS); Unimplemented when mq was built without CUDA. Any architecture the binary was
// built for is supported.
absl::Status PackInt4IsSupported(int device);

// Enqueues the row packing on `stream` (`codes`, `packed` and `out_of_range` in device memory of
// the current device). When `out_of_range` is not null, the number of codes outside [-8, 7] is
// ADDED to *out_of_range (the caller zeroes it first); null skips the count. Returns after the
// launch, without synchronizing; the caller synchronizes the stream before reading `packed` or
// the count. Any alignment works; rows whose start is 8-byte aligned (e.g. ld_codes % 8 == 0
// and an aligned `codes`) read 8 codes per load. rows or cols of 0 is a no-op.
// InvalidArgument naming the argument for negative sizes, ld_codes < cols, a size overflowing
// int64, or a null `codes`/`packed` with a non-empty matrix; Internal with the CUDA error text
// when the launch fails; Unimplemented without CUDA. Does not call PackInt4IsSupported (call it
// once per device up front).
absl::Status LaunchPackInt4(const int8_t* codes, int64_t rows, int64_t cols, int64_t ld_codes,
                            int32_t* packed, int64_t* out_of_range, cudaStream_t stream);

// The transposed packing on `stream` (packed int32 [ceil(rows/8), cols]); otherwise the same
// contract as LaunchPackInt4.
absl::Status LaunchPackInt4Transposed(const int8_t* codes, int64_t rows, int64_t cols,
                                      int64_t ld_codes, int32_t* packed, int64_t* out_of_range,
                                      cudaStream_t stream);

}  // namespace mq::kernels
