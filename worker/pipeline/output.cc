#include "worker/pipeline/output.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/parallel.h"
#include "common/path_policy.h"
#include "common/sha256.h"
#include "worker/model/config.h"
#include "worker/model/fp8.h"
#include "worker/model/safetensors_writer.h"
#include "worker/quant/layer_tools.h"

namespace mq::pipeline {
namespace {

// Files copied from the model directory when present.
constexpr const char* kCopiedFiles[] = {
    "tokenizer.json",         "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model",        "tiktoken.model",        "tokenization_kimi.py",
    "generation_config.json", "chat_template.jinja",   "configuration_deepseek.py",
    "modeling_deepseek.py"};

absl::Status Errno(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

constexpr char kCorruptFilesPayload[] = "type.googleapis.com/mq.CorruptFiles";

// True for names an mq output directory may hold (finished files and temporaries).
bool IsOutputName(const std::string& n) {
  if (absl::StartsWith(n, "model-") &&
      (absl::EndsWith(n, ".safetensors") || absl::StrContains(n, ".safetensors.tmp."))) {
    return true;
  }
  for (const char* f : kCopiedFiles) {
    if (n == f || absl::StartsWith(n, absl::StrCat(f, ".tmp."))) return true;
  }
  for (const char* f :
       {"config.json", "model.safetensors.index.json", kManifestFileName, kQualityFileName}) {
    if (n == f || absl::StartsWith(n, absl::StrCat(f, ".tmp."))) return true;
  }
  return false;
}

// The marker and its temporaries (never deleted by finalization).
bool IsMarkerName(const std::string& n) {
  return n == kOwnerMarkerName || absl::StartsWith(n, absl::StrCat(kOwnerMarkerName, ".tmp."));
}

// "a, b, c, d, e and 7 more".
std::string FirstNames(const std::vector<std::string>& names, size_t shown = 5) {
  std::vector<std::string> first(names.begin(), names.begin() + std::min(shown, names.size()));
  std::string out = absl::StrJoin(first, ", ");
  if (names.size() > shown) absl::StrAppend(&out, " and ", names.size() - shown, " more");
  return out;
}

absl::Status FsyncDir(const std::string& dir) {
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Errno(absl::StrCat("open directory ", dir));
  const int r = ::fsync(dfd);
  ::close(dfd);
  if (r != 0) return Errno(absl::StrCat("fsync directory ", dir));
  return absl::OkStatus();
}

// Threads that hash at once: committed files when they are verified (VerifyFiles), the chunks
// of a hidden-state checkpoint. One thread hashes about 1-2 GB/s.
constexpr size_t kHashThreads = 8;

// SHA-256 of `dir`/`f.name` against the record: "" when it matches, else what differs.
std::string HashProblem(const std::string& dir, const OutputFileInfo& f) {
  absl::StatusOr<std::string> sha = Sha256OfFile(dir + "/" + f.name);
  if (!sha.ok()) return absl::StrCat(f.name, " cannot be read: ", sha.status().message());
  if (*sha != f.sha256) {
    return absl::StrCat(f.name, " has SHA-256 ", sha->substr(0, 16), "..., ",
                        f.sha256.substr(0, 16), "... was committed");
  }
  return "";
}

FileStamp StampOf(const struct stat& st) {
  return FileStamp{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino),
                   st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec,
                   st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec};
}

// Size (stat) then, with `hash`, SHA-256 of `dir`/`f.name` against the record: "" when they
// match, else what differs. `stamp` (optional) receives the file's stamp when it has the
// recorded size.
std::string FileProblem(const std::string& dir, const OutputFileInfo& f, bool hash,
                        FileStamp* stamp = nullptr) {
  const std::string path = dir + "/" + f.name;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return absl::StrCat(f.name, " is missing (", std::strerror(errno), ")");
  }
  if (static_cast<int64_t>(st.st_size) != f.size) {
    return absl::StrCat(f.name, " has ", st.st_size, " bytes, ", f.size, " were committed");
  }
  if (stamp) *stamp = StampOf(st);
  return hash ? HashProblem(dir, f) : "";
}

// An exclusive flock on the marker, held until destruction.
class MarkerLock {
 public:
  static absl::StatusOr<std::unique_ptr<MarkerLock>> Acquire(const std::string& dir) {
    const std::string path = dir + "/" + kOwnerMarkerName;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Errno(absl::StrCat("open ", path));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      ::close(fd);
      if (err == EWOULDBLOCK) {
        return absl::UnavailableError(
            absl::StrCat("another finalization or evaluation holds ", dir, " (a lock on ",
                         kOwnerMarkerName, "): at most one runs per output directory"));
      }
      errno = err;
      return Errno(absl::StrCat("lock ", path));
    }
    return std::unique_ptr<MarkerLock>(new MarkerLock(fd));
  }
  ~MarkerLock() { ::close(fd_); }  // releases the lock

