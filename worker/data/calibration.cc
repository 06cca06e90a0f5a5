#include "worker/data/calibration.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "worker/data/tokenizer.h"
#include "worker/model/dtype.h"
#include "worker/model/safetensors.h"

namespace mq::data {
namespace {

using Json = nlohmann::json;

enum class Kind { kInputIds, kMessages, kText };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kInputIds:
      return "input_ids";
    case Kind::kMessages:
      return "messages";
    case Kind::kText:
      return "text";
  }
  return "?";
}

// A dataset value in an error message: its JSON type, never its text (the dataset path may
// name a file the submitter cannot read, and messages reach the job's events).
const char* TypeOf(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "an integer";
    case Json::value_t::number_float:
      return "a number";
    case Json::value_t::string:
      return "a string";
    case Json::value_t::array:
      return "an array";
    case Json::value_t::object:
      return "an object";
    default:
      return "a value";
  }
}

absl::Status ValidateSpec(const CalibrationSpec& spec) {
  if (spec.dataset_path.empty()) {
    return absl::InvalidArgumentError(
        "spec.dataset_path is empty: must name a .jsonl or "
        ".safetensors file");
  }
  if (spec.num_samples <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.num_samples = ", spec.num_samples, ": must be > 0"));
  }
  if (spec.max_sequence_length <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.max_sequence_length = ", spec.max_sequence_length, ": must be > 0"));
  }
  if (spec.skip_samples < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.skip_samples = ", spec.skip_samples, ": must be >= 0"));
  }
  if (spec.min_sequence_length < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.min_sequence_length = ", spec.min_sequence_length, ": must be >= 0"));
  }
  if (spec.text_field.empty()) {
    return absl::InvalidArgumentError("spec.text_field is empty: must name the JSONL text key");
  }
  if (!absl::EndsWith(spec.dataset_path, ".jsonl") &&
      !absl::EndsWith(spec.dataset_path, ".safetensors")) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.dataset_path = ", spec.dataset_path,
                     ": unknown extension; must end in .jsonl or .safetensors"));
  }
  return absl::OkStatus();
}

absl::Status OpenError(const std::string& what, const std::string& path) {
  int err = errno;
  std::string msg = absl::StrCat(what, " ", path, ": cannot open for reading: ", strerror(err));
  return err == ENOENT || err == ENOTDIR ? absl::NotFoundError(msg)
                                         : absl::InvalidArgumentError(msg);
}

// Where a JSONL sample came from, for messages.
std::string At(const std::string& path, int64_t line) {
  return absl::StrCat("dataset ", path, " line ", line);
}

// Determines the kind of one parsed line.
absl::StatusOr<Kind> KindOf(const Json& obj, const CalibrationSpec& spec, int64_t line) {
  if (!obj.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(At(spec.dataset_path, line), ": must be a JSON object, got ", TypeOf(obj)));
  }
  if (obj.contains("input_ids")) return Kind::kInputIds;
  if (obj.contains("messages")) return Kind::kMessages;
  if (obj.contains(spec.text_field)) return Kind::kText;
  return absl::InvalidArgumentError(absl::StrCat(
      At(spec.dataset_path, line), ": object has none of the keys \"input_ids\", \"messages\", \"",
      spec.text_field, "\" (spec.text_field)"));
}

absl::StatusOr<Json> ParseLine(std::string_view text, const CalibrationSpec& spec, int64_t line) {
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    // Only the position: the parser's own text quotes what it read.
    return absl::InvalidArgumentError(
        absl::StrCat(At(spec.dataset_path, line), ": not valid JSON (syntax error at byte ", e.byte,
                     " of the line; expected one JSON object per line)"));
  } catch (const Json::exception&) {
    return absl::InvalidArgumentError(
        absl::StrCat(At(spec.dataset_path, line), ": not valid JSON"));
  }
}

