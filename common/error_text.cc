#include "common/error_text.h"

#include <algorithm>

namespace mq {
namespace {

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f'; }

std::string_view StripLeading(std::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  return s;
}

std::string_view StripTrailing(std::string_view s) {
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

bool StartsTrace(std::string_view line) {
  line = StripLeading(line);
  return StartsWith(line, "Exception raised from") || StartsWith(line, "frame #");
}

}  // namespace

std::string WithoutBacktrace(std::string_view message) {
  std::string out;
  while (!message.empty()) {
    const size_t nl = message.find('\n');
    std::string_view line = message.substr(0, nl);
    message = nl == std::string_view::npos ? std::string_view() : message.substr(nl + 1);
    if (StartsTrace(line)) break;
    line = StripTrailing(line);
    if (line.empty()) continue;
    if (!out.empty()) out += "; ";
    out.append(line);
  }
  // "Exception raised from X (most recent call first):" may also sit at the end of a line.
  if (size_t at = out.find("Exception raised from"); at != std::string::npos) {
    out.resize(at);
    while (!out.empty() && (IsSpace(out.back()) || out.back() == ';')) out.pop_back();
  }
  return out;
}

std::string EventMessage(std::string_view message, size_t max_bytes) {
  max_bytes = std::max<size_t>(max_bytes, 64);
  std::string out = WithoutBacktrace(message);
  if (out.size() <= max_bytes) return out;
  const size_t original = out.size();
  // Room for the suffix (at most " ... (99999999999 bytes cut)").
  size_t keep = max_bytes - 32;
  // Do not split a UTF-8 sequence: back up over continuation bytes.
  while (keep > 0 && (static_cast<unsigned char>(out[keep]) & 0xC0) == 0x80) --keep;
  out.resize(keep);
  out += " ... (" + std::to_string(original - keep) + " bytes cut)";
  return out;
}

}  // namespace mq
