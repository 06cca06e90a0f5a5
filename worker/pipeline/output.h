// The quantize job's output directory: per-layer files written by the gang's ranks as each layer
// is solved, and the finalization that turns the committed files into a loadable
// compressed-tensors checkpoint with a manifest.
//
// Layout of a finished output directory:
//   model-layerLLLLL-rankRRR-of-KKK.safetensors  one per (committed step, rank that wrote tensors)
//   model-globals.safetensors                    embedding, final norm, lm_head, and the tensors of
//                                                layers outside the pipeline (e.g. MTP, ignored)
//   model.safetensors.index.json, config.json (with quantization_config), tokenizer and
//   generation files copied from the model, and manifest.json (written last).
// manifest.json lists every other file with its size and SHA-256, sorted by name; it holds no
// time or job id, so the same output always has the same manifest bytes.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Durability: every file is written to a temporary name, fsynced and renamed (the writer's
// protocol); finalization is idempotent, so a crash in the middle is repaired by running it again.
// Threading: free functions; one finalization per directory at a time.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/safetensors_writer.h"
#include "worker/pipeline/types.h"
#include "worker/quant/compressed_tensors.h"

namespace mq::pipeline {

// Lowercase hex SHA-256 of `data` / of a file's content (errno-derived status on I/O errors).
std::string Sha256Hex(std::string_view data);
absl::StatusOr<std::string> Sha256OfFile(const std::string& path);
// Size and SHA-256 of `dir`/`name`.
absl::StatusOr<OutputFileInfo> DescribeFile(const std::string& dir, const std::string& name);

// Writes `tensors` as the safetensors file `dir`/`name` (model::WriteSafetensors: temp file,
// fsync, rename) and returns its size and SHA-256, hashed from memory on a second thread while
// the file is written (the same values DescribeFile would read back).
absl::StatusOr<OutputFileInfo> WriteDescribedSafetensors(const std::string& dir,
                                                         const std::string& name,
                                                         std::vector<model::TensorData> tensors);

// "model-layer00003-rank001-of-002.safetensors".
std::string LayerFileName(int layer, int rank, int world_size);
inline constexpr char kGlobalsFileName[] = "model-globals.safetensors";
inline constexpr char kManifestFileName[] = "manifest.json";

// Tensors of a set of safetensors files in one directory, by name (e.g. the committed files of
// a job, read back to replay earlier layers). Immutable after Open.
class FileSetReader {
 public:
  static absl::StatusOr<std::unique_ptr<FileSetReader>> Open(
      const std::string& dir, const std::vector<OutputFileInfo>& files);
  bool Has(const std::string& name) const { return where_.count(name) > 0; }
  absl::StatusOr<model::TensorView> Get(const std::string& name) const;

 private:
  std::vector<std::unique_ptr<model::SafetensorsFile>> files_;
  std::map<std::string, const model::SafetensorsFile*> where_;
};

// Entry names in `dir` (files and folders, sorted, without "." and ".."); an absent directory
// has none (`exists` says which). Errno-derived status otherwise.
absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir, bool* exists);

// Deletes the layer pipeline's hidden-state checkpoints (hidden-step*.safetensors) in `dir`, then
// `dir` itself when empty. Best effort (errors are ignored: the files are only a cache).
void RemoveHiddenCheckpoints(const std::string& dir);

// Checks that `output_dir` can receive a job's output: it is not the model directory and it
// does not exist, is empty, or holds only files an mq output consists of (an earlier attempt's
// or run's). FailedPrecondition naming the problem otherwise (a foreign file, not a directory,
// not writable).
absl::Status CheckOutputLocation(const std::string& model_dir, const std::string& output_dir);

struct FinalizeOptions {
  std::string model_dir;
  std::string output_dir;
  std::vector<OutputFileInfo> committed_files;  // every committed step's files
  int num_pipeline_layers = 0;                  // layers [0, n) are covered by committed files
  quant::CompressedTensorsOptions format;
};

struct FinalizeOutput {
  std::string manifest_sha256;
  int files = 0;            // files listed in the manifest
  int64_t total_bytes = 0;  // their sizes summed
  int removed_files = 0;    // stray files deleted
};

// Verifies every committed file (present, recorded size), writes model-globals.safetensors,
// the index (from the files' own headers), config.json, the copied tokenizer/generation files
// and manifest.json, then deletes every other file that an mq output could contain (files of
// uncommitted steps, temporaries). FailedPrecondition when a committed file is missing or has
// another size; the reader's and writer's errors otherwise.
absl::StatusOr<FinalizeOutput> FinalizeOutputDir(const FinalizeOptions& options);

}  // namespace mq::pipeline