 private:
  explicit MarkerLock(int fd) : fd_(fd) {}
  int fd_;
};

// manifest.json's bytes for `files` (sorted by name), and their count and total size.
std::string ManifestText(const std::map<std::string, OutputFileInfo>& files, int* count,
                         int64_t* total_bytes) {
  nlohmann::json list = nlohmann::json::array();
  *count = 0;
  *total_bytes = 0;
  for (const auto& [name, info] : files) {
    list.push_back({{"name", name}, {"size", info.size}, {"sha256", info.sha256}});
    ++*count;
    *total_bytes += info.size;
  }
  return nlohmann::json{{"format", "mq-manifest-1"}, {"files", list}}.dump(2) + "\n";
}

// The files manifest.json lists; DATA_LOSS when it is missing or not an mq manifest.
absl::StatusOr<std::map<std::string, OutputFileInfo>> ReadManifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifestFileName;
  absl::StatusOr<std::string> text = quant::ReadFile(path);
  if (!text.ok()) {
    return absl::DataLossError(absl::StrCat(path, ": cannot be read (", text.status().message(),
                                            "); the output is not finalized"));
  }
  const nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  std::map<std::string, OutputFileInfo> files;
  if (j.is_object() && j.value("format", "") == "mq-manifest-1" && j.contains("files") &&
      j["files"].is_array()) {
    for (const nlohmann::json& f : j["files"]) {
      if (!f.is_object() || !f.contains("name") || !f["name"].is_string() ||
          !f.contains("size") || !f["size"].is_number_integer() || !f.contains("sha256") ||
          !f["sha256"].is_string()) {
        files.clear();
        break;
      }
      OutputFileInfo info;
      info.name = f["name"].get<std::string>();
      info.size = f["size"].get<int64_t>();
      info.sha256 = f["sha256"].get<std::string>();
      files[info.name] = info;
    }
    if (!files.empty()) return files;
  }
  return absl::DataLossError(
      absl::StrCat(path, ": not an mq manifest (format mq-manifest-1 with a list of files)"));
}

}  // namespace

absl::Status CorruptFilesError(const std::string& message, const std::vector<std::string>& files) {
  absl::Status s = absl::DataLossError(message);
  s.SetPayload(kCorruptFilesPayload, absl::Cord(absl::StrJoin(files, "\n")));
  return s;
}

std::vector<std::string> CorruptFilesOf(const absl::Status& status) {
  std::vector<std::string> files;
  if (status.code() != absl::StatusCode::kDataLoss) return files;
  const auto p = status.GetPayload(kCorruptFilesPayload);
  if (!p) return files;
  const std::string joined(*p);
  for (absl::string_view n : absl::StrSplit(joined, '\n', absl::SkipEmpty())) {
    files.emplace_back(n);
  }
  return files;
}

namespace {

size_t RangeCount(int64_t size, int64_t range_bytes) {
  return static_cast<size_t>((size + range_bytes - 1) / range_bytes);
}

// Feeds bytes [begin, end) of the file that `pieces` make up to `h`.
void HashFileRange(const std::vector<model::FilePiece>& pieces, uint64_t begin, uint64_t end,
                   Sha256& h) {
  uint64_t at = 0;
  for (const model::FilePiece& p : pieces) {
    const uint64_t lo = std::max(begin, at), hi = std::min<uint64_t>(end, at + p.size);
    if (lo < hi) h.Update(static_cast<const uint8_t*>(p.data) + (lo - at), hi - lo);
    at += p.size;
    if (at >= end) break;
  }
}

// The read-back of an open file of f.size bytes, range by range on several threads: "" when
// every range has its recorded digest, else what differs in the first range that does not.
std::string RangeProblem(int fd, const std::string& path, const OutputFileInfo& f,
                         const ReadBackRanges& ranges) {
  const uint64_t step = static_cast<uint64_t>(ranges.range_bytes);
  std::vector<std::string> problem(ranges.sha256.size());
  ForEachIndexOnThreads(ranges.sha256.size(), kHashThreads, [&](size_t i) {
    const uint64_t begin = i * step, end = std::min<uint64_t>(f.size, begin + step);
    absl::StatusOr<std::string> sha = Sha256OfFileRange(fd, begin, end - begin, path);
    if (!sha.ok()) {
      problem[i] = absl::StrCat("bytes [", begin, ", ", end, ") of its ", f.size,
                                " unreadable: ", sha.status().message());
    } else if (*sha != ranges.sha256[i]) {
      problem[i] = absl::StrCat("bytes [", begin, ", ", end, ") of its ", f.size,
                                " read back with SHA-256 ", sha->substr(0, 16), "..., but ",
                                ranges.sha256[i].substr(0, 16), "... were written there");
    }
  });
  for (std::string& p : problem) {
    if (!p.empty()) return std::move(p);
  }
  return "";
}

}  // namespace

