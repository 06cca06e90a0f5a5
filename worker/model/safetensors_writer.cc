#include "worker/model/safetensors_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mq::model {
namespace {

// Readers (safetensors' reference implementation) reject larger headers.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Decodes one UTF-8 sequence at s[*i]; advances *i. Returns false for malformed input
// (overlong forms, surrogates, code points above U+10FFFF, truncated sequences).
bool NextCodePoint(std::string_view s, size_t* i, uint32_t* cp) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t b0 = byte(*i);
  int extra;
  uint32_t value;
  uint32_t min_value;
  if (b0 < 0x80) {
    *cp = b0;
    ++*i;
    return true;
  } else if ((b0 & 0xE0) == 0xC0) {
    extra = 1, value = b0 & 0x1F, min_value = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    extra = 2, value = b0 & 0x0F, min_value = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    extra = 3, value = b0 & 0x07, min_value = 0x10000;
  } else {
    return false;
  }
  if (*i + extra >= s.size()) return false;  // truncated sequence
  for (int k = 1; k <= extra; ++k) {
    const uint8_t b = byte(*i + k);
    if ((b & 0xC0) != 0x80) return false;
    value = (value << 6) | (b & 0x3F);
  }
  if (value < min_value || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return false;
  *cp = value;
  *i += extra + 1;
  return true;
}

bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  uint32_t cp;
  while (i < s.size()) {
    if (!NextCodePoint(s, &i, &cp)) return false;
  }
  return true;
}

constexpr char kHexDigits[] = "0123456789abcdef";

void AppendU16Escape(uint32_t unit, std::string* out) {
  out->append("\\u");
  for (int shift = 12; shift >= 0; shift -= 4) out->push_back(kHexDigits[(unit >> shift) & 0xF]);
}

// A JSON string literal as serde_json writes it: only '"', '\\' and control characters below
// 0x20 are escaped (short forms for \b \t \n \f \r, lowercase \u00xx otherwise); DEL and
// non-ASCII UTF-8 pass through. `s` must be valid UTF-8.
void AppendSerdeString(std::string_view s, std::string* out) {
  out->push_back('"');
  for (char c : s) {
    const auto u = static_cast<uint8_t>(c);
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\b':
        out->append("\\b");
        break;
      case '\f':
        out->append("\\f");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (u < 0x20) {
          AppendU16Escape(u, out);
        } else {
          out->push_back(c);
        }
    }
  }
  out->push_back('"');
}

// A JSON string literal as Python's json.dumps(ensure_ascii=True) writes it: '"', '\\' and
// \b \f \n \r \t get short escapes; every other code point outside ' '..'~' (controls, DEL,
// non-ASCII) becomes \uxxxx, with a UTF-16 surrogate pair above U+FFFF. `s` must be valid UTF-8.
void AppendPythonAsciiString(std::string_view s, std::string* out) {
  out->push_back('"');
  size_t i = 0;
  uint32_t cp = 0;
  while (i < s.size()) {
    NextCodePoint(s, &i, &cp);  // validated by the caller
    switch (cp) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\b':
        out->append("\\b");
        break;
      case '\f':
        out->append("\\f");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (cp >= 0x20 && cp <= 0x7E) {
          out->push_back(static_cast<char>(cp));
        } else if (cp > 0xFFFF) {
          const uint32_t v = cp - 0x10000;
          AppendU16Escape(0xD800 | (v >> 10), out);
          AppendU16Escape(0xDC00 | (v & 0x3FF), out);
        } else {
          AppendU16Escape(cp, out);
        }
    }
  }
  out->push_back('"');
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Validates one tensor's name, shape and data size.
absl::Status CheckTensor(const TensorData& t, size_t index) {
  if (t.name.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensors[", index, "].name is empty: every tensor needs a name"));
  }
  if (t.name == "__metadata__") {
    return absl::InvalidArgumentError(
        "tensor name \"__metadata__\" is reserved for the safetensors metadata object");
  }
  if (!IsValidUtf8(t.name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensors[", index, "].name is not valid UTF-8: names must be UTF-8"));
  }
  const int raw_dtype = static_cast<int>(t.dtype);
  if (raw_dtype < static_cast<int>(DType::kBool) || raw_dtype > static_cast<int>(DType::kU64)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", t.name, "\": dtype value ", raw_dtype, " is not a DType"));
  }
  uint64_t elements = 1;
  for (int64_t dim : t.shape) {
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", t.name, "\": shape ", ShapeString(t.shape), " has a negative dimension"));
    }
    if (dim != 0 && elements > std::numeric_limits<uint64_t>::max() / 64 / dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", t.name, "\": shape ", ShapeString(t.shape), " has too many elements"));
    }
    elements *= static_cast<uint64_t>(dim);
  }
  const uint64_t bits = elements * static_cast<uint64_t>(DTypeBits(t.dtype));
  if (bits % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor \"", t.name, "\": shape ", ShapeString(t.shape), " of ",
        std::string(DTypeName(t.dtype)), " is ", bits, " bits, not a whole number of bytes"));
  }
  if (t.size() != bits / 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor \"", t.name, "\": data is ", t.size(), " bytes but shape ",
        ShapeString(t.shape), " of ", std::string(DTypeName(t.dtype)), " needs ", bits / 8));
  }
  return absl::OkStatus();
}

