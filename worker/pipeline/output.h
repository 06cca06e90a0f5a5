// The quantize job's output directory: per-layer files written by the gang's ranks as each layer
// is solved, and the finalization that turns the committed files into a loadable
// compressed-tensors checkpoint with a manifest.
//
// Layout of a finished output directory:
//   .mq-job                                      the owner marker: {"job_id": "j-..."} (below)
//   model-layerLLLLL-rankRRR-of-KKK.safetensors  one per (committed step, rank that wrote tensors)
//   model-globals.safetensors                    embedding, final norm, lm_head, and the tensors of
//                                                layers outside the pipeline (e.g. MTP, ignored)
//   model.safetensors.index.json, config.json (with quantization_config), tokenizer and
//   generation files copied from the model, and manifest.json (written last); quality.json
//   (the evaluation's measures) when the job evaluated its output, added to the manifest then.
// manifest.json lists every other file with its size and SHA-256, sorted by name, except the
// marker (it holds the job id, and the manifest holds no time or job id, so the same output
// always has the same manifest bytes).
//
// Ownership: a directory belongs to the job whose id its marker holds. A job claims an empty or
// new directory (ClaimOutputLocation) before it writes anything; a directory claimed by another
// job, or one holding any entry without a marker, is refused and left untouched. The marker stays
// in the finished output, so no later job ever reuses (and overwrites) a finished output.
// Finalization deletes only files an mq output consists of, and only in a directory its job owns.
//
// Integrity: committed files carry size and SHA-256; finalization and the replay reader verify
// both before using a file, and report mismatches as DATA_LOSS naming the files (CorruptFilesOf).
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Durability: every file is written to a temporary name, fsynced and renamed (the writer's
// protocol); finalization is idempotent, so a crash in the middle is repaired by running it again.
// Threading: free functions; finalization locks the marker (flock), so at most one runs per
// directory at a time across processes and hosts that share the lock.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/sha256.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/safetensors_writer.h"
#include "worker/pipeline/types.h"
#include "worker/quant/compressed_tensors.h"

namespace mq::pipeline {

// SHA-256 helpers live in common/ (mq-client uses them too).
using ::mq::Sha256Hex;
using ::mq::Sha256OfFile;
// Size and SHA-256 of `dir`/`name`.
absl::StatusOr<OutputFileInfo> DescribeFile(const std::string& dir, const std::string& name);

// What a committed file's read-back checks beside its size: the SHA-256 of each consecutive
// `range_bytes` of the file (the last range shorter), computed from the bytes written while they
// were written. Ranges are read and hashed on several threads, so the read-back runs at the
// storage's speed instead of one core's hashing speed (~1.4 GB/s).
struct ReadBackRanges {
  int64_t range_bytes = int64_t{256} << 20;  // > 0
  std::vector<std::string> sha256;           // in file order
};

// Writes `tensors` as the safetensors file `dir`/`name` (model::WriteSafetensors: temp file,
// fsync, rename) and returns its size and SHA-256, hashed from memory on a second thread while
// the file is written (the same values DescribeFile would read back). With `ranges`, also fills
// ranges->sha256 for its range_bytes (hashed on other threads meanwhile: no extra wall time).
absl::StatusOr<OutputFileInfo> WriteDescribedSafetensors(const std::string& dir,
                                                         const std::string& name,
                                                         std::vector<model::TensorData> tensors,
                                                         ReadBackRanges* ranges = nullptr);

// "model-layer00003-rank001-of-002.safetensors".
std::string LayerFileName(int layer, int rank, int world_size);
inline constexpr char kGlobalsFileName[] = "model-globals.safetensors";
inline constexpr char kManifestFileName[] = "manifest.json";
// What the job's evaluation measured (EVALUATING); added to the manifest after finalization.
inline constexpr char kQualityFileName[] = "quality.json";
// The owner marker: {"job_id": "<job>"} (not listed in the manifest).
inline constexpr char kOwnerMarkerName[] = ".mq-job";

// Reads the committed file `dir`/`f->name` back from the storage (its pages dropped from the
// page cache first, so the bytes come from the disk, not from what was just written) and checks
// its size and SHA-256; then f->verified is the stamp the file had while it was read. With the
// `ranges` its write made (WriteDescribedSafetensors), each range is checked on its own thread
// (equal ranges make an equal file: both digests were taken from the same bytes); without them,
// or when they do not cover f->size, the whole file is hashed on this one. DATA_LOSS naming the
// file when the bytes differ (CorruptFilesOf lists it; the message names the first range that
// differs) or the file changed while it was read.
absl::Status ReadBackCommitted(const std::string& dir, OutputFileInfo* f,
                               const ReadBackRanges* ranges = nullptr);

// Checks each file's size and SHA-256 in `dir` against `files`: a full read each, except a file
// whose stamp still equals its `verified` one (read back after its commit and not changed
// since: ReadBackCommitted). OK, or DATA_LOSS naming every missing or different file
// (CorruptFilesOf lists them). `counts` (optional) says what was read.
absl::Status VerifyFiles(const std::string& dir, const std::vector<OutputFileInfo>& files,
                         VerifyCounts* counts = nullptr);

// Tensors of a set of safetensors files in one directory, by name (e.g. the committed files of
// a job, read back to replay earlier layers). Every file is checked before its bytes are used:
// its size at Open, its SHA-256 the first time one of its tensors is read (so a rank hashes only
// the files it reads). Thread-safe; the set of files is fixed at Open.
class FileSetReader {
 public:
  // DATA_LOSS naming every file that is missing, has another size, or whose header is unreadable
  // and whose SHA-256 differs; the reader's error for a file that matches but cannot be opened.
  static absl::StatusOr<std::unique_ptr<FileSetReader>> Open(
      const std::string& dir, const std::vector<OutputFileInfo>& files);
  bool Has(const std::string& name) const { return where_.count(name) > 0; }
  // NOT_FOUND for a name in no file; DATA_LOSS naming the file when its SHA-256 differs from the
  // recorded one (every later Get of that file fails the same way).
  absl::StatusOr<model::TensorView> Get(const std::string& name) const;

 private:
  struct Entry {
    std::unique_ptr<model::SafetensorsFile> file;
    OutputFileInfo info;
  };
  std::string dir_;
  std::vector<Entry> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index in files_
  mutable std::mutex mu_;
  mutable std::map<size_t, absl::Status> verified_;  // guarded by mu_
};

// Hidden-state checkpoints (the pipeline's scratch files, hidden-step*.safetensors): tensors
// chunk.0 .. chunk.N-1 with checksums in the safetensors metadata ("mq_chunk_sha256": each chunk's
// SHA-256, hex, comma-separated in chunk order, computed and checked on several threads).
// Checkpoints of older workers carry "mq_sha256" instead (one SHA-256 over the chunks in order,
// each as its byte count, 8 bytes little-endian, then its bytes), which is still checked.
// WriteHiddenCheckpoint writes one atomically (temp + fsync + rename); `chunks` must be named
// chunk.0 .. chunk.N-1 in order.
absl::Status WriteHiddenCheckpoint(const std::string& path, std::vector<model::TensorData> chunks);
// Opens a checkpoint of `num_chunks` chunks and verifies its checksum: NOT_FOUND when there is
// none; DATA_LOSS naming the file when it is unreadable, has no checksum (or not one per chunk),
// lacks a chunk, or its bytes differ from the checksum, naming the first chunk that differs (a
// damaged checkpoint must not be used).
absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> OpenHiddenCheckpoint(
    const std::string& path, size_t num_chunks);

// Entry names in `dir` (files and folders, sorted, without "." and ".."); an absent directory
// has none (`exists` says which). Errno-derived status otherwise.
absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir, bool* exists);

// Deletes the layer pipeline's hidden-state checkpoints (hidden-step*.safetensors) in `dir`, then
// `dir` itself when empty. Best effort (errors are ignored: the files are only a cache).
void RemoveHiddenCheckpoints(const std::string& dir);

// Checks that `output_dir` can receive job `job_id`'s output, writing nothing but the directory
// itself (created, with its parents, when missing): it is not the model directory, and it is new,
// empty, or owned by `job_id` (its marker) and holding only names an mq output consists of.
// FailedPrecondition naming the problem otherwise: the job owning it ("belongs to job j-..."),
// the entries it holds (the first few and their count), not a directory, not writable.
absl::Status CheckOutputLocation(const std::string& model_dir, const std::string& output_dir,
                                 const std::string& job_id);

// CheckOutputLocation, then claims the directory for `job_id` when it has no marker: the marker
// is written to a temporary file, fsynced, and linked to its name (link fails if another
// process claimed it first, and then that claim decides), and the directory is fsynced.
// Idempotent for the owning job. Call before writing anything into the directory.
absl::Status ClaimOutputLocation(const std::string& model_dir, const std::string& output_dir,
                                 const std::string& job_id);

// Reads the job id in `output_dir`'s marker: NOT_FOUND when there is none, FailedPrecondition
// when it is not {"job_id": "<non-empty string>"}.
absl::StatusOr<std::string> OutputOwner(const std::string& output_dir);

struct FinalizeOptions {
  std::string job_id;  // the directory must be (or become) this job's
  std::string model_dir;
  std::string output_dir;
  std::vector<OutputFileInfo> committed_files;  // every committed step's files
  int num_pipeline_layers = 0;                  // layers [0, n) are covered by committed files
  quant::CompressedTensorsOptions format;
  // Called once every file but manifest.json is written and verified, before the manifest is
  // written (the commit point of the output); a non-OK status stops finalization with that status
  // and nothing more is written. Empty: no check.
  std::function<absl::Status()> publish;
};

struct FinalizeOutput {
  std::string manifest_sha256;
  int files = 0;            // files listed in the manifest
  int64_t total_bytes = 0;  // their sizes summed
  int removed_files = 0;    // stray files deleted
  VerifyCounts verified;    // how the committed files were checked
};

// Claims the directory for options.job_id (ClaimOutputLocation) and holds an exclusive flock on
// its marker until it returns (UNAVAILABLE "another finalization holds DIR" when another process
// holds it), verifies every committed file's size and SHA-256 before writing anything (VerifyFiles:
// a file read back after its commit and unchanged since is not read again; DATA_LOSS naming
// every bad file), writes model-globals.safetensors, the index (from the files' own
// headers), config.json and the copied tokenizer/generation files, describes them from disk,
// calls options.publish, writes manifest.json, then deletes every other file that an mq output
// could contain (files of uncommitted steps, temporaries) and nothing else; the marker stays.
absl::StatusOr<FinalizeOutput> FinalizeOutputDir(const FinalizeOptions& options);

// OK when `output_dir` belongs to `job_id` and its manifest.json, without any quality.json
// entry, has the SHA-256 finalization reported (`manifest_sha256`); so it does before and after
// AddToManifest added quality.json. FailedPrecondition for another owner; DATA_LOSS naming
// manifest.json when it is missing, malformed or lists other files.
absl::Status CheckFinalizedOutput(const std::string& output_dir, const std::string& job_id,
                                  const std::string& manifest_sha256);

// Re-hashes every file manifest.json lists but quality.json: OK, or DATA_LOSS naming every
// missing or different file (CorruptFilesOf lists them), as VerifyFiles. Reads the whole output.
absl::Status VerifyFinalizedFiles(const std::string& output_dir);

// Writes `name` (e.g. quality.json) into job `job_id`'s finished output with `content` (temp
// file, fsync, rename) and rewrites manifest.json listing it (replacing an earlier entry of that
// name), under the marker's lock (UNAVAILABLE while a finalization or another addition holds
// it). CheckFinalizedOutput must pass first; nothing is written otherwise. A crash leaves either
// the old manifest or the new one (both pass CheckFinalizedOutput), so running it again repairs.
absl::StatusOr<FinalizeOutput> AddToManifest(const std::string& output_dir,
                                             const std::string& job_id,
                                             const std::string& manifest_sha256,
                                             const std::string& name, const std::string& content);

}  // namespace mq::pipeline
