#include "worker/storage/s3_stage.h"

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string_view>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/s3/s3_config.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/safetensors.h"

namespace mq::storage {
namespace {

// Writes `size` bytes of which only the first `data.size()` are given (the rest a hole) to
// `path` through a temporary name.
absl::Status WriteFileAtomically(const std::string& path, const std::string& data, uint64_t size) {
  const std::string tmp = absl::StrCat(path, ".mq-tmp");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat(tmp, ": cannot create"));
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return absl::ErrnoToStatus(err, absl::StrCat(tmp, ": write"));
    }
    done += static_cast<size_t>(n);
  }
  if (size > data.size() && ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat(tmp, ": ftruncate"));
  }
  if (::close(fd) != 0) return absl::ErrnoToStatus(errno, absl::StrCat(tmp, ": close"));
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(tmp, ": rename to ", path));
  }
  return absl::OkStatus();
}

// POSIX rather than std::filesystem: in the worker, torch's libraries export std::filesystem
// symbols of another ABI that the dynamic linker may bind these calls to.
absl::Status MakeDirs(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    const std::string part = dir.substr(0, pos);
    if (::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::ErrnoToStatus(errno, absl::StrCat(part, ": cannot create"));
    }
  }
  return absl::OkStatus();
}

absl::Status RemoveTree(const std::string& dir) {
  struct stat st;
  if (::lstat(dir.c_str(), &st) != 0) return absl::OkStatus();
  const int rc = ::nftw(
      dir.c_str(),
      [](const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }, 16,
      FTW_DEPTH | FTW_PHYS);
  if (rc != 0) return absl::ErrnoToStatus(errno, absl::StrCat(dir, ": cannot remove"));
  return absl::OkStatus();
}

uint64_t LittleEndian64(const std::string& b) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(b[i]);
  return v;
}

}  // namespace

absl::StatusOr<StageResult> StageRemoteCheckpoint(s3::S3Client& client, const std::string& field,
                                                  const std::string& uri,
                                                  const std::string& local_dir) {
  absl::StatusOr<s3::S3Uri> parsed = s3::ParseS3Uri(field, uri);
  if (!parsed.ok()) return parsed.status();
  const std::string prefix = parsed->key.empty() ? "" : parsed->key + "/";
  absl::StatusOr<std::vector<s3::ListedObject>> objects =
      client.ListObjects(parsed->bucket, prefix);
  if (!objects.ok()) {
    return absl::Status(objects.status().code(),
                        absl::StrCat(field, " = \"", uri, "\": ", objects.status().message()));
  }
  if (objects->empty()) {
    return absl::NotFoundError(absl::StrCat(field, " = \"", uri,
                                            "\": no objects under this prefix (a model directory "
                                            "holds config.json and *.safetensors)"));
  }
  if (absl::Status s = RemoveTree(local_dir); !s.ok()) return s;
  if (absl::Status s = MakeDirs(local_dir); !s.ok()) return s;
  StageResult result;
  for (const s3::ListedObject& o : *objects) {
    const std::string name = o.key.substr(prefix.size());
    if (name.empty() || absl::StrContains(name, "/") || name == model::kRemoteShardsFile ||
        name.front() == '.') {
      continue;  // sub-folders, and never a remote file posing as our own
    }
    const std::string local = absl::StrCat(local_dir, "/", name);
    if (absl::EndsWith(name, ".safetensors")) {
      const std::string where = absl::StrCat("s3://", parsed->bucket, "/", o.key);
      if (o.size < 8) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": ", o.size, " bytes; a safetensors file has at least 8"));
      }
      std::string len(8, '\0');
      absl::Status s =
          client.GetRange(parsed->bucket, o.key, 0, 8, reinterpret_cast<uint8_t*>(len.data()));
      if (!s.ok()) return s;
      const uint64_t header_len = LittleEndian64(len);
      if (header_len > model::kMaxSafetensorsHeaderBytes || 8 + header_len > o.size) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": header length ", header_len, " does not fit the object's ",
                         o.size, " bytes (at most ", model::kMaxSafetensorsHeaderBytes, ")"));
      }
      std::string head(8 + header_len, '\0');
      std::memcpy(head.data(), len.data(), 8);
      s = client.GetRange(parsed->bucket, o.key, 8, header_len,
                          reinterpret_cast<uint8_t*>(head.data() + 8));
      if (!s.ok()) return s;
      absl::StatusOr<model::SafetensorsHeader> header =
          model::ParseSafetensorsHeader(std::string_view(head).substr(8), header_len, o.size);
      if (!header.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": ", header.status().message()));
      }
      if (absl::Status w = WriteFileAtomically(local, head, o.size); !w.ok()) return w;
      ++result.shard_stubs;
      result.remote_bytes += o.size;
      continue;
    }
    if (o.size > kMaxStagedFileBytes) continue;
    absl::StatusOr<std::string> data = client.GetObject(parsed->bucket, o.key, kMaxStagedFileBytes);
    if (!data.ok()) return data.status();
    if (absl::Status w = WriteFileAtomically(local, *data, data->size()); !w.ok()) return w;
    ++result.copied_files;
    result.copied_bytes += data->size();
  }
  const std::string marker = absl::StrCat("{\"uri\": \"", parsed->ToString(), "\"}\n");
  if (absl::Status w = WriteFileAtomically(absl::StrCat(local_dir, "/", model::kRemoteShardsFile),
                                           marker, marker.size());
      !w.ok()) {
    return w;
  }
  return result;
}

absl::Status StageRemoteFile(s3::S3Client& client, const std::string& field, const std::string& uri,
                             const std::string& local_path) {
  absl::StatusOr<s3::S3Uri> parsed = s3::ParseS3Uri(field, uri);
  if (!parsed.ok()) return parsed.status();
  if (parsed->key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " = \"", uri, "\": names a bucket, not an object"));
  }
  absl::StatusOr<std::string> data =
      client.GetObject(parsed->bucket, parsed->key, kMaxStagedFileBytes);
  if (!data.ok()) {
    return absl::Status(data.status().code(),
                        absl::StrCat(field, " = \"", uri, "\": ", data.status().message()));
  }
  const size_t slash = local_path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    if (absl::Status s = MakeDirs(local_path.substr(0, slash)); !s.ok()) return s;
  }
  return WriteFileAtomically(local_path, *data, data->size());
}

}  // namespace mq::storage
