#include "worker/model/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace mq::model {
namespace {

using Json = nlohmann::json;

// A tensor entry as written in the header, before validation.
struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<uint64_t> shape;
  std::vector<uint64_t> offsets;
  bool has_dtype = false;
  bool has_shape = false;
  bool has_offsets = false;
};

std::string Quote(std::string_view s) { return absl::StrCat("\"", std::string(s), "\""); }

std::string DTypeStr(DType dtype) { return std::string(DTypeName(dtype)); }

std::string U64ListToString(const std::vector<uint64_t>& values) {
  return absl::StrCat("[", absl::StrJoin(values, ", "), "]");
}

std::string AllDTypeNames() {
  std::vector<std::string> names;
  for (int i = 0;; ++i) {
    DType dtype = static_cast<DType>(i);
    names.emplace_back(DTypeName(dtype));
    if (dtype == DType::kU64) break;
  }
  return absl::StrJoin(names, ", ");
}

// SAX handler that builds the header entries directly, rejecting duplicate keys and wrong types
// as it goes. Returning false stops the parser; `error()` then says why. Keeps no recursion: the
// nesting it does not care about (unknown tensor fields) is skipped with a depth counter.
class HeaderSax final : public nlohmann::json_sax<Json> {
 public:
  const std::string& error() const { return error_; }
  std::map<std::string, std::string>& metadata() { return metadata_; }
  std::vector<RawTensor>& tensors() { return tensors_; }

  bool null() override { return Scalar("null"); }
  bool boolean(bool) override { return Scalar("boolean"); }
  bool number_integer(number_integer_t value) override {
    if (state_ == State::kShape || state_ == State::kOffsets) {
      if (value >= 0) {  // "-0"
        array_->push_back(static_cast<uint64_t>(value));
        return true;
      }
      return Fail(absl::StrCat(TensorPrefix(), ArrayName(), "[", array_->size(), "] = ", value,
                               ": must be a non-negative integer"));
    }
    return Scalar("number");
  }
  bool number_unsigned(number_unsigned_t value) override {
    if (state_ == State::kShape || state_ == State::kOffsets) {
      array_->push_back(value);
      return true;
    }
    return Scalar("number");
  }
  bool number_float(number_float_t, const string_t& text) override {
    if (state_ == State::kShape || state_ == State::kOffsets) {
      return Fail(absl::StrCat(TensorPrefix(), ArrayName(), "[", array_->size(), "] = ", text,
                               ": must be a non-negative integer"));
    }
    return Scalar("number");
  }
  bool string(string_t& value) override {
    switch (state_) {
      case State::kMetadata:
        metadata_[key_] = value;
        return true;
      case State::kTensor:
        if (key_ == "dtype") {
          tensors_.back().dtype = value;
          tensors_.back().has_dtype = true;
          return true;
        }
        return Scalar("string");
      default:
        return Scalar("string");
    }
  }
  bool binary(binary_t&) override { return Fail("header contains a binary value"); }