// Writes all of [data, data+size) to fd.
absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& what) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (size > 0) {
    const size_t chunk = std::min<size_t>(size, size_t{1} << 30);
    const ssize_t n = ::write(fd, p, chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("write ", what));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Temp file + fsync + rename + directory fsync. `body` writes the file contents to the fd.
absl::Status CommitAtomic(const std::string& path,
                          const std::function<absl::Status(int fd, const std::string& tmp)>& body) {
  if (path.empty()) return absl::InvalidArgumentError("path is empty: need a file path");
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open ", tmp));
  absl::Status status = body(fd, tmp);
  if (status.ok() && ::fsync(fd) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("fsync ", tmp));
  }
  if (::close(fd) != 0 && status.ok()) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("close ", tmp));
  }
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("rename ", tmp, " to ", path));
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open directory ", dir));
  if (::fsync(dir_fd) != 0) status = absl::ErrnoToStatus(errno, absl::StrCat("fsync ", dir));
  ::close(dir_fd);
  return status;
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path, std::vector<TensorData> tensors,
                              const std::map<std::string, std::string>& metadata) {
  return WriteSafetensorsObserved(path, std::move(tensors), metadata, nullptr);
}

absl::Status WriteSafetensorsObserved(const std::string& path, std::vector<TensorData> tensors,
                                      const std::map<std::string, std::string>& metadata,
                                      const FileObserver& observe) {
  std::set<std::string_view> names;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (absl::Status status = CheckTensor(tensors[i], i); !status.ok()) return status;
    if (!names.insert(tensors[i].name).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", tensors[i].name, "\" appears more than once: names must be unique"));
    }
  }
  for (const auto& [key, value] : metadata) {
    if (!IsValidUtf8(key) || !IsValidUtf8(value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metadata entry \"", key, "\" is not valid UTF-8: metadata must be UTF-8"));
    }
  }

  // safetensors' order: dtype descending (enum order), then name ascending (bytewise).
  std::sort(tensors.begin(), tensors.end(), [](const TensorData& a, const TensorData& b) {
    if (a.dtype != b.dtype) return static_cast<int>(a.dtype) > static_cast<int>(b.dtype);
    return a.name < b.name;
  });

  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header.append("\"__metadata__\":{");
    for (const auto& [key, value] : metadata) {
      if (!first) header.push_back(',');
      first = false;
      AppendSerdeString(key, &header);
      header.push_back(':');
      AppendSerdeString(value, &header);
    }
    header.push_back('}');
    first = false;
  }
  uint64_t offset = 0;
  for (const TensorData& t : tensors) {
    const uint64_t size = t.size();
    if (!first) header.push_back(',');
    first = false;
    AppendSerdeString(t.name, &header);
    absl::StrAppend(&header, ":{\"dtype\":\"", std::string(DTypeName(t.dtype)), "\",\"shape\":[",
                    absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", offset, ",", offset + size,
                    "]}");
    offset += size;
  }
  header.push_back('}');
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors header for ", path, " would be ", header.size(), " bytes (", tensors.size(),
        " tensors): readers accept at most ", kMaxHeaderBytes, "; split into more shards"));
  }

  uint8_t length_le[8];
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) length_le[i] = static_cast<uint8_t>(n >> (8 * i));

  // The observer reads the same immutable buffers on its own thread while this one writes.
  std::thread observer;
  if (observe) {
    observer = std::thread([&] {
      std::vector<FilePiece> pieces = {{length_le, sizeof(length_le)},
                                       {header.data(), header.size()}};
      for (const TensorData& t : tensors) pieces.push_back({t.data(), t.size()});
      observe(pieces);
    });
  }
  absl::Status status = CommitAtomic(path, [&](int fd, const std::string& tmp) -> absl::Status {
    if (absl::Status s = WriteAll(fd, length_le, sizeof(length_le), tmp); !s.ok()) return s;
    if (absl::Status s = WriteAll(fd, header.data(), header.size(), tmp); !s.ok()) return s;
    for (const TensorData& t : tensors) {
      if (absl::Status s = WriteAll(fd, t.data(), t.size(), tmp); !s.ok()) return s;
    }
    return absl::OkStatus();
  });
  if (observer.joinable()) observer.join();
  return status;
}

absl::StatusOr<std::string> ShardedIndexJson(int64_t total_size,
                                             const std::map<std::string, std::string>& weight_map) {
  if (total_size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("total_size = ", total_size, ": must be >= 0 (sum of tensor data bytes)"));
  }
  for (const auto& [name, file] : weight_map) {
    if (!IsValidUtf8(name) || !IsValidUtf8(file)) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight_map entry \"", name, "\" -> \"", file, "\" is not valid UTF-8"));
    }
  }
  // std::map orders keys bytewise, which for UTF-8 equals Python's code-point sort_keys order.
  std::string out = absl::StrCat("{\n  \"metadata\": {\n    \"total_size\": ", total_size,
                                 "\n  },\n  \"weight_map\": {");
  if (weight_map.empty()) {
    out.append("}\n}\n");
    return out;
  }
  bool first = true;
  for (const auto& [name, file] : weight_map) {
    out.append(first ? "\n    " : ",\n    ");
    first = false;
    AppendPythonAsciiString(name, &out);
    out.append(": ");
    AppendPythonAsciiString(file, &out);
  }
  out.append("\n  }\n}\n");
  return out;
}

absl::Status WriteShardedIndex(const std::string& path, int64_t total_size,
                               const std::map<std::string, std::string>& weight_map) {
  absl::StatusOr<std::string> json = ShardedIndexJson(total_size, weight_map);
  if (!json.ok()) return json.status();
  return WriteFileAtomic(path, *json);
}

absl::Status WriteFileAtomic(const std::string& path, std::string_view contents) {
  return CommitAtomic(path, [&](int fd, const std::string& tmp) {
    return WriteAll(fd, contents.data(), contents.size(), tmp);
  });
}

}  // namespace mq::model
