// safetensors header reader (FORMATS.md §1.1): parses and validates the 8-byte length and the
// JSON header of a .safetensors file without touching the tensor data.
//
// Pure functions with no shared state; safe to call from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/dtype.h"

namespace mq::model {

// The reference implementation refuses headers longer than this (bytes).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// One tensor entry of a validated header.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kBool;
  std::vector<int64_t> shape;  // [] is a scalar (one element)
  uint64_t data_begin = 0;     // relative to the start of the data buffer
  uint64_t data_end = 0;       // one past the last byte, relative to the data buffer
  uint64_t file_offset = 0;    // absolute file offset of the first byte: 8 + header_len + begin

  uint64_t num_bytes() const { return data_end - data_begin; }
  // Product of `shape` (1 for a scalar). Validation guarantees it fits in int64.
  int64_t num_elements() const;
};

// A validated header. Invariants: tensors are contiguous in `tensors` order starting at data
// offset 0, each spans exactly prod(shape)·bits/8 bytes, and 8 + header_len + (last end) ==
// file_size.
struct SafetensorsHeader {
  uint64_t header_len = 0;  // N, the JSON length including any space padding
  uint64_t file_size = 0;
  std::map<std::string, std::string> metadata;  // "__metadata__" (empty when absent or null)
  std::vector<TensorInfo> tensors;              // ascending data offsets (file order)
  std::map<std::string, size_t, std::less<>> index_by_name;  // name -> position in `tensors`

  uint64_t data_offset() const { return 8 + header_len; }
  // nullptr when the header has no tensor `name`.
  const TensorInfo* Find(std::string_view name) const;
};

// Validates a header: `header_json` must be the N = `header_len` bytes that follow the 8-byte
// length in a file of `file_size` bytes (a shorter view means the file was truncated). Checks,
// in the reference implementation's order: N <= kMaxSafetensorsHeaderBytes; 8 + N <= file_size;
// the header starts with '{' and is one valid UTF-8 JSON object (trailing spaces allowed);
// no duplicate keys at any level; "__metadata__" is null or an object of strings; every other
// entry is {"dtype": known dtype string, "shape": [non-negative integers], "data_offsets":
// [begin, end]} (other fields are ignored, as serde does); the element count and bit count do
// not overflow 64 bits and the bit count is a multiple of 8; sorted by offsets the tensors start
// at 0, have no holes or overlaps and each spans exactly its byte size; and the data buffer ends
// exactly at the end of the file.
//
// Errors are InvalidArgument, one sentence naming the tensor and the expected vs found value,
// e.g. `tensor "x.weight": data_offsets [0, 10] span 10 bytes but shape [2, 3] of BF16 needs 12`.
// No I/O; never reads outside `header_json`; suitable for fuzzing.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header_json,
                                                         uint64_t header_len, uint64_t file_size);

// Opens `path`, takes the file size from fstat, reads only the 8-byte length and the header
// (checking the length against the limit and the file size before allocating), and parses it
// with ParseSafetensorsHeader. Every error message starts with "<path>: ". A missing file is
// NotFound; other open/read failures carry the errno's status code; format errors (including a
// file shorter than 8 bytes or not a regular file) are InvalidArgument.
absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path);

// Same as ReadSafetensorsHeader for an open file descriptor (reads with pread; the offset is
// untouched). Errors do not name the file: callers add the path.
absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeaderFromFd(int fd);

// "[2, 3]" (used in messages across worker/model).
std::string ShapeToString(const std::vector<int64_t>& shape);

}  // namespace mq::model