absl::Status ReadBackCommitted(const std::string& dir, OutputFileInfo* f,
                               const ReadBackRanges* ranges) {
  const std::string path = dir + "/" + f->name;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return CorruptFilesError(
        absl::StrCat("the committed file ", path, " cannot be read back: ", std::strerror(errno)),
        {f->name});
  }
  struct stat before, after, named;
  ::fstat(fd, &before);
  // Written and synced, so its pages are clean: dropped, they are read from the storage again.
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  const bool by_range = ranges != nullptr && ranges->range_bytes > 0 && before.st_size == f->size &&
                        ranges->sha256.size() == RangeCount(f->size, ranges->range_bytes);
  absl::StatusOr<std::string> sha = std::string();
  std::string differs;
  if (by_range) {
    differs = RangeProblem(fd, path, *f, *ranges);
  } else {
    sha = Sha256OfOpenFile(fd, path);
  }
  ::fstat(fd, &after);
  ::close(fd);
  if (!sha.ok()) return CorruptFilesError(std::string(sha.status().message()), {f->name});
  if (::stat(path.c_str(), &named) != 0 || !(StampOf(before) == StampOf(after)) ||
      !(StampOf(named) == StampOf(after))) {
    return CorruptFilesError(
        absl::StrCat("the committed file ", path, " changed while it was read back"), {f->name});
  }
  if (!by_range && (after.st_size != f->size || *sha != f->sha256)) {
    differs =
        absl::StrCat(after.st_size, " bytes with SHA-256 ", sha->substr(0, 16), "..., but ",
                     f->size, " bytes with SHA-256 ", f->sha256.substr(0, 16), "... were written");
  }
  if (!differs.empty()) {
    return CorruptFilesError(absl::StrCat("the committed file ", path, " reads back as ", differs,
                                          " (damaged by the storage, or changed outside mq)"),
                             {f->name});
  }
  // File times come from the kernel's coarse clock (a tick, 1-10 ms): a change made in the same
  // tick as the commit would keep the stamp. Once that clock has passed the stamp's times, any
  // later change moves them. A clock that does not pass them within a second (stepped back)
  // leaves the file without a stamp: finalization reads it again.
  const FileStamp stamp = StampOf(after);
  for (int waited_ms = 0; waited_ms < 1000; ++waited_ms) {
    struct timespec now;
    ::clock_gettime(CLOCK_REALTIME_COARSE, &now);
    const int64_t now_ns = now.tv_sec * 1000000000LL + now.tv_nsec;
    if (now_ns > std::max(stamp.mtime_ns, stamp.ctime_ns)) {
      f->verified = stamp;
      break;
    }
    ::usleep(1000);
  }
  return absl::OkStatus();
}

absl::Status VerifyFiles(const std::string& dir, const std::vector<OutputFileInfo>& files,
                         VerifyCounts* counts) {
  std::vector<std::string> problem(files.size());
  std::vector<size_t> hashed;  // present with the committed size: their bytes are read
  VerifyCounts c;
  for (size_t i = 0; i < files.size(); ++i) {
    FileStamp stamp;
    problem[i] = FileProblem(dir, files[i], /*hash=*/false, &stamp);
    if (!problem[i].empty()) continue;
    if (files[i].verified && stamp == *files[i].verified) {  // unchanged since its read-back
      ++c.stamped_files;
      continue;
    }
    hashed.push_back(i);
    ++c.hashed_files;
    c.hashed_bytes += files[i].size;
  }
  if (counts) *counts = c;
  // Several files at a time: one thread hashes about 1 GB/s, and a whole model's output is
  // hundreds of GiB.
  ForEachIndexOnThreads(hashed.size(), kHashThreads,
                        [&](size_t k) { problem[hashed[k]] = HashProblem(dir, files[hashed[k]]); });
  std::vector<std::string> bad, problems;
  for (size_t i = 0; i < files.size(); ++i) {
    if (problem[i].empty()) continue;
    bad.push_back(files[i].name);
    problems.push_back(std::move(problem[i]));
  }
  if (bad.empty()) return absl::OkStatus();
  return CorruptFilesError(
      absl::StrCat(bad.size(), " committed file(s) in ", dir,
                   " differ from what was committed (changed outside mq, or damaged by the "
                   "storage): ",
                   absl::StrJoin(problems, "; ")),
      bad);
}

absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir, bool* exists) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  *exists = d != nullptr;
  if (!d) {
    if (errno == ENOENT) return names;
    return Errno(absl::StrCat("open directory ", dir));
  }
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

absl::StatusOr<OutputFileInfo> DescribeFile(const std::string& dir, const std::string& name) {
  const std::string path = dir + "/" + name;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Errno(absl::StrCat("stat ", path));
  absl::StatusOr<std::string> sha = Sha256OfFile(path);
  if (!sha.ok()) return sha.status();
  return OutputFileInfo{name, static_cast<int64_t>(st.st_size), *sha, std::nullopt};
}

absl::StatusOr<OutputFileInfo> WriteDescribedSafetensors(const std::string& dir,
                                                         const std::string& name,
                                                         std::vector<model::TensorData> tensors,
                                                         ReadBackRanges* ranges) {
  if (ranges != nullptr && ranges->range_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("read-back ranges of ", ranges->range_bytes, " bytes: must be positive"));
  }
  std::string sha;
  uint64_t size = 0;
  const absl::Status written = model::WriteSafetensorsObserved(
      dir + "/" + name, std::move(tensors), {{"format", "pt"}},
      [&](const std::vector<model::FilePiece>& pieces) {
        for (const model::FilePiece& p : pieces) size += p.size;
        const size_t count = ranges ? RangeCount(size, ranges->range_bytes) : 0;
        if (ranges) ranges->sha256.assign(count, "");
        // Index 0, the whole file (the longest), starts first; the ranges share the other threads.
        ForEachIndexOnThreads(1 + count, kHashThreads, [&](size_t i) {
          Sha256 h;
          if (i == 0) {
            HashFileRange(pieces, 0, size, h);
            sha = h.HexDigest();
            return;
          }
          const uint64_t begin = (i - 1) * static_cast<uint64_t>(ranges->range_bytes);
          HashFileRange(pieces, begin, begin + ranges->range_bytes, h);
          ranges->sha256[i - 1] = h.HexDigest();
        });
      });
  if (!written.ok()) return written;
  return OutputFileInfo{name, static_cast<int64_t>(size), sha, std::nullopt};
}

std::string LayerFileName(int layer, int rank, int world_size) {
  char buf[96];
  std::snprintf(buf, sizeof(buf), "model-layer%05d-rank%03d-of-%03d.safetensors", layer, rank,
                world_size);
  return buf;
}

absl::StatusOr<std::unique_ptr<FileSetReader>> FileSetReader::Open(
    const std::string& dir, const std::vector<OutputFileInfo>& files) {
  auto reader = std::unique_ptr<FileSetReader>(new FileSetReader());
  reader->dir_ = dir;
  // Sizes first (a stat each): every missing or resized file is named at once.
  std::vector<std::string> bad, problems;
  for (const OutputFileInfo& f : files) {
    std::string p = FileProblem(dir, f, /*hash=*/false);
    if (p.empty()) continue;
    bad.push_back(f.name);
    problems.push_back(std::move(p));
  }
  for (const OutputFileInfo& f : files) {
    if (!bad.empty()) break;
    absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file =
        model::SafetensorsFile::Open(dir + "/" + f.name);
    if (!file.ok()) {
      // A damaged header: the recorded SHA-256 says whether the file changed since its commit.
      std::string p = FileProblem(dir, f, /*hash=*/true);
      if (p.empty()) return file.status();
      bad.push_back(f.name);
      problems.push_back(std::move(p));
      continue;
    }
    for (const model::TensorInfo& t : (*file)->header().tensors) {
      reader->where_[t.name] = reader->files_.size();
    }
    reader->files_.push_back(Entry{*std::move(file), f});
  }
  if (!bad.empty()) {
    return CorruptFilesError(absl::StrCat("committed file(s) in ", dir,
                                          " cannot be replayed: ", absl::StrJoin(problems, "; ")),
                             bad);
  }
  return reader;
}

