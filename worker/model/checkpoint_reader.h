// Zero-copy access to the tensors of safetensors files and of whole HF checkpoints
// (model.safetensors.index.json + shards), through read-only memory maps.
//
// Every file is validated (ParseSafetensorsHeader) before any view is handed out, so a view
// never points outside its mapping. Views stay valid while their SafetensorsFile /
// CheckpointReader lives. Reading is thread-safe; CheckpointReader opens shards lazily under
// an internal lock.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/dtype.h"
#include "worker/model/safetensors.h"

namespace mq::model {

// A tensor's bytes inside a mapped file (little-endian, row-major, no strides).
struct TensorView {
  std::string name;
  DType dtype = DType::kBool;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  uint64_t num_bytes = 0;

  int64_t num_elements() const;
};

class SafetensorsFile {
 public:
  // Maps `path` read-only and validates its header; errors name the file and the problem.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  // NOT_FOUND naming the tensor and the file when absent.
  absl::StatusOr<TensorView> Get(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  SafetensorsHeader header_;
  const uint8_t* base_ = nullptr;  // the whole file, mapped
  uint64_t size_ = 0;
};

class CheckpointReader {
 public:
  // Reads the index of `dir` (or a single `model.safetensors` when there is no index).
  static absl::StatusOr<std::unique_ptr<CheckpointReader>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // All tensor names of the checkpoint, sorted.
  const std::vector<std::string>& names() const { return names_; }
  bool Has(const std::string& name) const;
  // Opens the tensor's shard on first use; NOT_FOUND for an unknown name.
  absl::StatusOr<TensorView> Get(const std::string& name);

 private:
  CheckpointReader() = default;
  std::string dir_;
  std::vector<std::string> names_;
  std::map<std::string, std::string> shard_of_;  // tensor -> shard file name
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
};

}  // namespace mq::model
