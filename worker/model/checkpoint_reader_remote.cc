#include "worker/model/checkpoint_reader_remote.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/path_policy.h"
#include "nlohmann/json.hpp"
#include "worker/model/json_util.h"

namespace mq::model {
namespace {

constexpr uint64_t kDefaultCacheBytes = 16ull << 30;

uint64_t CacheBytesFromEnv() {
  const char* v = std::getenv("MQ_S3_READ_CACHE_BYTES");
  uint64_t n = 0;
  if (v != nullptr && absl::SimpleAtoi(v, &n) && n > 0) return n;
  return kDefaultCacheBytes;
}

}  // namespace

absl::StatusOr<std::string> RemoteShardsUri(const std::string& dir) {
  const std::string path = absl::StrCat(dir, "/", kRemoteShardsFile);
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) return std::string();
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot stat"));
  }
  absl::StatusOr<std::string> text = ReadFileToString(path, 1 << 20);
  if (!text.ok()) return text.status();
  absl::StatusOr<nlohmann::json> json = ParseJsonStrict(*text);
  if (!json.ok() || !json->is_object() || !json->contains("uri") || !(*json)["uri"].is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": must be {\"uri\": \"s3://bucket/prefix\"}"));
  }
  return (*json)["uri"].get<std::string>();
}

absl::StatusOr<std::unique_ptr<RemoteShards>> RemoteShards::Open(const std::string& dir,
                                                                 const std::string& uri) {
  absl::StatusOr<s3::S3Config> config = s3::S3ConfigFromEnv(s3::ProcessEnv());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat("reading ", uri, ": ", config.status().message()));
  }
  return Open(dir, uri, std::make_shared<s3::S3Client>(*std::move(config)), CacheBytesFromEnv());
}

absl::StatusOr<std::unique_ptr<RemoteShards>> RemoteShards::Open(
    const std::string& dir, const std::string& uri, std::shared_ptr<s3::S3Client> client,
    uint64_t cache_bytes) {
  absl::StatusOr<s3::S3Uri> parsed = s3::ParseS3Uri(absl::StrCat(dir, "/", kRemoteShardsFile), uri);
  if (!parsed.ok()) return parsed.status();
  std::unique_ptr<RemoteShards> r(new RemoteShards());
  r->dir_ = dir;
  r->uri_ = *std::move(parsed);
  r->client_ = std::move(client);
  r->cache_bytes_ = cache_bytes;
  return r;
}

absl::StatusOr<const SafetensorsHeader*> RemoteShards::Header(const std::string& shard) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = headers_.find(shard);
  if (it != headers_.end()) return it->second.get();
  absl::StatusOr<std::string> path = ModelDirFile(dir_, shard);
  if (!path.ok()) return path.status();
  absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeader(*path);
  if (!header.ok()) return header.status();
  auto owned = std::make_unique<SafetensorsHeader>(*std::move(header));
  const SafetensorsHeader* result = owned.get();
  headers_.emplace(shard, std::move(owned));
  return result;
}

absl::StatusOr<std::vector<std::string>> RemoteShards::Names(const std::string& shard) {
  absl::StatusOr<const SafetensorsHeader*> header = Header(shard);
  if (!header.ok()) return header.status();
  std::vector<std::string> names;
  for (const TensorInfo& t : (*header)->tensors) names.push_back(t.name);
  return names;
}

absl::Status RemoteShards::FetchInto(const std::string& key, uint64_t offset, uint64_t length,
                                     uint8_t* out) {
  const uint64_t chunks = (length + kChunkBytes - 1) / kChunkBytes;
  if (chunks <= 1) return client_->GetRange(uri_.bucket, key, offset, length, out);
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  absl::Status first_error;
  auto work = [&] {
    for (uint64_t i; !failed && (i = next.fetch_add(1)) < chunks;) {
      const uint64_t begin = i * kChunkBytes;
      const uint64_t n = std::min(kChunkBytes, length - begin);
      absl::Status s = client_->GetRange(uri_.bucket, key, offset + begin, n, out + begin);
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (first_error.ok()) first_error = s;
        failed = true;
      }
    }
  };
  RunOnThreads(static_cast<size_t>(std::min<uint64_t>(kParallel, chunks)), work);
  return first_error;
}

void RemoteShards::Admit(const std::string& cache_key, uint64_t bytes) {
  // Called with mu_ held.
  lru_.push_back(cache_key);
  cached_bytes_ += bytes;
  while (cached_bytes_ > cache_bytes_ && lru_.size() > 1) {
    auto it = fetches_.find(lru_.front());
    if (it != fetches_.end()) {
      cached_bytes_ -= std::min(cached_bytes_, it->second->bytes);
      fetches_.erase(it);  // views still holding the buffer keep it alive
    }
    lru_.pop_front();
  }
}

absl::StatusOr<TensorView> RemoteShards::Get(const std::string& shard, const std::string& name) {
  const std::string object = uri_.Child(shard).key;
  auto prefix = [&] {
    return absl::StrCat("tensor \"", name, "\" (shard ", shard, ", s3://", uri_.bucket, "/", object,
                        "): ");
  };
  absl::StatusOr<const SafetensorsHeader*> header = Header(shard);
  if (!header.ok()) {
    return absl::Status(header.status().code(), absl::StrCat(prefix(), header.status().message()));
  }
  const TensorInfo* info = (*header)->Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat("tensor \"", name, "\": the index maps it to ", shard,
                                            " but that shard does not contain it"));
  }
  const std::string cache_key = absl::StrCat(shard, "\n", name);
  std::shared_ptr<Fetch> fetch;
  bool mine = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = fetches_.find(cache_key);
    if (it == fetches_.end()) {
      fetch = std::make_shared<Fetch>();
      fetches_.emplace(cache_key, fetch);
      mine = true;
    } else {
      fetch = it->second;
    }
  }
  if (mine) {
    absl::Status status;
    std::shared_ptr<uint8_t[]> buffer(new uint8_t[std::max<uint64_t>(info->num_bytes(), 1)]);
    status = FetchInto(object, info->file_offset, info->num_bytes(), buffer.get());
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (status.ok()) {
        fetched_bytes_ += info->num_bytes();
        fetch->bytes = info->num_bytes();
        Admit(cache_key, info->num_bytes());
      } else {
        fetches_.erase(cache_key);  // a later Get tries again
      }
    }
    {
      std::lock_guard<std::mutex> lock(fetch->mu);
      fetch->status = status;
      fetch->buffer = std::move(buffer);
      fetch->done = true;
    }
    fetch->cv.notify_all();
  }
  std::unique_lock<std::mutex> lock(fetch->mu);
  fetch->cv.wait(lock, [&] { return fetch->done; });
  if (!fetch->status.ok()) {
    return absl::Status(fetch->status.code(), absl::StrCat(prefix(), fetch->status.message()));
  }
  TensorView view;
  view.name = info->name;
  view.dtype = info->dtype;
  view.shape = info->shape;
  view.data = fetch->buffer.get();
  view.num_bytes = info->num_bytes();
  view.owner = fetch->buffer;
  return view;
}

uint64_t RemoteShards::fetched_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return fetched_bytes_;
}

}  // namespace mq::model