absl::StatusOr<model::TensorView> FileSetReader::Get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" is in no committed file"));
  }
  const Entry& e = files_[it->second];
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto v = verified_.find(it->second);
    if (v == verified_.end()) {
      const std::string p = FileProblem(dir_, e.info, /*hash=*/true);
      absl::Status s = p.empty() ? absl::OkStatus()
                                 : CorruptFilesError(absl::StrCat("committed file in ", dir_,
                                                                  " cannot be replayed: ", p),
                                                     {e.info.name});
      v = verified_.emplace(it->second, std::move(s)).first;
    }
    if (!v->second.ok()) return v->second;
  }
  return e.file->Get(name);
}

namespace {

// Checkpoints carry one SHA-256 per chunk (comma-separated, chunk order), computed on up to
// kHashThreads threads: one digest over 30 GB would take one core ~15 s. Older workers'
// checkpoints carry one digest over all chunks (kCheckpointDigestKey), still accepted.
constexpr char kCheckpointChunkDigestsKey[] = "mq_chunk_sha256";
constexpr char kCheckpointDigestKey[] = "mq_sha256";

void HashChunk(Sha256& h, const uint8_t* data, uint64_t size) {
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(size >> (8 * i));
  h.Update(len, sizeof(len));
  h.Update(data, size);
}

using ChunkBytes = std::pair<const uint8_t*, uint64_t>;

// SHA-256 (hex) of each chunk's bytes, spread over up to kHashThreads threads.
std::vector<std::string> ChunkDigests(const std::vector<ChunkBytes>& chunks) {
  std::vector<std::string> out(chunks.size());
  ForEachIndexOnThreads(chunks.size(), kHashThreads, [&](size_t i) {
    Sha256 h;
    h.Update(chunks[i].first, chunks[i].second);
    out[i] = h.HexDigest();
  });
  return out;
}

}  // namespace

absl::Status WriteHiddenCheckpoint(const std::string& path, std::vector<model::TensorData> chunks) {
  std::vector<ChunkBytes> bytes;
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (chunks[i].name != absl::StrCat("chunk.", i)) {
      return absl::InvalidArgumentError(absl::StrCat("hidden-state checkpoint ", path, ": tensor ",
                                                     i, " is \"", chunks[i].name,
                                                     "\"; must be chunk.", i));
    }
    bytes.emplace_back(chunks[i].data(), chunks[i].size());
  }
  const std::string digests = absl::StrJoin(ChunkDigests(bytes), ",");
  return model::WriteSafetensors(path, std::move(chunks),
                                 {{"format", "pt"}, {kCheckpointChunkDigestsKey, digests}});
}

absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> OpenHiddenCheckpoint(
    const std::string& path, size_t num_chunks) {
  auto damaged = [&](const std::string& why) {
    return CorruptFilesError(absl::StrCat("hidden-state checkpoint ", path, " ", why), {path});
  };
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file = model::SafetensorsFile::Open(path);
  if (absl::IsNotFound(file.status())) return file.status();
  if (!file.ok()) return damaged(absl::StrCat("is unreadable (", file.status().message(), ")"));
  std::vector<ChunkBytes> bytes;
  for (size_t i = 0; i < num_chunks; ++i) {
    absl::StatusOr<model::TensorView> v = (*file)->Get(absl::StrCat("chunk.", i));
    if (!v.ok()) return damaged(absl::StrCat("lacks chunk.", i));
    bytes.emplace_back(v->data, v->num_bytes);
  }
  const auto& metadata = (*file)->header().metadata;
  if (const auto per_chunk = metadata.find(kCheckpointChunkDigestsKey);
      per_chunk != metadata.end()) {
    const std::vector<std::string> want = absl::StrSplit(per_chunk->second, ',');
    if (want.size() != num_chunks) {
      return damaged(
          absl::StrCat("has ", want.size(), " chunk checksums for ", num_chunks, " chunks"));
    }
    const std::vector<std::string> got = ChunkDigests(bytes);
    for (size_t i = 0; i < num_chunks; ++i) {
      if (got[i] != want[i]) {
        return damaged(absl::StrCat("failed its SHA-256 check in chunk.", i,
                                    " (its bytes changed after it was written)"));
      }
    }
    return file;
  }
  const auto digest = metadata.find(kCheckpointDigestKey);
  if (digest == metadata.end()) return damaged("has no checksum");
  Sha256 h;
  for (const auto& [data, size] : bytes) HashChunk(h, data, size);
  if (h.HexDigest() != digest->second) {
    return damaged("failed its SHA-256 check (its bytes changed after it was written)");
  }
  return file;
}