// The text of a messages sample (see the header for the rendering rule).
absl::StatusOr<std::string> RenderMessages(const Json& messages, const std::string& where) {
  if (!messages.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": \"messages\" must be an array of {role, content} objects"));
  }
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const Json& m = messages[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
        !m["content"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": messages[", i, "] is ", TypeOf(m),
                       ": must be an object with string \"role\" and string \"content\""));
    }
    if (i > 0) out += "\n\n";
    absl::StrAppend(&out, m["role"].get_ref<const std::string&>(), ": ",
                    m["content"].get_ref<const std::string&>());
  }
  return out;
}

absl::Status CheckId(int64_t id, int64_t vocab_size, const std::string& where) {
  if (id < 0 || id > INT32_MAX || (vocab_size > 0 && id >= vocab_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": token id ", id, " out of range; must be in [0, ",
                     vocab_size > 0 ? vocab_size : int64_t{INT32_MAX} + 1, ")",
                     vocab_size > 0 ? " (the model vocab size)" : ""));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> ParseIds(const Json& ids, int64_t vocab_size,
                                              const std::string& where) {
  if (!ids.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": \"input_ids\" must be an array of integers, got ", TypeOf(ids)));
  }
  std::vector<int32_t> out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const Json& v = ids[i];
    if (!v.is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": input_ids[", i, "] is ", TypeOf(v), ": not an integer"));
    }
    int64_t id =
        v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX ? INT64_MAX : v.get<int64_t>();
    if (auto s = CheckId(id, vocab_size, absl::StrCat(where, ": input_ids[", i, "]")); !s.ok()) {
      return s;
    }
    out.push_back(static_cast<int32_t>(id));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerFor(const CalibrationSpec& spec, Kind kind,
                                                            int64_t line) {
  if (spec.tokenizer_path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(At(spec.dataset_path, line), ": a ", KindName(kind),
                     " sample needs a tokenizer, but spec.tokenizer_path is empty"));
  }
  return LoadTokenizer(spec.tokenizer_path);
}

// All samples of a JSONL dataset, in file order, before length filtering.
absl::StatusOr<std::pair<std::vector<std::vector<int32_t>>, Kind>> ReadJsonl(
    const CalibrationSpec& spec, int64_t vocab_size, bool first_only) {
  errno = 0;
  std::ifstream in(spec.dataset_path, std::ios::binary);
  if (!in) return OpenError("dataset", spec.dataset_path);
  std::vector<std::vector<int32_t>> samples;
  std::optional<Kind> kind;
  int64_t first_line = 0;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string text;
  int64_t line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (absl::StripAsciiWhitespace(text).empty()) continue;
    auto obj = ParseLine(text, spec, line);
    if (!obj.ok()) return obj.status();
    auto k = KindOf(*obj, spec, line);
    if (!k.ok()) return k.status();
    if (!kind) {
      kind = *k;
      first_line = line;
      if (*kind != Kind::kInputIds) {
        auto t = LoadTokenizerFor(spec, *kind, line);
        if (!t.ok()) return t.status();
        tokenizer = *std::move(t);
      }
    } else if (*k != *kind) {
      return absl::InvalidArgumentError(absl::StrCat(
          At(spec.dataset_path, line), ": a ", KindName(*k), " sample, but line ", first_line,
          " is a ", KindName(*kind), " sample; a dataset must use one format"));
    }
    std::string where = At(spec.dataset_path, line);
    std::vector<int32_t> ids;
    if (*kind == Kind::kInputIds) {
      auto parsed = ParseIds((*obj)["input_ids"], vocab_size, where);
      if (!parsed.ok()) return parsed.status();
      ids = *std::move(parsed);
    } else {
      std::string sample_text;
      if (*kind == Kind::kMessages) {
        auto rendered = RenderMessages((*obj)["messages"], where);
        if (!rendered.ok()) return rendered.status();
        sample_text = *std::move(rendered);
      } else {
        const Json& t = (*obj)[spec.text_field];
        if (!t.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": \"", spec.text_field, "\" must be a string, got ", TypeOf(t)));
        }
        sample_text = t.get<std::string>();
      }
      auto encoded = tokenizer->Encode(sample_text, spec.add_special_tokens);
      if (!encoded.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": ", encoded.status().message()));
      }
      for (size_t i = 0; i < encoded->size(); ++i) {
        if (auto s = CheckId((*encoded)[i], vocab_size,
                             absl::StrCat(where, ": tokenized text, position ", i));
            !s.ok()) {
          return s;
        }
      }
      ids = *std::move(encoded);
    }
    samples.push_back(std::move(ids));
    if (first_only) break;
  }
  if (in.bad()) {
    return absl::InvalidArgumentError(
        absl::StrCat("dataset ", spec.dataset_path, ": read error after line ", line));
  }
  if (!kind) {
    return absl::InvalidArgumentError(
        absl::StrCat("dataset ", spec.dataset_path, ": empty file (", line,
                     " lines, none with a sample); expected one JSON object per line"));
  }
  return std::make_pair(std::move(samples), *kind);
}

