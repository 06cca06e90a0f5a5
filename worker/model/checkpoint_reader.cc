#include "worker/model/checkpoint_reader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/path_policy.h"
#include "nlohmann/json.hpp"
#include "worker/model/json_util.h"
#include "worker/model/checkpoint_reader_remote.h"
#include "worker/model/mapping_guard.h"

namespace mq::model {
namespace {

constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kSingleFile = "model.safetensors";

// Prefixes `status`'s message with `prefix` and keeps its code.
absl::Status Annotate(const absl::Status& status, std::string_view prefix) {
  return absl::Status(status.code(), absl::StrCat(std::string(prefix), status.message()));
}

std::string Quote(std::string_view s) { return absl::StrCat("\"", std::string(s), "\""); }

// True for a plain file name that stays inside the checkpoint directory.
bool IsSafeShardName(std::string_view name) {
  return !name.empty() && name.find('/') == std::string_view::npos &&
         name.find('\0') == std::string_view::npos && name.find("..") == std::string_view::npos &&
         name != ".";
}

absl::StatusOr<bool> FileExists(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) return true;
  if (errno == ENOENT || errno == ENOTDIR) return false;
  return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot stat"));
}

}  // namespace

int64_t TensorView::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void PrefetchTensor(const TensorView& view) {
  if (view.data == nullptr || view.num_bytes == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(view.data) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(view.data) + view.num_bytes;
  (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_WILLNEED);
}

void TouchTensor(const TensorView& view) {
  PrefetchTensor(view);
  if (view.data == nullptr || view.num_bytes == 0) return;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint8_t sum = 0;
  for (uint64_t off = 0; off < view.num_bytes; off += page) {
    sum = static_cast<uint8_t>(sum + *static_cast<const volatile uint8_t*>(view.data + off));
  }
  sum = static_cast<uint8_t>(sum + *static_cast<const volatile uint8_t*>(view.data + view.num_bytes - 1));
  static_cast<void>(sum);
}

absl::Status CheckTensorRead(const TensorView& view) {
  if (view.data == nullptr || view.num_bytes == 0) return absl::OkStatus();
  return CheckMappedRead(view.data, view.num_bytes, absl::StrCat("tensor ", Quote(view.name)));
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path,
                                                                       const std::string& kind) {
  // A shard of a staged remote checkpoint is a sparse stub: its data would read as zeros.
  const size_t slash = path.rfind('/');
  const std::string parent = slash == std::string::npos ? "." : path.substr(0, slash);
  absl::StatusOr<bool> stub = FileExists(absl::StrCat(parent, "/", kRemoteShardsFile));
  if (stub.ok() && *stub) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": a header-only stub of a remote shard (", parent, " is a staged remote "
        "checkpoint); read its tensors through CheckpointReader"));
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": file not found"));
    return absl::ErrnoToStatus(err, absl::StrCat(path, ": cannot open"));
  }
  // The fd is only needed until the mapping exists.
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};

  absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeaderFromFd(fd);
  if (!header.ok()) return Annotate(header.status(), absl::StrCat(path, ": "));
  const uint64_t file_size = header->file_size;

  // file_size >= 8 here, so the mapping is never empty, even when the data region is.
  void* base = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (base == MAP_FAILED) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": mmap of ", file_size, " bytes"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->header_ = *std::move(header);
  file->base_ = static_cast<const uint8_t*>(base);
  file->size_ = file_size;
  file->guard_ = RegisterMapping(base, file_size, path, kind);
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  UnregisterMapping(guard_);
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

absl::StatusOr<TensorView> SafetensorsFile::Get(const std::string& name) const {
  const TensorInfo* info = header_.Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat("tensor ", Quote(name), " not found in ", path_));
  }
  TensorView view;
  view.name = info->name;
  view.dtype = info->dtype;
  view.shape = info->shape;
  // Validation guarantees file_offset + num_bytes <= size_; a 0-byte tensor may sit at the end.
  view.data = base_ + info->file_offset;
  view.num_bytes = info->num_bytes();
  return view;
}

