// A job's output in an S3 store (s3://bucket/prefix): the worker writes the output into a local
// mirror folder exactly as for a local output (temp + fsync + rename, verified), and this file
// moves it to and from the store.
//
// Ownership: the prefix belongs to the job whose id its marker object `<prefix>/.mq-job` holds
// ({"job_id": "..."}), as a directory's marker does. A prefix holding objects without a marker,
// or another job's marker, is refused and left untouched; mq deletes only objects of an output
// its job owns, and only names an mq output consists of.
// Integrity: every uploaded object carries its SHA-256 in x-amz-meta-sha256 (and the multipart
// upload aborts on failure); the manifest is uploaded last, after every file it lists.
//
// Plain C++ (no torch, no proto). Threading: one caller per prefix at a time (the worker runs one
// assignment at a time; the coordinator gives a prefix to one job).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/s3/s3_client.h"

namespace mq::storage {

inline constexpr char kS3OwnerMarker[] = ".mq-job";

// Claims s3://bucket/prefix for `job_id`: OK when its marker names `job_id` already, or when the
// prefix is empty (the marker is then written with If-None-Match and read back; with
// `check_only`, nothing is written). FAILED_PRECONDITION naming the other job, or the objects
// found (first few and count).
absl::Status ClaimS3Output(s3::S3Client& client, const std::string& uri, const std::string& job_id,
                           bool check_only = false);

// Creates the local mirror folder of job `job_id`'s s3:// output (with parents) and its owner
// marker when absent, so the engine's ownership checks treat it as the job's own directory.
absl::Status PrepareMirror(const std::string& mirror, const std::string& job_id);

// Uploads `local_dir`/`name` to `uri`/`name` (UploadObject: multipart from `part_bytes`, SHA-256
// in metadata, aborted on failure). DATA_LOSS when the local file's SHA-256 is not `sha256`
// (empty: not checked). Returns the SHA-256.
absl::StatusOr<std::string> UploadOutputFile(s3::S3Client& client, const std::string& uri,
                                             const std::string& local_dir, const std::string& name,
                                             const std::string& sha256, uint64_t part_bytes);

// Downloads each `names` entry missing from `local_dir` (temp + rename); the caller verifies
// hashes as it does for local files. NOT_FOUND naming the object for one missing in the store.
absl::Status FetchOutputFiles(s3::S3Client& client, const std::string& uri,
                              const std::string& local_dir, const std::vector<std::string>& names);

// Publishes a finalized mirror: uploads every file local manifest.json lists (skipping objects
// already there with the same size and SHA-256 metadata), then manifest.json; then deletes
// layer-file objects (model-layer*.safetensors) the manifest does not list, and aborts the
// incomplete multipart uploads under the prefix. The prefix must be `job_id`'s.
absl::Status PublishS3Output(s3::S3Client& client, const std::string& uri,
                             const std::string& local_dir, const std::string& job_id,
                             uint64_t part_bytes);

// Aborts every incomplete multipart upload under the prefix (a killed attempt's); returns how
// many.
absl::StatusOr<int> AbortS3Uploads(s3::S3Client& client, const std::string& uri);

// Part size for output uploads: MQ_S3_PART_BYTES (default 64 MiB; at least 64 KiB, which only
// stores accepting parts under S3's 5 MiB minimum take, e.g. in tests).
uint64_t OutputPartBytesFromEnv();

}  // namespace mq::storage
