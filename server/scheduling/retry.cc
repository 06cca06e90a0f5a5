#include "server/scheduling/retry.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mq::server {
namespace {

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsAlnum(char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0; }

// Crockford base32 as NewId writes it (upper case; no I, L, O, U).
bool IsIdChar(char c) {
  return (c >= '0' && c <= '9') ||
         (c >= 'A' && c <= 'Z' && c != 'I' && c != 'L' && c != 'O' && c != 'U');
}

// Length of a dotted IPv4 address starting at `i` (four digit groups of 1-3), or 0.
size_t DottedQuadAt(std::string_view s, size_t i) {
  size_t p = i;
  for (int group = 0; group < 4; ++group) {
    size_t digits = 0;
    while (p < s.size() && IsDigit(s[p]) && digits < 4) ++p, ++digits;
    if (digits == 0 || digits > 3) return 0;
    if (group < 3) {
      if (p >= s.size() || s[p] != '.') return 0;
      ++p;
    }
  }
  if (p < s.size() && (IsDigit(s[p]) || (s[p] == '.' && p + 1 < s.size() && IsDigit(s[p + 1])))) {
    return 0;
  }
  return p - i;
}

// "rank 1 (w-b) failed: " at the start of `s`: its length, else 0.
size_t RankPrefix(std::string_view s) {
  if (s.substr(0, 5) != "rank ") return 0;
  size_t p = 5;
  while (p < s.size() && IsDigit(s[p])) ++p;
  if (p == 5 || s.substr(p, 2) != " (") return 0;
  const size_t close = s.find(") failed: ", p);
  if (close == std::string_view::npos) return 0;
  return close + 10;
}

}  // namespace

int64_t InfrastructureRetryDelayMs(int failures_in_row) {
  int64_t delay = kFirstRetryDelayMs;
  for (int i = 1; i < failures_in_row && delay < kMaxRetryDelayMs; ++i) delay *= 2;
  return std::min(delay, kMaxRetryDelayMs);
}

std::string FailureSignature(std::string_view reason, std::vector<std::string> worker_ids) {
  std::sort(worker_ids.begin(), worker_ids.end());
  std::string out = absl::StrCat(absl::StrJoin(worker_ids, ","), "|");
  std::string_view s = reason.substr(RankPrefix(reason));
  for (size_t i = 0; i < s.size();) {
    const bool word_start = i == 0 || !IsAlnum(s[i - 1]);
    // An id: one or two lower-case letters, '-', 26 base32 characters.
    if (word_start && std::islower(static_cast<unsigned char>(s[i]))) {
      size_t p = i;
      while (p < s.size() && p - i < 2 && std::islower(static_cast<unsigned char>(s[p]))) ++p;
      if (p < s.size() && s[p] == '-') {
        size_t q = p + 1;
        while (q < s.size() && IsIdChar(s[q])) ++q;
        if (q - p - 1 == 26 && (q == s.size() || !IsAlnum(s[q]))) {
          out += "<id>";
          i = q;
          continue;
        }
      }
    }
    if (!IsDigit(s[i])) {
      out += s[i++];
      continue;
    }
    if (word_start) {
      if (size_t n = DottedQuadAt(s, i); n > 0) {
        out.append(s.substr(i, n));
        i += n;
        continue;
      }
    }
    size_t end = i;
    while (end < s.size() && IsDigit(s[end])) ++end;
    // The PORT of HOST:PORT (host name or address just before the colon).
    const bool port =
        i >= 2 && s[i - 1] == ':' && IsAlnum(s[i - 2]) && !(end < s.size() && IsAlnum(s[end]));
    if (port) {
      out.append(s.substr(i, end - i));
    } else if (i > 0 && IsAlnum(s[i - 1]) && !IsDigit(s[i - 1])) {
      out.append(s.substr(i, end - i));  // part of a word or name ("w2", "cuda0"): kept
    } else {
      out += '#';
    }
    i = end;
  }
  return out;
}

}  // namespace mq::server
