// A small S3 client on libcurl (CURLOPT_AWS_SIGV4, path-style addressing): the object
// operations mq needs to read checkpoints from and write outputs to an S3-compatible store.
//
// Threading: one S3Client may be used from any number of threads at once; it keeps a pool of
// curl handles (so connections are reused) under a mutex and runs each request on one handle.
// Durability: an object exists once Put or CompleteMultipartUpload returned OK; nothing is
// buffered in the client.
//
// Every request carries the real SHA-256 of its body in x-amz-content-sha256 (signed). Retryable
// failures (5xx, SlowDown, connection resets, stalls, short bodies) are retried with exponential
// backoff and full jitter, at most S3Config::max_attempts tries, then returned. Errors name the
// operation, s3://bucket/key, the HTTP status and S3's error code and message
// ("GetObject s3://b/k: HTTP 404 NoSuchKey: The specified key does not exist."), never a
// credential. Status codes: NOT_FOUND (no such key, bucket or upload), PERMISSION_DENIED (403:
// bad credentials, signature, access), INVALID_ARGUMENT (other 4xx, e.g. a wrong region),
// UNAVAILABLE (retryable failures after the last try), DATA_LOSS (a body of the wrong length).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/s3/s3_config.h"

namespace mq::s3 {

struct ObjectInfo {
  uint64_t size = 0;
  std::string etag;  // without quotes
  std::map<std::string, std::string>
      metadata;  // x-amz-meta-* headers, names lowercased, prefix cut
};

struct ListedObject {
  std::string key;
  uint64_t size = 0;
  std::string etag;
};

struct MultipartUpload {
  std::string key;
  std::string upload_id;
};

struct CompletedPart {
  int part_number = 0;
  std::string etag;
};

struct PutOptions {
  std::map<std::string, std::string> metadata;  // sent as x-amz-meta-<name>
  // If-None-Match: * (fail with ALREADY_EXISTS when the key exists, where the store supports it).
  bool if_none_match = false;
};

// Counters of what the client did, for tests and metrics.
struct S3ClientStats {
  uint64_t requests = 0;  // HTTP requests sent, retries included
  uint64_t retries = 0;
};

class S3Client {
 public:
  explicit S3Client(S3Config config);
  ~S3Client();
  S3Client(const S3Client&) = delete;
  S3Client& operator=(const S3Client&) = delete;

  const S3Config& config() const { return config_; }

  // HeadObject: NOT_FOUND when the key (or bucket) does not exist.
  absl::StatusOr<ObjectInfo> Head(const std::string& bucket, const std::string& key);

  // Reads bytes [offset, offset + length) of the object into `out` (length bytes). A body of
  // another length is retried, then DATA_LOSS; a range past the end is INVALID_ARGUMENT.
  absl::Status GetRange(const std::string& bucket, const std::string& key, uint64_t offset,
                        uint64_t length, uint8_t* out);

  // The whole object; FAILED_PRECONDITION when it is larger than `max_bytes`.
  absl::StatusOr<std::string> GetObject(const std::string& bucket, const std::string& key,
                                        uint64_t max_bytes);

  // PutObject of `data` (one request; for objects up to a few hundred MiB).
  absl::Status Put(const std::string& bucket, const std::string& key, absl::string_view data,
                   const PutOptions& options = {});

  // Multipart upload. Parts are 5 MiB-5 GiB except the last, numbered 1-10000. UploadPart is
  // idempotent per (upload_id, part_number) and returns the part's ETag.
  absl::StatusOr<std::string> CreateMultipartUpload(const std::string& bucket,
                                                    const std::string& key,
                                                    const PutOptions& options = {});
  absl::StatusOr<std::string> UploadPart(const std::string& bucket, const std::string& key,
                                         const std::string& upload_id, int part_number,
                                         absl::string_view data);
  absl::Status CompleteMultipartUpload(const std::string& bucket, const std::string& key,
                                       const std::string& upload_id,
                                       const std::vector<CompletedPart>& parts);
  // NOT_FOUND when the upload is unknown (already completed or aborted).
  absl::Status AbortMultipartUpload(const std::string& bucket, const std::string& key,
                                    const std::string& upload_id);
  // Incomplete uploads whose key starts with `prefix` (all pages).
  absl::StatusOr<std::vector<MultipartUpload>> ListMultipartUploads(const std::string& bucket,
                                                                    const std::string& prefix);

  // ListObjectsV2 of every key starting with `prefix` (all pages), in key order.
  absl::StatusOr<std::vector<ListedObject>> ListObjects(const std::string& bucket,
                                                        const std::string& prefix);

  // DeleteObject; OK when the key does not exist (S3 semantics).
  absl::Status Delete(const std::string& bucket, const std::string& key);

  S3ClientStats stats() const;

  // Percent-encodes `s` as SigV4 wants (RFC 3986 unreserved kept; '/' kept when `keep_slash`).
  static std::string UriEncode(absl::string_view s, bool keep_slash);

  // Implementation details (defined in s3_client.cc).
  struct Request;
  struct Response;
  struct Handle;

 private:
  // Runs `request` with retries; a non-2xx final answer becomes an error status.
  absl::StatusOr<Response> Run(const Request& request);
  // One try on `handle`.
  Response Perform(Handle& handle, const Request& request);
  std::unique_ptr<Handle> TakeHandle();
  void ReturnHandle(std::unique_ptr<Handle> handle);

  S3Config config_;
  std::string userpwd_;
  std::string sigv4_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Handle>> pool_;
  S3ClientStats stats_;
};

// Uploads `data` to s3://bucket/key: one Put below `part_bytes`, else a multipart upload of
// `part_bytes` parts (up to `parallel` in flight), with the SHA-256 of the whole object in
// x-amz-meta-sha256. A failure aborts the multipart upload before returning, so no incomplete
// upload is left behind. Returns the lowercase hex SHA-256.
absl::StatusOr<std::string> UploadObject(S3Client& client, const std::string& bucket,
                                         const std::string& key, absl::string_view data,
                                         uint64_t part_bytes = 64ull << 20, int parallel = 4,
                                         const PutOptions& options = {});

// UploadObject of the file at `path`, streamed: read once for its SHA-256, then part by part, so
// that at most `parallel` parts are in memory. DATA_LOSS naming the path when `sha256` is given
// and the file's differs (nothing is uploaded), or when the file shrinks during the upload.
absl::StatusOr<std::string> UploadFile(S3Client& client, const std::string& bucket,
                                       const std::string& key, const std::string& path,
                                       const std::string& sha256 = "",
                                       uint64_t part_bytes = 64ull << 20, int parallel = 4,
                                       const PutOptions& options = {});

}  // namespace mq::s3
