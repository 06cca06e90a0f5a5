// The shards of a staged remote checkpoint (checkpoint_reader.h, kRemoteShardsFile): headers
// from the local stubs, tensor bytes fetched from the S3 store on demand into host buffers.
//
// Threading: every method is safe from any number of threads. A tensor is fetched once while
// it stays in the cache; concurrent Gets of it wait for the one fetch. Nothing is written.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/s3/s3_client.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/safetensors.h"

namespace mq::model {

class RemoteShards {
 public:
  // `dir` is the staged directory, `uri` the s3:// prefix its shards are under. The S3 client is
  // configured from the environment (s3_config.h S3ConfigFromEnv); its errors are returned.
  static absl::StatusOr<std::unique_ptr<RemoteShards>> Open(const std::string& dir,
                                                            const std::string& uri);
  // The same with a given client (tests).
  static absl::StatusOr<std::unique_ptr<RemoteShards>> Open(const std::string& dir,
                                                            const std::string& uri,
                                                            std::shared_ptr<s3::S3Client> client,
                                                            uint64_t cache_bytes);

  // Tensor names in shard `shard` (from its stub's header).
  absl::StatusOr<std::vector<std::string>> Names(const std::string& shard);
  // The tensor's bytes, fetched (or served from the cache); the view owns its buffer. Errors name
  // the tensor, the shard and the object.
  absl::StatusOr<TensorView> Get(const std::string& shard, const std::string& name);

  // Bytes fetched from the store so far (tests, metrics).
  uint64_t fetched_bytes() const;

  // Ranged GETs of a tensor are this large (the last smaller), up to kParallel at once.
  static constexpr uint64_t kChunkBytes = 8ull << 20;
  static constexpr int kParallel = 8;

 private:
  struct Fetch {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    absl::Status status;
    std::shared_ptr<uint8_t[]> buffer;
    uint64_t bytes = 0;
  };
  RemoteShards() = default;
  absl::StatusOr<const SafetensorsHeader*> Header(const std::string& shard);
  absl::Status FetchInto(const std::string& key, uint64_t offset, uint64_t length, uint8_t* out);
  void Admit(const std::string& cache_key, uint64_t bytes);

  std::string dir_;
  s3::S3Uri uri_;
  std::shared_ptr<s3::S3Client> client_;
  uint64_t cache_bytes_ = 0;

  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<SafetensorsHeader>> headers_;  // shard -> header
  std::map<std::string, std::shared_ptr<Fetch>> fetches_;              // "shard\ntensor" -> fetch
  std::list<std::string> lru_;  // completed fetches, oldest first
  uint64_t cached_bytes_ = 0;
  uint64_t fetched_bytes_ = 0;
};

}  // namespace mq::model