// The validated input_ids tensor of a safetensors dataset.
absl::StatusOr<model::TensorInfo> InputIdsTensor(const std::string& path,
                                                 const model::SafetensorsHeader& header) {
  const model::TensorInfo* t = header.Find("input_ids");
  if (t == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("dataset ", path, ": no tensor named \"input_ids\" (", header.tensors.size(),
                     " tensors); expected a 2-D I32 or I64 [num_samples, seq_len] tensor"));
  }
  if (t->dtype != model::DType::kI32 && t->dtype != model::DType::kI64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dataset ", path, ": input_ids dtype = ", std::string(model::DTypeName(t->dtype)),
        ": must be I32 or I64"));
  }
  if (t->shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("dataset ", path, ": input_ids shape = ", model::ShapeToString(t->shape),
                     ": must be 2-D [num_samples, seq_len]"));
  }
  return *t;
}

absl::StatusOr<model::SafetensorsHeader> ReadHeader(const std::string& path) {
  errno = 0;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return OpenError("dataset", path);
  auto header = model::ReadSafetensorsHeaderFromFd(fd);
  ::close(fd);
  if (!header.ok()) {
    // The header reader's reasons quote bytes of the file (its length field, keys, what the
    // JSON parser last read): none of them are repeated here.
    return absl::InvalidArgumentError(
        absl::StrCat("dataset ", path,
                     ": not a valid safetensors file (expected an 8-byte little-endian size, "
                     "then a JSON header naming the tensors)"));
  }
  return header;
}

absl::StatusOr<std::vector<std::vector<int32_t>>> ReadSafetensors(const std::string& path,
                                                                  int64_t vocab_size) {
  auto header = ReadHeader(path);
  if (!header.ok()) return header.status();
  auto tensor = InputIdsTensor(path, *header);
  if (!tensor.ok()) return tensor.status();
  const int64_t rows = tensor->shape[0], cols = tensor->shape[1];
  const size_t elem = tensor->dtype == model::DType::kI32 ? 4 : 8;
  std::string bytes(tensor->num_bytes(), '\0');
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return OpenError("dataset", path);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::pread(fd, bytes.data() + done, bytes.size() - done,
                        static_cast<off_t>(tensor->file_offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(
          "dataset ", path, ": short read of input_ids at byte ", tensor->file_offset + done));
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  std::vector<std::vector<int32_t>> samples(rows);
  for (int64_t r = 0; r < rows; ++r) {
    samples[r].reserve(cols);
    for (int64_t c = 0; c < cols; ++c) {
      const char* p = bytes.data() + (r * cols + c) * elem;
      int64_t id;
      if (elem == 4) {
        int32_t v;
        std::memcpy(&v, p, 4);  // safetensors is little-endian, like every supported host
        id = v;
      } else {
        std::memcpy(&id, p, 8);
      }
      if (auto s = CheckId(id, vocab_size,
                           absl::StrCat("dataset ", path, " input_ids[", r, ", ", c, "]"));
          !s.ok()) {
        return s;
      }
      samples[r].push_back(static_cast<int32_t>(id));
    }
  }
  return samples;
}

}  // namespace