  bool start_object(std::size_t) override {
    switch (state_) {
      case State::kStart:
        state_ = State::kTop;
        return true;
      case State::kTop:
        if (key_ == "__metadata__") {
          state_ = State::kMetadata;
          keys_.clear();
          return true;
        }
        tensors_.emplace_back();
        tensors_.back().name = key_;
        state_ = State::kTensor;
        keys_.clear();
        return true;
      case State::kSkip:
        ++skip_depth_;
        return true;
      default:
        return Scalar("object");
    }
  }
  bool end_object() override {
    switch (state_) {
      case State::kTop:
        state_ = State::kDone;
        return true;
      case State::kMetadata:
        state_ = State::kTop;
        return true;
      case State::kTensor: {
        const RawTensor& t = tensors_.back();
        for (auto [field, present] :
             {std::pair{"dtype", t.has_dtype}, std::pair{"shape", t.has_shape},
              std::pair{"data_offsets", t.has_offsets}}) {
          if (!present) return Fail(absl::StrCat(TensorPrefix(), "missing \"", field, "\""));
        }
        state_ = State::kTop;
        return true;
      }
      case State::kSkip:
        return EndSkip();
      default:
        return Fail("unbalanced object");  // the parser never lets this happen
    }
  }
  bool start_array(std::size_t) override {
    if (state_ == State::kTensor && key_ == "shape") {
      tensors_.back().has_shape = true;
      array_ = &tensors_.back().shape;
      state_ = State::kShape;
      return true;
    }
    if (state_ == State::kTensor && key_ == "data_offsets") {
      tensors_.back().has_offsets = true;
      array_ = &tensors_.back().offsets;
      state_ = State::kOffsets;
      return true;
    }
    if (state_ == State::kSkip) {
      ++skip_depth_;
      return true;
    }
    return Scalar("array");
  }
  bool end_array() override {
    if (state_ == State::kShape) {
      state_ = State::kTensor;
      return true;
    }
    if (state_ == State::kOffsets) {
      state_ = State::kTensor;
      if (array_->size() != 2) {
        return Fail(absl::StrCat(TensorPrefix(), "data_offsets ", U64ListToString(*array_),
                                 " must have exactly 2 entries [begin, end]"));
      }
      return true;
    }
    if (state_ == State::kSkip) return EndSkip();
    return Fail("unbalanced array");  // the parser never lets this happen
  }
  bool key(string_t& key) override {
    // Keys inside a skipped unknown field are not the tensor's own: serde ignores the whole
    // value, so they may repeat "dtype" or each other without being duplicates.
    if (state_ == State::kSkip) return true;
    key_ = key;
    if (state_ == State::kTop) {
      if (!top_keys_.insert(key).second) {
        return Fail(absl::StrCat("duplicate key ", Quote(key), " in the header"));
      }
      return true;
    }
    if (!keys_.insert(key).second) {
      if (state_ == State::kMetadata) {
        return Fail(absl::StrCat("__metadata__: duplicate key ", Quote(key)));
      }
      return Fail(absl::StrCat(TensorPrefix(), "duplicate key ", Quote(key)));
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&,
                   const nlohmann::detail::exception& ex) override {
    absl::string_view what = ex.what();
    // Drop the "[json.exception.parse_error.101] " tag; keep "parse error at line 1, ...".
    if (size_t close = what.find("] "); close != absl::string_view::npos && what.front() == '[') {
      what.remove_prefix(close + 2);
    }
    return Fail(absl::StrCat("header is not valid JSON: ", what));
  }

 private:
  enum class State { kStart, kTop, kMetadata, kTensor, kShape, kOffsets, kSkip, kDone };

  static const char* TypeArticle(absl::string_view type) {
    return type == "object" || type == "array" ? "an " : "a ";
  }
  std::string TensorPrefix() const {
    return absl::StrCat("tensor ", Quote(tensors_.back().name), ": ");
  }
  const char* ArrayName() const { return state_ == State::kShape ? "shape" : "data_offsets"; }

  // A value of type `type` (null/boolean/number/string/object/array) at the current position.
  bool Scalar(absl::string_view type) {
    switch (state_) {
      case State::kStart:
        return Fail(absl::StrCat("header must be a JSON object, found ", TypeArticle(type), type));
      case State::kTop:
        if (key_ == "__metadata__") {
          if (type == "null") return true;
          return Fail(absl::StrCat("__metadata__ must be an object of strings, found ",
                                   TypeArticle(type), type));
        }
        return Fail(absl::StrCat("tensor ", Quote(key_),
                                 ": entry must be an object with dtype, shape and data_offsets, "
                                 "found ",
                                 TypeArticle(type), type));
      case State::kMetadata:
        return Fail(absl::StrCat("__metadata__ ", Quote(key_), ": value must be a string, found ",
                                 TypeArticle(type), type));
      case State::kTensor:
        if (key_ == "dtype" || key_ == "shape" || key_ == "data_offsets") {
          return Fail(absl::StrCat(TensorPrefix(), "\"", key_, "\" must be ",
                                   key_ == "dtype" ? "a string" : "an array of integers",
                                   ", found ", TypeArticle(type), type));
        }
        if (type == "object" || type == "array") {
          // Unknown field with a nested value: skip it entirely (serde ignores unknown fields).
          state_ = State::kSkip;
          skip_depth_ = 1;
        }
        return true;  // unknown scalar field: ignored
      case State::kShape:
      case State::kOffsets:
        return Fail(absl::StrCat(TensorPrefix(), ArrayName(), "[", array_->size(),
                                 "] must be a non-negative integer, found ", TypeArticle(type),
                                 type));
      case State::kSkip:
        return true;
      case State::kDone:
        return Fail("unexpected value after the header object");
    }
    return Fail("internal parser state error");
  }
  bool EndSkip() {
    if (--skip_depth_ == 0) state_ = State::kTensor;
    return true;
  }
  bool Fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return false;
  }

