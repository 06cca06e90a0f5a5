// Byte-exact safetensors and sharded-index writers (FORMATS.md §1).
//
// WriteSafetensors produces the same bytes as `safetensors.torch.save_file(tensors, path,
// metadata)` (Rust core: tensors ordered by dtype descending in enum order, then name ascending;
// compact serde JSON header, space-padded to a multiple of 8). WriteShardedIndex produces the
// same bytes as transformers' `json.dumps(index, indent=2, sort_keys=True) + "\n"`.
//
// Durability: every file is written to `<path>.tmp.<pid>`, fsynced, renamed over `path`, and the
// parent directory is fsynced, so after an OK return the complete file is durable and a reader
// never sees a partial file under `path`. On error the temporary file is removed and `path` is
// untouched. The functions keep no state and are safe to call from several threads for different
// paths; concurrent writes to the same path from one process are not supported.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/dtype.h"

namespace mq::model {

// One tensor to write. The writer takes the data by value (move it in): `bytes` holds the
// tensor's raw data exactly as stored on disk, row-major, little-endian, no padding.
struct TensorData {
  std::string name;  // non-empty UTF-8, unique within one file, not "__metadata__"
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // {} = scalar (1 element); a 0 dimension = empty tensor
  std::vector<uint8_t> bytes;  // size must be prod(shape) * DTypeBits(dtype) / 8
  // Instead of `bytes`: `view_size` bytes at `view`, owned elsewhere and kept alive by `owner`
  // (e.g. a host tensor written without a copy).
  const uint8_t* view = nullptr;
  uint64_t view_size = 0;
  std::shared_ptr<const void> owner;

  const uint8_t* data() const { return view ? view : bytes.data(); }
  uint64_t size() const { return view ? view_size : bytes.size(); }
};

// Writes a safetensors file at `path`. `metadata` becomes the `__metadata__` object (keys in
// std::map order); an empty map omits `__metadata__` entirely, like save_file(metadata=None).
// Byte identity with save_file holds for metadata of at most one key: safetensors keeps it in a
// HashMap and serializes several keys in an arbitrary order (we write them sorted).
// Errors: InvalidArgumentError naming the tensor for an empty, duplicate, reserved or non-UTF-8
// name, a negative dimension, an element count that overflows or is not a whole number of bytes,
// or a byte size that does not match shape × dtype; InvalidArgumentError when the header would
// exceed the 100,000,000 bytes readers accept; an errno-derived status for I/O failures.
absl::Status WriteSafetensors(const std::string& path, std::vector<TensorData> tensors,
                              const std::map<std::string, std::string>& metadata = {
                                  {"format", "pt"}});

// One contiguous piece of a file being written: `size` bytes at `data`.
struct FilePiece {
  const void* data = nullptr;
  size_t size = 0;
};
// Receives every byte of a file being written, as its pieces in file order, in one call; the
// pieces stay valid until it returns.
using FileObserver = std::function<void(const std::vector<FilePiece>& pieces)>;

// WriteSafetensors that also hands the file's bytes to `observe` — called once, on a second
// thread, while this one writes and fsyncs, so digests of the file (e.g. its SHA-256) cost
// neither an extra read nor extra wall time. `observe` has returned when this returns (OK or
// not); on an error the file may not exist.
absl::Status WriteSafetensorsObserved(const std::string& path, std::vector<TensorData> tensors,
                                      const std::map<std::string, std::string>& metadata,
                                      const FileObserver& observe);

// Returns `json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
// indent=2, sort_keys=True) + "\n"` byte for byte (ensure_ascii: non-ASCII and control
// characters become \uXXXX escapes, surrogate pairs above U+FFFF).
// Errors: InvalidArgumentError for a negative total_size or a non-UTF-8 name/file.
absl::StatusOr<std::string> ShardedIndexJson(int64_t total_size,
                                             const std::map<std::string, std::string>& weight_map);

// Writes ShardedIndexJson(total_size, weight_map) to `path` (usually
// `<dir>/model.safetensors.index.json`). `total_size` is the sum of tensor data bytes over all
// shards (not file sizes); `weight_map` maps every tensor name to its shard's file name.
absl::Status WriteShardedIndex(const std::string& path, int64_t total_size,
                               const std::map<std::string, std::string>& weight_map);

// Writes `contents` to `path` with the temp + fsync + rename + directory-fsync protocol described
// above (used for the index and for small files such as config.json).
absl::Status WriteFileAtomic(const std::string& path, std::string_view contents);

}  // namespace mq::model