void SafetensorsFile::Release(const std::string& name) const {
  const TensorInfo* info = header_.Find(name);
  if (info == nullptr || base_ == nullptr) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t data = reinterpret_cast<uintptr_t>(base_ + info->file_offset);
  const uintptr_t begin = (data + page - 1) & ~(page - 1);
  const uintptr_t end = (data + info->num_bytes()) & ~(page - 1);
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

CheckpointReader::~CheckpointReader() = default;

absl::StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(const std::string& dir) {
  std::unique_ptr<CheckpointReader> reader(new CheckpointReader());
  reader->dir_ = dir;
  absl::StatusOr<std::string> remote_uri = RemoteShardsUri(dir);
  if (!remote_uri.ok()) return remote_uri.status();
  if (!remote_uri->empty()) {
    absl::StatusOr<std::unique_ptr<RemoteShards>> remote = RemoteShards::Open(dir, *remote_uri);
    if (!remote.ok()) return remote.status();
    reader->remote_ = *std::move(remote);
  }
  absl::StatusOr<std::string> checked_index = ModelDirFile(dir, kIndexFile);
  if (!checked_index.ok()) return checked_index.status();
  const std::string& index_path = *checked_index;
  absl::StatusOr<bool> has_index = FileExists(index_path);
  if (!has_index.ok()) return has_index.status();

  if (!*has_index && reader->remote_ != nullptr) {
    absl::StatusOr<std::vector<std::string>> names = reader->remote_->Names(kSingleFile);
    if (!names.ok()) return names.status();
    for (const std::string& name : *names) reader->shard_of_.emplace(name, kSingleFile);
  } else if (!*has_index) {
    absl::StatusOr<std::string> single = ModelDirFile(dir, kSingleFile);
    if (!single.ok()) return single.status();
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open(*single, "model shard");
    if (!file.ok()) {
      if (absl::IsNotFound(file.status())) {
        return absl::NotFoundError(absl::StrCat(dir, ": no ", kIndexFile, " and no ", kSingleFile,
                                                ": not a safetensors checkpoint"));
      }
      return file.status();
    }
    for (const TensorInfo& info : (*file)->header().tensors) {
      reader->shard_of_.emplace(info.name, kSingleFile);
    }
    reader->shards_.emplace(kSingleFile, *std::move(file));
  } else {
    absl::StatusOr<std::string> text = ReadFileToString(index_path, kMaxIndexBytes);
    if (!text.ok()) return text.status();  // already names the file
    absl::StatusOr<nlohmann::json> index = ParseJsonStrict(*text);
    if (!index.ok()) return Annotate(index.status(), absl::StrCat(index_path, ": "));
    if (!index->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path, ": must be a JSON object with \"weight_map\", found ", JsonTypeName(*index)));
    }
    auto weight_map = index->find("weight_map");
    if (weight_map == index->end()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": missing \"weight_map\""));
    }
    if (!weight_map->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path,
                       ": \"weight_map\" must be an object of tensor name -> shard "
                       "file name, found ",
                       JsonTypeName(*weight_map)));
    }
    for (const auto& [name, shard] : weight_map->items()) {
      if (!shard.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map[", Quote(name),
                                                       "] = ", JsonForMessage(shard),
                                                       ": must be a shard file name (a string)"));
      }
      const std::string& file = shard.get_ref<const std::string&>();
      if (!IsSafeShardName(file)) {
        return absl::InvalidArgumentError(absl::StrCat(
            index_path, ": weight_map[", Quote(name), "] = ", JsonForMessage(shard),
            ": must be a file name inside the checkpoint directory (non-empty, no '/', "
            "no \"..\", no NUL)"));
      }
      reader->shard_of_.emplace(name, file);
    }
  }
  reader->names_.reserve(reader->shard_of_.size());
  for (const auto& entry : reader->shard_of_) reader->names_.push_back(entry.first);
  return reader;
}

bool CheckpointReader::Has(const std::string& name) const { return shard_of_.count(name) > 0; }

std::string CheckpointReader::ShardOf(const std::string& name) const {
  auto it = shard_of_.find(name);
  return it == shard_of_.end() ? std::string() : it->second;
}

absl::StatusOr<const SafetensorsFile*> CheckpointReader::Shard(const std::string& file) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = shards_.find(file);
  if (it != shards_.end()) return it->second.get();
  absl::StatusOr<std::string> path = ModelDirFile(dir_, file);
  if (!path.ok()) return path.status();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened =
      SafetensorsFile::Open(*path, "model shard");
  if (!opened.ok()) return opened.status();
  const SafetensorsFile* result = opened->get();
  shards_.emplace(file, *std::move(opened));
  return result;
}

void CheckpointReader::Release(const std::string& name) {
  if (remote_ != nullptr) return;
  auto it = shard_of_.find(name);
  if (it == shard_of_.end()) return;
  const SafetensorsFile* shard = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto found = shards_.find(it->second);
    if (found != shards_.end()) shard = found->second.get();  // open until the reader goes
  }
  if (shard != nullptr) shard->Release(name);
}

void CheckpointReader::Stage(TensorView view) {
  if (!Has(view.name)) return;
  std::lock_guard<std::mutex> lock(mu_);
  std::string name = view.name;
  staged_.insert_or_assign(std::move(name), std::move(view));
}

void CheckpointReader::Unstage(const std::string& name) {
  TensorView dropped;  // its buffer is released outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  auto it = staged_.find(name);
  if (it == staged_.end()) return;
  dropped = std::move(it->second);
  staged_.erase(it);
}

absl::StatusOr<TensorView> CheckpointReader::Get(const std::string& name) {
  auto it = shard_of_.find(name);
  if (it == shard_of_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor ", Quote(name), " is not in the checkpoint ", dir_));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto staged = staged_.find(name);
    if (staged != staged_.end()) return staged->second;
  }
  if (remote_ != nullptr) return remote_->Get(it->second, name);
  absl::StatusOr<const SafetensorsFile*> shard = Shard(it->second);
  if (!shard.ok()) {
    return Annotate(shard.status(),
                    absl::StrCat("tensor ", Quote(name), " (shard ", it->second, "): "));
  }
  absl::StatusOr<TensorView> view = (*shard)->Get(name);
  if (!view.ok()) {
    return absl::NotFoundError(absl::StrCat("tensor ", Quote(name), ": the index maps it to ",
                                            it->second, " but that shard does not contain it"));
  }
  return view;
}

}  // namespace mq::model