  State state_ = State::kStart;
  std::string key_;
  std::set<std::string> top_keys_;
  std::set<std::string> keys_;  // keys of the current metadata or tensor object
  std::vector<uint64_t>* array_ = nullptr;
  uint64_t skip_depth_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<RawTensor> tensors_;
  std::string error_;
};

// Checks the fields of one tensor and converts it; `error` names the tensor.
absl::StatusOr<TensorInfo> ValidateTensor(RawTensor& raw, uint64_t data_offset) {
  const std::string prefix = absl::StrCat("tensor ", Quote(raw.name), ": ");
  std::optional<DType> dtype = ParseDType(raw.dtype);
  if (!dtype) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "unknown dtype ", Quote(raw.dtype),
                                                   " (expected one of ", AllDTypeNames(), ")"));
  }
  const std::vector<uint64_t>& offsets = raw.offsets;
  if (offsets[0] > offsets[1]) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "data_offsets ", U64ListToString(offsets), ": end is before begin"));
  }
  TensorInfo info;
  info.name = std::move(raw.name);
  info.dtype = *dtype;
  info.shape.reserve(raw.shape.size());
  constexpr uint64_t kInt64Max = std::numeric_limits<int64_t>::max();
  uint64_t elements = 1;
  bool overflow = false;
  for (uint64_t dim : raw.shape) {
    if (dim > kInt64Max) overflow = true;
    info.shape.push_back(static_cast<int64_t>(std::min(dim, kInt64Max)));
    if (!overflow && dim != 0 && elements > kInt64Max / dim) overflow = true;
    if (!overflow) elements *= dim;
  }
  const uint64_t bits_per_element = static_cast<uint64_t>(DTypeBits(*dtype));
  if (!overflow && elements > std::numeric_limits<uint64_t>::max() / bits_per_element) {
    overflow = true;
  }
  if (overflow) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "shape ", U64ListToString(raw.shape), " of ", DTypeStr(*dtype),
                     " is too large (element or bit count overflows 64 bits)"));
  }
  const uint64_t bits = elements * bits_per_element;
  if (bits % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "shape ", U64ListToString(raw.shape),
                                                   " of ", DTypeStr(*dtype), " is ", bits,
                                                   " bits, not a whole number of bytes"));
  }
  const uint64_t span = offsets[1] - offsets[0];
  if (span != bits / 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "data_offsets ", U64ListToString(offsets), " span ", span, " bytes but shape ",
        U64ListToString(raw.shape), " of ", DTypeStr(*dtype), " needs ", bits / 8));
  }
  info.data_begin = offsets[0];
  info.data_end = offsets[1];
  // Unsigned, so never UB; the contiguity and end checks reject any tensor where this wraps.
  info.file_offset = data_offset + offsets[0];
  return info;
}

}  // namespace

int64_t TensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const TensorInfo* SafetensorsHeader::Find(std::string_view name) const {
  auto it = index_by_name.find(name);
  return it == index_by_name.end() ? nullptr : &tensors[it->second];
}