std::vector<int64_t> CalibrationShuffle(int64_t n, uint64_t seed) {
  std::vector<int64_t> idx(n > 0 ? n : 0);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  uint64_t state = seed;
  auto next = [&state] {
    state += 0x9e3779b97f4a7c15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  for (int64_t i = n - 1; i >= 1; --i) {
    uint64_t j = next() % static_cast<uint64_t>(i + 1);
    std::swap(idx[i], idx[j]);
  }
  return idx;
}

absl::StatusOr<CalibrationSet> LoadCalibration(const CalibrationSpec& spec, int64_t vocab_size) {
  if (auto s = ValidateSpec(spec); !s.ok()) return s;
  std::vector<std::vector<int32_t>> all;
  CalibrationSet out;
  if (absl::EndsWith(spec.dataset_path, ".safetensors")) {
    auto samples = ReadSafetensors(spec.dataset_path, vocab_size);
    if (!samples.ok()) return samples.status();
    all = *std::move(samples);
    out.format = "safetensors";
  } else {
    auto read = ReadJsonl(spec, vocab_size, /*first_only=*/false);
    if (!read.ok()) return read.status();
    all = std::move(read->first);
    out.format = KindName(read->second);
  }
  std::vector<std::vector<int32_t>> usable;
  usable.reserve(all.size());
  for (auto& s : all) {
    if (static_cast<int64_t>(s.size()) < spec.min_sequence_length) {
      ++out.skipped_short;
    } else {
      usable.push_back(std::move(s));
    }
  }
  out.available = static_cast<int64_t>(usable.size());
  if (usable.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "dataset ", spec.dataset_path, ": no usable sample: ", all.size(),
        " samples, all shorter than spec.min_sequence_length = ", spec.min_sequence_length,
        " tokens"));
  }
  std::vector<int64_t> order = CalibrationShuffle(out.available, spec.seed);
  const int64_t first = std::min(spec.skip_samples, out.available);
  const int64_t take = std::min(spec.num_samples, out.available - first);
  out.samples.reserve(take);
  for (int64_t i = first; i < first + take; ++i) {
    std::vector<int32_t>& s = usable[order[i]];
    if (static_cast<int64_t>(s.size()) > spec.max_sequence_length) {
      s.resize(spec.max_sequence_length);
    }
    out.total_tokens += static_cast<int64_t>(s.size());
    out.samples.push_back(std::move(s));
  }
  return out;
}

absl::Status CheckCalibrationSource(const CalibrationSpec& spec) {
  if (auto s = ValidateSpec(spec); !s.ok()) return s;
  if (absl::EndsWith(spec.dataset_path, ".safetensors")) {
    auto header = ReadHeader(spec.dataset_path);
    if (!header.ok()) return header.status();
    return InputIdsTensor(spec.dataset_path, *header).status();
  }
  // Reads up to the first sample (loading the tokenizer when that sample needs one).
  return ReadJsonl(spec, /*vocab_size=*/0, /*first_only=*/true).status();
}

absl::StatusOr<int64_t> CountCalibrationSamples(const CalibrationSpec& spec) {
  if (spec.dataset_path.empty()) {
    return absl::InvalidArgumentError("spec.dataset_path is empty: must name a .jsonl or "
                                      ".safetensors file");
  }
  if (absl::EndsWith(spec.dataset_path, ".safetensors")) {
    auto header = ReadHeader(spec.dataset_path);
    if (!header.ok()) return header.status();
    auto tensor = InputIdsTensor(spec.dataset_path, *header);
    if (!tensor.ok()) return tensor.status();
    return tensor->shape[0];
  }
  errno = 0;
  std::ifstream in(spec.dataset_path, std::ios::binary);
  if (!in) return OpenError("dataset", spec.dataset_path);
  int64_t count = 0;
  std::string text;
  while (std::getline(in, text)) {
    if (!absl::StripAsciiWhitespace(text).empty()) ++count;
  }
  if (in.bad()) {
    return absl::DataLossError(absl::StrCat("dataset ", spec.dataset_path, ": read error after ",
                                            count, " samples"));
  }
  return count;
}

}  // namespace mq::data
