#include "worker/storage/s3_output.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/s3/s3_config.h"
#include "common/sha256.h"
#include "nlohmann/json.hpp"

namespace mq::storage {
namespace {

absl::StatusOr<s3::S3Uri> Parse(const std::string& uri) {
  return s3::ParseS3Uri("spec.output_uri", uri);
}

std::string Prefix(const s3::S3Uri& u) { return u.key.empty() ? "" : u.key + "/"; }

absl::StatusOr<std::string> ReadLocal(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status WriteLocal(const std::string& path, const std::string& data) {
  const std::string tmp = absl::StrCat(path, ".tmp.fetch");
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!out) return absl::InternalError(absl::StrCat(tmp, ": write failed"));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(tmp, ": rename"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> MarkerOwner(s3::S3Client& client, const s3::S3Uri& u) {
  absl::StatusOr<std::string> text =
      client.GetObject(u.bucket, Prefix(u) + kS3OwnerMarker, 64 << 10);
  if (!text.ok()) return text.status();
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("job_id") || !j["job_id"].is_string()) {
    return absl::FailedPreconditionError(absl::StrCat(
        u.Child(kS3OwnerMarker).ToString(),
        ": not an mq owner marker ({\"job_id\": \"j-...\"}); choose another output prefix"));
  }
  return j["job_id"].get<std::string>();
}

}  // namespace

absl::Status PrepareMirror(const std::string& mirror, const std::string& job_id) {
  for (size_t pos = 1; pos <= mirror.size(); ++pos) {
    if (pos != mirror.size() && mirror[pos] != '/') continue;
    const std::string part = mirror.substr(0, pos);
    if (::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::ErrnoToStatus(errno, absl::StrCat(part, ": cannot create"));
    }
  }
  const std::string marker = absl::StrCat(mirror, "/", kS3OwnerMarker);
  struct stat st;
  if (::stat(marker.c_str(), &st) == 0) return absl::OkStatus();
  return WriteLocal(marker, nlohmann::json{{"job_id", job_id}}.dump() + "\n");
}

uint64_t OutputPartBytesFromEnv() {
  const char* v = std::getenv("MQ_S3_PART_BYTES");
  uint64_t n = 0;
  if (v != nullptr && absl::SimpleAtoi(v, &n) && n >= (64u << 10)) return n;
  return 64ull << 20;
}

absl::Status ClaimS3Output(s3::S3Client& client, const std::string& uri, const std::string& job_id,
                           bool check_only) {
  absl::StatusOr<s3::S3Uri> u = Parse(uri);
  if (!u.ok()) return u.status();
  absl::StatusOr<std::string> owner = MarkerOwner(client, *u);
  if (owner.ok()) {
    if (*owner == job_id) return absl::OkStatus();
    return absl::FailedPreconditionError(
        absl::StrCat("output ", uri, " belongs to job ", *owner, " (its ", kS3OwnerMarker,
                     " marker): mq never writes into another job's output; choose another prefix"));
  }
  if (!absl::IsNotFound(owner.status())) return owner.status();
  absl::StatusOr<std::vector<s3::ListedObject>> objects = client.ListObjects(u->bucket, Prefix(*u));
  if (!objects.ok()) return objects.status();
  if (!objects->empty()) {
    std::vector<std::string> names;
    for (size_t i = 0; i < objects->size() && i < 3; ++i) names.push_back((*objects)[i].key);
    return absl::FailedPreconditionError(absl::StrCat(
        "output ", uri, " holds ", objects->size(), " objects mq did not write for this job (",
        absl::StrJoin(names, ", "), objects->size() > 3 ? ", ..." : "",
        "): mq writes only into a new or empty prefix; choose another prefix"));
  }
  if (check_only) return absl::OkStatus();
  s3::PutOptions put;
  put.if_none_match = true;
  absl::Status s = client.Put(u->bucket, Prefix(*u) + kS3OwnerMarker,
                              nlohmann::json{{"job_id", job_id}}.dump() + "\n", put);
  if (!s.ok() && !absl::IsAlreadyExists(s)) return s;
  // Another claimant may have won (stores without If-None-Match: last writer wins): the marker
  // read back decides.
  owner = MarkerOwner(client, *u);
  if (!owner.ok()) return owner.status();
  if (*owner != job_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("output ", uri, " was claimed by job ", *owner, " at the same time"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> UploadOutputFile(s3::S3Client& client, const std::string& uri,
                                             const std::string& local_dir, const std::string& name,
                                             const std::string& sha256, uint64_t part_bytes) {
  absl::StatusOr<s3::S3Uri> u = Parse(uri);
  if (!u.ok()) return u.status();
  return s3::UploadFile(client, u->bucket, Prefix(*u) + name, absl::StrCat(local_dir, "/", name),
                       sha256, part_bytes);
}

absl::Status FetchOutputFiles(s3::S3Client& client, const std::string& uri,
                              const std::string& local_dir, const std::vector<std::string>& names) {
  absl::StatusOr<s3::S3Uri> u = Parse(uri);
  if (!u.ok()) return u.status();
  for (const std::string& name : names) {
    const std::string path = absl::StrCat(local_dir, "/", name);
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) continue;
    absl::StatusOr<std::string> data = client.GetObject(u->bucket, Prefix(*u) + name, 64ull << 30);
    if (!data.ok()) return data.status();
    if (absl::Status s = WriteLocal(path, *data); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<int> AbortS3Uploads(s3::S3Client& client, const std::string& uri) {
  absl::StatusOr<s3::S3Uri> u = Parse(uri);
  if (!u.ok()) return u.status();
  absl::StatusOr<std::vector<s3::MultipartUpload>> open =
      client.ListMultipartUploads(u->bucket, Prefix(*u));
  if (!open.ok()) return open.status();
  int aborted = 0;
  for (const s3::MultipartUpload& up : *open) {
    absl::Status s = client.AbortMultipartUpload(u->bucket, up.key, up.upload_id);
    if (!s.ok() && !absl::IsNotFound(s)) return s;
    ++aborted;
  }
  return aborted;
}

absl::Status PublishS3Output(s3::S3Client& client, const std::string& uri,
                             const std::string& local_dir, const std::string& job_id,
                             uint64_t part_bytes) {
  absl::StatusOr<s3::S3Uri> u = Parse(uri);
  if (!u.ok()) return u.status();
  absl::StatusOr<std::string> owner = MarkerOwner(client, *u);
  if (!owner.ok()) return owner.status();
  if (*owner != job_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("output ", uri, " belongs to job ", *owner, ", not ", job_id));
  }
  absl::StatusOr<std::string> text = ReadLocal(absl::StrCat(local_dir, "/manifest.json"));
  if (!text.ok()) return text.status();
  nlohmann::json manifest = nlohmann::json::parse(*text, nullptr, false);
  if (!manifest.is_object() || !manifest.contains("files") || !manifest["files"].is_array()) {
    return absl::DataLossError(absl::StrCat(local_dir, "/manifest.json: malformed"));
  }
  absl::StatusOr<std::vector<s3::ListedObject>> existing =
      client.ListObjects(u->bucket, Prefix(*u));
  if (!existing.ok()) return existing.status();
  std::set<std::string> listed;
  for (const nlohmann::json& f : manifest["files"]) {
    const std::string name = f.value("name", "");
    const std::string sha = f.value("sha256", "");
    const uint64_t size = f.value("size", uint64_t{0});
    listed.insert(name);
    absl::StatusOr<s3::ObjectInfo> info = client.Head(u->bucket, Prefix(*u) + name);
    if (info.ok() && info->size == size && info->metadata["sha256"] == sha) continue;
    absl::StatusOr<std::string> up =
        UploadOutputFile(client, uri, local_dir, name, sha, part_bytes);
    if (!up.ok()) return up.status();
  }
  // The commit point: the manifest, after every file it lists.
  absl::StatusOr<std::string> up =
      UploadOutputFile(client, uri, local_dir, "manifest.json", "", part_bytes);
  if (!up.ok()) return up.status();
  for (const s3::ListedObject& o : *existing) {
    const std::string name = o.key.substr(Prefix(*u).size());
    if (absl::StartsWith(name, "model-layer") && absl::EndsWith(name, ".safetensors") &&
        !absl::StrContains(name, "/") && listed.count(name) == 0) {
      if (absl::Status s = client.Delete(u->bucket, o.key); !s.ok()) return s;
    }
  }
  absl::StatusOr<int> aborted = AbortS3Uploads(client, uri);
  return aborted.status();
}

}  // namespace mq::storage