std::string ShapeToString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header_json,
                                                         uint64_t header_len, uint64_t file_size) {
  if (header_len > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("header length ", header_len, " exceeds the ",
                                                   kMaxSafetensorsHeaderBytes, "-byte limit"));
  }
  if (file_size < 8 || header_len > file_size - 8) {
    return absl::InvalidArgumentError(absl::StrCat("header length ", header_len,
                                                   " does not fit in the file: 8 + ", header_len,
                                                   " > file size ", file_size));
  }
  if (header_json.size() != header_len) {
    return absl::InvalidArgumentError(absl::StrCat("header truncated: expected ", header_len,
                                                   " bytes, got ", header_json.size()));
  }
  if (header_json.empty() || header_json.front() != '{') {
    return absl::InvalidArgumentError(
        header_json.empty()
            ? std::string("header is empty; it must be a JSON object starting with '{'")
            : absl::StrCat(
                  "header must start with '{', found byte 0x",
                  absl::Hex(static_cast<unsigned char>(header_json.front()), absl::kZeroPad2)));
  }

  // nlohmann's lexer treats a NUL byte as end of input; JSON never allows a raw NUL, so reject
  // it here (this also rejects NUL padding, as the reference does).
  if (size_t nul = header_json.find('\0'); nul != std::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("header is not valid JSON: NUL byte at offset ", nul));
  }
  HeaderSax sax;
  const bool parsed = Json::sax_parse(header_json.data(), header_json.data() + header_json.size(),
                                      &sax, nlohmann::json::input_format_t::json,
                                      /*strict=*/true, /*ignore_comments=*/false);
  if (!parsed || !sax.error().empty()) {
    return absl::InvalidArgumentError(sax.error().empty() ? "header is not valid JSON"
                                                          : sax.error());
  }

  std::vector<RawTensor>& raw = sax.tensors();
  std::stable_sort(raw.begin(), raw.end(), [](const RawTensor& a, const RawTensor& b) {
    return a.offsets < b.offsets;  // both have exactly 2 entries: (begin, end) order
  });

  SafetensorsHeader header;
  header.header_len = header_len;
  header.file_size = file_size;
  header.metadata = std::move(sax.metadata());
  header.tensors.reserve(raw.size());
  const uint64_t data_size = file_size - 8 - header_len;
  uint64_t expected_begin = 0;
  for (RawTensor& entry : raw) {
    absl::StatusOr<TensorInfo> info = ValidateTensor(entry, 8 + header_len);
    if (!info.ok()) return info.status();
    if (info->data_begin != expected_begin) {
      const std::string offsets = absl::StrCat("[", info->data_begin, ", ", info->data_end, "]");
      if (header.tensors.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor ", Quote(info->name), ": data_offsets ", offsets,
                         ": the first tensor (by offset) must begin at 0"));
      }
      const TensorInfo& prev = header.tensors.back();
      const bool hole = info->data_begin > expected_begin;
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor ", Quote(info->name), ": data_offsets ", offsets, " begin at ", info->data_begin,
          " but the previous tensor ", Quote(prev.name), " ends at ", expected_begin,
          hole ? ": hole of " : ": overlap of ",
          hole ? info->data_begin - expected_begin : expected_begin - info->data_begin, " bytes"));
    }
    expected_begin = info->data_end;
    header.tensors.push_back(*std::move(info));
  }
  if (expected_begin != data_size) {
    if (expected_begin > data_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "file is ", file_size, " bytes but its header needs ", 8 + header_len + expected_begin,
          " (8 + header ", header_len, " + tensor data ", expected_begin, "): tensor data ends at ",
          expected_begin, " but the data buffer is only ", data_size, " bytes; file truncated by ",
          expected_begin - data_size, " bytes"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("tensor data ends at ", expected_begin, " but the data buffer is ", data_size,
                     " bytes (file size ", file_size, " - 8 - header ", header_len,
                     "): ", data_size - expected_begin, " trailing bytes"));
  }
  for (size_t i = 0; i < header.tensors.size(); ++i) {
    header.index_by_name.emplace(header.tensors[i].name, i);
  }
  return header;
}

namespace {

// Reads exactly `size` bytes at `offset`; retries short reads and EINTR.
absl::Status PreadFully(int fd, char* out, uint64_t size, uint64_t offset) {
  while (size > 0) {
    ssize_t n = ::pread(fd, out, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, "read failed");
    }
    if (n == 0) return absl::InvalidArgumentError("unexpected end of file while reading");
    out += n;
    size -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeaderFromFd(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return absl::ErrnoToStatus(errno, "fstat failed");
  if (!S_ISREG(st.st_mode)) return absl::InvalidArgumentError("not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("file is ", file_size, " bytes, too short for the 8-byte header length"));
  }
  unsigned char len_bytes[8];
  if (absl::Status s = PreadFully(fd, reinterpret_cast<char*>(len_bytes), 8, 0); !s.ok()) {
    return s;
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  // Validate the length before allocating anything sized by it.
  if (header_len > kMaxSafetensorsHeaderBytes || header_len > file_size - 8) {
    return ParseSafetensorsHeader({}, header_len, file_size);
  }
  std::string header(header_len, '\0');
  if (absl::Status s = PreadFully(fd, header.data(), header_len, 8); !s.ok()) return s;
  return ParseSafetensorsHeader(header, header_len, file_size);
}


absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": file not found"));
    return absl::ErrnoToStatus(err, absl::StrCat(path, ": cannot open"));
  }
  absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeaderFromFd(fd);
  ::close(fd);
  if (!header.ok()) {
    return absl::Status(header.status().code(),
                        absl::StrCat(path, ": ", header.status().message()));
  }
  return header;
}

}  // namespace mq::model