void RemoveHiddenCheckpoints(const std::string& dir) {
  bool exists = false;
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(dir, &exists);
  if (!names.ok()) return;
  for (const std::string& n : *names) {
    if (absl::StartsWith(n, "hidden-step")) ::unlink((dir + "/" + n).c_str());
  }
  ::rmdir(dir.c_str());
}

absl::StatusOr<std::string> OutputOwner(const std::string& output_dir) {
  const std::string path = output_dir + "/" + kOwnerMarkerName;
  absl::StatusOr<std::string> text = quant::ReadFile(path);
  if (!text.ok()) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 && errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    }
    return text.status();
  }
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("job_id") || !j["job_id"].is_string() ||
      j["job_id"].get<std::string>().empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path,
                     ": not an mq owner marker ({\"job_id\": \"j-...\"}); the directory "
                     "may belong to another tool: choose another output directory"));
  }
  return j["job_id"].get<std::string>();
}

absl::Status CheckOutputLocation(const std::string& model_dir, const std::string& output_dir,
                                 const std::string& job_id) {
  if (job_id.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("output directory ", output_dir, ": no job id to claim it for"));
  }
  auto real = [](const std::string& p) {
    char buf[PATH_MAX];
    return ::realpath(p.c_str(), buf) ? std::string(buf) : p;
  };
  if (real(model_dir) == real(output_dir)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output directory ", output_dir, " is the model directory: choose another directory"));
  }
  struct stat st;
  if (::stat(output_dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("output location ", output_dir, " exists and is not a directory"));
  }
  bool exists = false;
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(output_dir, &exists);
  if (!names.ok()) return names.status();
  absl::StatusOr<std::string> owner = OutputOwner(output_dir);
  if (owner.ok() && *owner != job_id) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output directory ", output_dir, " belongs to job ", *owner, " (its ", kOwnerMarkerName,
        " marker): mq never writes into another job's output; choose another directory, or "
        "resume that job"));
  }
  if (!owner.ok() && !absl::IsNotFound(owner.status())) return owner.status();
  // Without our marker nothing may be there; with it, only what an mq output consists of.
  std::vector<std::string> foreign;
  for (const std::string& n : *names) {
    if (owner.ok() ? !(IsOutputName(n) || IsMarkerName(n)) : !IsMarkerName(n)) {
      foreign.push_back(n);
    }
  }
  if (!foreign.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output directory ", output_dir, " holds ", foreign.size(), " entr",
        foreign.size() == 1 ? "y" : "ies", " mq did not write for this job (", FirstNames(foreign),
        "): mq writes only into a new or empty directory and never "
        "touches files it did not write; choose another directory"));
  }
  // Writable: create it now rather than after hours of work.
  absl::Status s = quant::MakeDirs(output_dir);
  if (!s.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create output directory ", output_dir, ": ", s.message()));
  }
  if (::access(output_dir.c_str(), W_OK) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("output directory ", output_dir, " is not writable: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status ClaimOutputLocation(const std::string& model_dir, const std::string& output_dir,
                                 const std::string& job_id) {
  if (absl::Status s = CheckOutputLocation(model_dir, output_dir, job_id); !s.ok()) return s;
  absl::StatusOr<std::string> owner = OutputOwner(output_dir);
  if (owner.ok()) return absl::OkStatus();  // ours (checked above)
  if (!absl::IsNotFound(owner.status())) return owner.status();
  const std::string marker = output_dir + "/" + kOwnerMarkerName;
  const std::string tmp = absl::StrCat(marker, ".tmp.", ::getpid());
  if (absl::Status s =
          model::WriteFileAtomic(tmp, nlohmann::json{{"job_id", job_id}}.dump() + "\n");
      !s.ok()) {
    return s;
  }
  // link() never replaces: when another process claimed the directory meanwhile, its marker
  // stays and decides below.
  const int linked = ::link(tmp.c_str(), marker.c_str());
  const int link_errno = errno;
  ::unlink(tmp.c_str());
  if (linked != 0 && link_errno != EEXIST) {
    errno = link_errno;
    return Errno(absl::StrCat("create ", marker));
  }
  if (absl::Status s = FsyncDir(output_dir); !s.ok()) return s;
  owner = OutputOwner(output_dir);
  if (!owner.ok()) return owner.status();
  if (*owner != job_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("output directory ", output_dir, " was claimed by job ", *owner,
                     " at the same time: choose another directory"));
  }
  return absl::OkStatus();
}

