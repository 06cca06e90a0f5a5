// Staging of inputs that live in an S3 store (s3://bucket/prefix model directories, datasets and
// tokenizers) into a local folder, so that the engine reads them as it reads local ones.
//
// A model directory is staged without its tensor data: its small files (config, index, tokenizer,
// generation files) are copied; each *.safetensors shard becomes a sparse stub of the shard's size
// holding only its header (fetched by ranged GET and validated), and the folder gets
// checkpoint_reader.h's kRemoteShardsFile naming the prefix, so CheckpointReader fetches the
// tensors from the store when they are loaded (parallel ranged GETs into host buffers) and the
// inspection reads the headers from the stubs.
//
// Plain C++ (no torch, no proto). Threading: functions may run concurrently on different local
// folders; a folder is owned by one caller at a time (the worker runs one assignment at a time).
// Durability: every file is written to a temporary name and renamed; kRemoteShardsFile is
// written last, so an interrupted staging is never mistaken for a complete one.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "common/s3/s3_client.h"

namespace mq::storage {

// Largest non-shard object of a model directory that is copied (bigger ones, e.g. consolidated
// .pth files, are skipped), and largest dataset or tokenizer object.
inline constexpr uint64_t kMaxStagedFileBytes = 2ull << 30;

struct StageResult {
  int copied_files = 0;
  int shard_stubs = 0;
  uint64_t copied_bytes = 0;
  uint64_t remote_bytes = 0;  // bytes of the shards, left in the store
};

// Stages the model directory `uri` ("s3://bucket/prefix"; its direct children) into `local_dir`,
// replacing what `local_dir` held. NOT_FOUND naming the URI when nothing is under the prefix;
// INVALID_ARGUMENT naming the shard when a shard's header is malformed; the client's errors
// (which name the object) otherwise. `field` names the location in messages (spec.model_uri).
absl::StatusOr<StageResult> StageRemoteCheckpoint(s3::S3Client& client, const std::string& field,
                                                  const std::string& uri,
                                                  const std::string& local_dir);

// Downloads the object `uri` to `local_path` (temporary name, then rename). NOT_FOUND naming the
// URI when it does not exist; FAILED_PRECONDITION when larger than kMaxStagedFileBytes.
absl::Status StageRemoteFile(s3::S3Client& client, const std::string& field, const std::string& uri,
                             const std::string& local_path);

}  // namespace mq::storage
