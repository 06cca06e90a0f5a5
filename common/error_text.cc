#include "common/error_text.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/strings/ascii.h"

namespace mq {
namespace {

bool StartsTrace(std::string_view line) {
  line = absl::StripLeadingAsciiWhitespace(line);
  return absl::StartsWith(line, "Exception raised from") || absl::StartsWith(line, "frame #");
}

}  // namespace

std::string WithoutBacktrace(std::string_view message) {
  std::vector<std::string_view> kept;
  for (std::string_view line : absl::StrSplit(message, '\n')) {
    if (StartsTrace(line)) break;
    line = absl::StripTrailingAsciiWhitespace(line);
    if (!line.empty()) kept.push_back(line);
  }
  std::string out = absl::StrJoin(kept, "; ");
  // "Exception raised from X (most recent call first):" may also sit at the end of a line.
  if (size_t at = out.find("Exception raised from"); at != std::string::npos) {
    out.resize(at);
    while (!out.empty() && (absl::ascii_isspace(out.back()) || out.back() == ';')) out.pop_back();
  }
  return out;
}

std::string EventMessage(std::string_view message, size_t max_bytes) {
  max_bytes = std::max<size_t>(max_bytes, 64);
  std::string out = WithoutBacktrace(message);
  if (out.size() <= max_bytes) return out;
  const size_t original = out.size();
  // Reserve room for the suffix (at most " ... (99999999999 bytes cut)").
  size_t keep = max_bytes - 32;
  // Do not split a UTF-8 sequence: back up over continuation bytes.
  while (keep > 0 && (static_cast<unsigned char>(out[keep]) & 0xC0) == 0x80) --keep;
  out.resize(keep);
  absl::StrAppend(&out, " ... (", original - keep, " bytes cut)");
  return out;
}

}  // namespace mq