absl::StatusOr<FinalizeOutput> FinalizeOutputDir(const FinalizeOptions& options) {
  const std::string& out = options.output_dir;
  if (absl::Status s = ClaimOutputLocation(options.model_dir, out, options.job_id); !s.ok()) {
    return s;
  }
  absl::StatusOr<std::unique_ptr<MarkerLock>> lock = MarkerLock::Acquire(out);
  if (!lock.ok()) return lock.status();
  // Every committed file is checked before anything is written (read again unless its stamp
  // says it has not changed since it was read back after its commit).
  VerifyCounts verified;
  if (absl::Status s = VerifyFiles(out, options.committed_files, &verified); !s.ok()) return s;
  std::map<std::string, OutputFileInfo> keep;  // name -> described file
  for (const OutputFileInfo& f : options.committed_files) keep[f.name] = f;

  // Everything the pipeline did not cover goes to the globals file.
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> reader =
      model::CheckpointReader::Open(options.model_dir);
  if (!reader.ok()) return reader.status();
  std::vector<model::TensorData> globals;
  for (const std::string& n : (*reader)->names()) {
    if (quant::EndsWith(n, model::kScaleInvSuffix)) continue;
    const int layer = quant::LayerOfName(n);
    if (layer >= 0 && layer < options.num_pipeline_layers) continue;
    absl::StatusOr<model::TensorData> d = quant::PlainTensor(**reader, n);
    if (!d.ok()) return d.status();
    globals.push_back(*std::move(d));
  }
  absl::Status s = model::WriteSafetensors(out + "/" + kGlobalsFileName, std::move(globals));
  if (!s.ok()) return s;
  absl::StatusOr<OutputFileInfo> g = DescribeFile(out, kGlobalsFileName);
  if (!g.ok()) return g.status();
  keep[g->name] = *g;

  // Index from the files' own headers.
  std::map<std::string, std::string> weight_map;
  int64_t total_size = 0;
  for (const auto& [name, info] : keep) {
    absl::StatusOr<model::SafetensorsHeader> h = model::ReadSafetensorsHeader(out + "/" + name);
    if (!h.ok()) return h.status();
    for (const model::TensorInfo& t : h->tensors) {
      if (!weight_map.emplace(t.name, name).second) {
        return absl::FailedPreconditionError(
            absl::StrCat("tensor \"", t.name, "\" is in both ", weight_map[t.name], " and ", name));
      }
      total_size += static_cast<int64_t>(t.num_bytes());
    }
  }
  std::vector<std::string> small_files;
  s = model::WriteShardedIndex(out + "/model.safetensors.index.json", total_size, weight_map);
  if (!s.ok()) return s;
  small_files.push_back("model.safetensors.index.json");

  // config.json with the quantization config.
  absl::StatusOr<std::string> config_path = ModelDirFile(options.model_dir, "config.json");
  if (!config_path.ok()) return config_path.status();
  absl::StatusOr<model::DeepseekV3Config> config = model::LoadDeepseekV3Config(*config_path);
  if (!config.ok()) return config.status();
  absl::StatusOr<std::string> text = quant::ReadFile(*config_path);
  if (!text.ok()) return text.status();
  nlohmann::json raw = nlohmann::json::parse(*text, nullptr, false);
  if (raw.is_discarded() || !raw.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(*config_path, ": not a JSON object"));
  }
  raw["quantization_config"] = quant::QuantizationConfigJson(options.format, *config);
  // Kimi-K2 names its DeepseekV3 architecture "kimi_k2", which transformers does not register:
  // the output says deepseek_v3 so that it loads without trust_remote_code (with it, auto_map,
  // kept as is, still picks the model's own classes).
  if (raw.value("model_type", "") == "kimi_k2") raw["model_type"] = "deepseek_v3";
  if (raw.contains("dtype")) raw["dtype"] = "bfloat16";
  raw["torch_dtype"] = "bfloat16";
  s = model::WriteFileAtomic(out + "/config.json", raw.dump(2) + "\n");
  if (!s.ok()) return s;
  small_files.push_back("config.json");
  for (const char* f : kCopiedFiles) {
    // A symlink leading out of the model directory fails the job; a missing file is skipped.
    absl::StatusOr<std::string> path = ModelDirFile(options.model_dir, f);
    if (!path.ok()) return path.status();
    absl::StatusOr<std::string> content = quant::ReadFile(*path);
    if (!content.ok()) continue;
    s = model::WriteFileAtomic(out + "/" + f, *content);
    if (!s.ok()) return s;
    small_files.push_back(f);
  }
  for (const std::string& f : small_files) {
    absl::StatusOr<OutputFileInfo> d = DescribeFile(out, f);
    if (!d.ok()) return d.status();
    keep[f] = *d;
  }

  // Everything but the manifest is in place and described from disk: the output may be
  // published (the caller's fence), then the manifest commits it.
  if (options.publish) {
    if (absl::Status s = options.publish(); !s.ok()) return s;
  }
  FinalizeOutput result;
  result.verified = verified;
  const std::string manifest = ManifestText(keep, &result.files, &result.total_bytes);
  s = model::WriteFileAtomic(out + "/" + kManifestFileName, manifest);
  if (!s.ok()) return s;
  result.manifest_sha256 = Sha256Hex(manifest);

  // Strays: anything an mq output could contain that the manifest does not list (in a directory
  // this job owns, so they are this job's: files of uncommitted steps, temporaries). Other names
  // cannot be there (ClaimOutputLocation refused them) and would be left alone; so is the marker.
  bool exists = false;
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(out, &exists);
  if (!names.ok()) return names.status();
  for (const std::string& n : *names) {
    if (keep.count(n) || n == kManifestFileName || !IsOutputName(n)) continue;
    if (::unlink((out + "/" + n).c_str()) != 0 && errno != ENOENT) {
      return Errno(absl::StrCat("remove stray file ", out, "/", n));
    }
    ++result.removed_files;
  }
  if (absl::Status s = FsyncDir(out); !s.ok()) return s;
  return result;
}

