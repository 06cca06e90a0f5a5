#include "worker/storage/s3_stage.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
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
absl::Status WriteFileAtomically(const std::string& path, const std::string& data,
                                 uint64_t size) {
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
  std::error_code ec;
  std::filesystem::remove_all(local_dir, ec);
  std::filesystem::create_directories(local_dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat(local_dir, ": cannot create: ", ec.message()));
  }
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
      absl::Status s = client.GetRange(parsed->bucket, o.key, 0, 8,
                                       reinterpret_cast<uint8_t*>(len.data()));
      if (!s.ok()) return s;
      const uint64_t header_len = LittleEndian64(len);
      if (header_len > model::kMaxSafetensorsHeaderBytes || 8 + header_len > o.size) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": header length ", header_len, " does not fit the object's ", o.size,
            " bytes (at most ", model::kMaxSafetensorsHeaderBytes, ")"));
      }
      std::string head(8 + header_len, '\0');
      std::memcpy(head.data(), len.data(), 8);
      s = client.GetRange(parsed->bucket, o.key, 8, header_len,
                          reinterpret_cast<uint8_t*>(head.data() + 8));
      if (!s.ok()) return s;
      absl::StatusOr<model::SafetensorsHeader> header = model::ParseSafetensorsHeader(
          std::string_view(head).substr(8), header_len, o.size);
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

absl::Status StageRemoteFile(s3::S3Client& client, const std::string& field,
                             const std::string& uri, const std::string& local_path) {
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
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(local_path).parent_path(), ec);
  return WriteFileAtomically(local_path, *data, data->size());
}

}  // namespace mq::storage
