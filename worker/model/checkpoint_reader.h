// Zero-copy access to the tensors of safetensors files and of whole HF checkpoints
// (model.safetensors.index.json + shards), through read-only memory maps.
//
// Every file is validated (ParseSafetensorsHeader) before any view is handed out, so a view
// never points outside its mapping. Views stay valid while their SafetensorsFile /
// CheckpointReader lives. Reading is thread-safe; CheckpointReader opens shards lazily under
// an internal lock.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/dtype.h"
#include "worker/model/safetensors.h"

namespace mq::model {

// A tensor's bytes inside a mapped file, or inside a host buffer its bytes were fetched into
// from a remote store (little-endian, row-major, no strides).
struct TensorView {
  std::string name;
  DType dtype = DType::kBool;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  uint64_t num_bytes = 0;
  // For fetched tensors: keeps the buffer `data` points into alive as long as any copy of the
  // view exists (the reader's cache may drop it earlier). Null for mapped files (the mapping
  // lives as long as its reader).
  std::shared_ptr<const void> owner;
  // `data` is page-locked host memory (a staged copy, CheckpointReader::Stage): a device copy
  // may read it directly, without going through a staging buffer.
  bool page_locked = false;

  int64_t num_elements() const;
};

// Asks the kernel to start reading the view's pages in (madvise MADV_WILLNEED) so that a pass
// over the tensor does not stall on each page fault; a hint, failures are ignored.
void PrefetchTensor(const TensorView& view);

// PrefetchTensor, then reads one byte of every page of the view: when it returns, the pages are
// in the page cache and mapped. Blocks on the storage; meant for a thread that prepares a later
// load. A file that shrank is not reported here (its bytes read as zeros); the load that copies
// the view reports it through CheckTensorRead.
void TouchTensor(const TensorView& view);

// After the view's bytes were copied out (or read in place): OK when they were read intact;
// DATA_LOSS naming the file and the tensor when the mapped file shrank or became unreadable
// under the read (e.g. `model shard /m/model-00002-of-00004.safetensors shrank or became
// unreadable while reading tensor "x.weight" (...)`). OK for views not backed by a mapping.
absl::Status CheckTensorRead(const TensorView& view);

// One mapped .safetensors file. Immutable after Open, so every method is safe from any number
// of threads. The mapping is MAP_PRIVATE/PROT_READ and lives until destruction. It is guarded
// (mapping_guard.h): if the file shrinks or becomes unreadable while mapped, reads of the lost
// bytes see zeros instead of killing the process, and CheckTensorRead on a view reports
// DATA_LOSS naming the file; every copy out of a view must be followed by CheckTensorRead.
class SafetensorsFile {
 public:
  // Maps `path` read-only and validates its header; errors name the file and the problem
  // (NotFound for a missing file, InvalidArgument for a malformed one, e.g. a file shorter
  // than its header's data end, naming both sizes; errno codes otherwise). `kind` names the
  // file in read errors ("model shard" gives "model shard /m/x.safetensors shrank ...").
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(
      const std::string& path, const std::string& kind = "safetensors file");
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  // NOT_FOUND naming the tensor and the file when absent.
  absl::StatusOr<TensorView> Get(const std::string& name) const;
  // Drops the mapped pages lying wholly inside tensor `name` from this process (madvise
  // MADV_DONTNEED; the pages it shares with its neighbours stay). They stay in the page cache and
  // a later read maps them again from the file, so views stay valid: this only lowers the
  // process's resident set once the tensor has been copied out. A hint; unknown names and
  // failures are ignored.
  void Release(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  SafetensorsHeader header_;
  const uint8_t* base_ = nullptr;  // the whole file, mapped
  uint64_t size_ = 0;
  int guard_ = -1;  // RegisterMapping handle
};

// The file in a staged remote checkpoint directory that names where its shards are:
// {"uri": "s3://bucket/prefix"}. A staged directory (worker/storage/s3_stage.h) holds the
// checkpoint's small files (config, index, tokenizer) as copies and each shard as a sparse stub
// of the shard's size holding only its header; the tensors' bytes stay in the store.
inline constexpr char kRemoteShardsFile[] = ".mq-remote.json";

class RemoteShards;  // checkpoint_reader_remote.cc

// A whole HF checkpoint directory. The name -> shard map is fixed at Open; shards are opened
// (validated and mapped) on first use under `mu_` and then stay mapped until destruction, so
// Get may be called from any number of threads and views stay valid for the reader's lifetime.
//
// A staged remote checkpoint (kRemoteShardsFile present) reads the same way, except that Get
// fetches the tensor's bytes from the store by parallel ranged GETs into a host buffer (the
// view's `owner`) and blocks until they arrived; fetched tensors are kept in a cache of
// MQ_S3_READ_CACHE_BYTES (default 16 GiB; least recently fetched dropped first) so that a Get
// from a prefetching thread serves the loading thread's Get of the same tensor, and a Get of a
// tensor being fetched waits for that fetch instead of starting another.
class CheckpointReader {
 public:
  // Reads `dir`/model.safetensors.index.json (FORMATS.md §1.4: "weight_map" of tensor name ->
  // shard basename; "metadata" is ignored), or, when there is no index, opens the single
  // `dir`/model.safetensors. InvalidArgument naming the file and the entry for a malformed index
  // (not an object, no weight_map, a non-string or empty shard name, a shard name with '/', NUL
  // or ".."); NotFound when neither file exists. Shards named by the index are not opened here.
  static absl::StatusOr<std::unique_ptr<CheckpointReader>> Open(const std::string& dir);
  ~CheckpointReader();

