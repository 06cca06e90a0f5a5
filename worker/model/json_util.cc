#include "worker/model/json_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace mq::model {
namespace {

// Thrown from the parser callback to stop parsing; never escapes ParseJsonStrict.
struct StopParse {
  std::string message;
};

}  // namespace

absl::StatusOr<nlohmann::json> ParseJsonStrict(std::string_view text) {
  // One key set per open object, plus the key under which each object was opened.
  std::vector<std::set<std::string>> keys;
  std::vector<std::string> object_names;
  std::string last_key;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event,
                      nlohmann::json& parsed) -> bool {
    using Event = nlohmann::json::parse_event_t;
    if (depth > kMaxJsonDepth) {
      throw StopParse{absl::StrCat("JSON nesting deeper than ", kMaxJsonDepth, " levels")};
    }
    switch (event) {
      case Event::object_start:
        keys.emplace_back();
        object_names.push_back(keys.size() == 1 ? std::string("(top level)") : last_key);
        break;
      case Event::object_end:
        if (!keys.empty()) keys.pop_back();
        if (!object_names.empty()) object_names.pop_back();
        break;
      case Event::key: {
        last_key = parsed.get<std::string>();
        if (!keys.empty() && !keys.back().insert(last_key).second) {
          throw StopParse{absl::StrCat("duplicate key \"", last_key, "\" in object ",
                                       object_names.back() == "(top level)"
                                           ? object_names.back()
                                           : absl::StrCat("\"", object_names.back(), "\""))};
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  // nlohmann's lexer treats a NUL byte as end of input; JSON never allows a raw NUL.
  if (size_t nul = text.find('\0'); nul != std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("invalid JSON: NUL byte at offset ", nul));
  }
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                                 /*ignore_comments=*/false);
  } catch (const StopParse& stop) {
    return absl::InvalidArgumentError(stop.message);
  } catch (const nlohmann::json::exception& e) {
    absl::string_view what = e.what();
    if (size_t close = what.find("] "); close != absl::string_view::npos && what.front() == '[') {
      what.remove_prefix(close + 2);
    }
    return absl::InvalidArgumentError(absl::StrCat("invalid JSON: ", what));
  }
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path, uint64_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": file not found"));
    return absl::ErrnoToStatus(err, absl::StrCat(path, ": cannot open"));
  }
  struct stat st;
  absl::Status status;
  std::string out;
  if (::fstat(fd, &st) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat(path, ": fstat failed"));
  } else if (!S_ISREG(st.st_mode)) {
    status = absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  } else if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    status = absl::InvalidArgumentError(absl::StrCat(
        path, ": file is ", st.st_size, " bytes, more than the ", max_bytes, "-byte limit"));
  } else {
    out.resize(static_cast<size_t>(st.st_size));
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = ::read(fd, out.data() + done, out.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        status = absl::ErrnoToStatus(errno, absl::StrCat(path, ": read failed"));
        break;
      }
      if (n == 0) {  // shrank while reading
        out.resize(done);
        break;
      }
      done += static_cast<size_t>(n);
    }
  }
  ::close(fd);
  if (!status.ok()) return status;
  return out;
}

const char* JsonTypeName(const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::null:
      return "null";
    case nlohmann::json::value_t::boolean:
      return "boolean";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
      return "integer";
    case nlohmann::json::value_t::number_float:
      return "number";
    case nlohmann::json::value_t::string:
      return "string";
    case nlohmann::json::value_t::array:
      return "array";
    case nlohmann::json::value_t::object:
      return "object";
    default:
      return "value";
  }
}

std::string JsonForMessage(const nlohmann::json& value) {
  std::string text = value.dump(/*indent=*/-1, ' ', /*ensure_ascii=*/false,
                                nlohmann::json::error_handler_t::replace);
  // Insert a space after commas so lists read like the rest of the messages: [128, 128].
  if (value.is_array()) {
    std::string spaced;
    for (char c : text) {
      spaced += c;
      if (c == ',') spaced += ' ';
    }
    text = std::move(spaced);
  }
  constexpr size_t kMax = 60;
  if (text.size() > kMax) text = absl::StrCat(text.substr(0, kMax), "...");
  return text;
}

}  // namespace mq::model