absl::Status CheckFinalizedOutput(const std::string& output_dir, const std::string& job_id,
                                  const std::string& manifest_sha256) {
  absl::StatusOr<std::string> owner = OutputOwner(output_dir);
  if (!owner.ok()) return owner.status();
  if (*owner != job_id) {
    return absl::FailedPreconditionError(
        absl::StrCat(output_dir, " belongs to job ", *owner, ", not to ", job_id));
  }
  absl::StatusOr<std::map<std::string, OutputFileInfo>> files = ReadManifest(output_dir);
  if (!files.ok()) return files.status();
  files->erase(kQualityFileName);
  int count = 0;
  int64_t bytes = 0;
  const std::string sha = Sha256Hex(ManifestText(*files, &count, &bytes));
  if (sha != manifest_sha256) {
    return absl::DataLossError(absl::StrCat(
        output_dir, "/", kManifestFileName, " lists other files than finalization wrote (sha256 ",
        sha.substr(0, 16), "... without ", kQualityFileName, ", finalization wrote ",
        manifest_sha256.substr(0, 16), "...): the output changed after it was finalized"));
  }
  return absl::OkStatus();
}

absl::Status VerifyFinalizedFiles(const std::string& output_dir) {
  absl::StatusOr<std::map<std::string, OutputFileInfo>> listed = ReadManifest(output_dir);
  if (!listed.ok()) return listed.status();
  listed->erase(kQualityFileName);
  std::vector<OutputFileInfo> files;
  for (const auto& [name, info] : *listed) files.push_back(info);
  return VerifyFiles(output_dir, files);
}

absl::StatusOr<FinalizeOutput> AddToManifest(const std::string& output_dir,
                                             const std::string& job_id,
                                             const std::string& manifest_sha256,
                                             const std::string& name,
                                             const std::string& content) {
  absl::StatusOr<std::unique_ptr<MarkerLock>> lock = MarkerLock::Acquire(output_dir);
  if (!lock.ok()) return lock.status();
  if (absl::Status s = CheckFinalizedOutput(output_dir, job_id, manifest_sha256); !s.ok()) {
    return s;
  }
  absl::StatusOr<std::map<std::string, OutputFileInfo>> files = ReadManifest(output_dir);
  if (!files.ok()) return files.status();
  if (absl::Status s = model::WriteFileAtomic(output_dir + "/" + name, content); !s.ok()) return s;
  (*files)[name] =
      OutputFileInfo{name, static_cast<int64_t>(content.size()), Sha256Hex(content), std::nullopt};
  FinalizeOutput result;
  const std::string manifest = ManifestText(*files, &result.files, &result.total_bytes);
  if (absl::Status s = model::WriteFileAtomic(output_dir + "/" + kManifestFileName, manifest);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = FsyncDir(output_dir); !s.ok()) return s;
  result.manifest_sha256 = Sha256Hex(manifest);
  return result;
}

}  // namespace mq::pipeline