  // Largest index file accepted (DeepSeek-V3's is about 9 MB).
  static constexpr uint64_t kMaxIndexBytes = 256ull << 20;

  const std::string& dir() const { return dir_; }
  // All tensor names of the checkpoint, sorted.
  const std::vector<std::string>& names() const { return names_; }
  bool Has(const std::string& name) const;
  // Shard file name (basename) holding `name`; empty when unknown.
  std::string ShardOf(const std::string& name) const;
  // Opens the tensor's shard on first use; NotFound for an unknown name; the shard's open error
  // (prefixed with the tensor name) when the shard is missing or malformed; NotFound when the
  // shard does not contain the tensor the index puts there.
  absl::StatusOr<TensorView> Get(const std::string& name);
  // SafetensorsFile::Release for the tensor's shard when that shard is open; nothing for a
  // staged remote checkpoint (its fetched buffers are the read cache's) or an unknown name.
  void Release(const std::string& name);
  // From now on Get(view.name) returns `view`: a copy of that tensor's bytes made earlier (e.g.
  // into page-locked memory ahead of a load), whose buffer view.owner keeps alive. It must hold
  // the same dtype, shape and bytes as the stored tensor, read intact (CheckTensorRead). Ignored
  // for a name the checkpoint does not have. Until Unstage(view.name).
  void Stage(TensorView view);
  // Get(name) reads the checkpoint again, and the staged copy's buffer is no longer referenced
  // by the reader.
  void Unstage(const std::string& name);

 private:
  CheckpointReader() = default;
  // The open shard `file` (opening it on first use).
  absl::StatusOr<const SafetensorsFile*> Shard(const std::string& file);

  std::string dir_;
  std::vector<std::string> names_;
  std::map<std::string, std::string> shard_of_;  // tensor -> shard file name
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, TensorView> staged_;  // under mu_
  std::unique_ptr<RemoteShards> remote_;  // set for a staged remote checkpoint
};

// For a staged remote checkpoint directory: the store URI its shards are in; nullopt-like empty
// string for an ordinary directory. Errors for an unreadable or malformed kRemoteShardsFile.
absl::StatusOr<std::string> RemoteShardsUri(const std::string& dir);

}  // namespace mq::model
