#include "worker/data/text_internal.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace mq::data::internal {

// ---- UTF-8 --------------------------------------------------------------------------------

// Byte length of the UTF-8 sequence starting with `lead` (input already validated).
size_t Utf8Len(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xe) return 3;
  return 4;
}

uint32_t DecodeAt(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  switch (Utf8Len(p[0])) {
    case 1:
      return p[0];
    case 2:
      return ((p[0] & 0x1fu) << 6) | (p[1] & 0x3fu);
    case 3:
      return ((p[0] & 0x0fu) << 12) | ((p[1] & 0x3fu) << 6) | (p[2] & 0x3fu);
    default:
      return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3fu) << 12) | ((p[2] & 0x3fu) << 6) |
             (p[3] & 0x3fu);
  }
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out->push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

// Returns the offset of the first invalid byte, or npos when `s` is valid UTF-8 (no overlongs,
// no surrogates, nothing above U+10FFFF).
size_t FindInvalidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t min;
    if ((c >> 5) == 0x6) {
      len = 2, min = 0x80;
    } else if ((c >> 4) == 0xe) {
      len = 3, min = 0x800;
    } else if ((c >> 3) == 0x1e) {
      len = 4, min = 0x10000;
    } else {
      return i;
    }
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return i;
    }
    uint32_t cp = DecodeAt(s, i);
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += len;
  }
  return std::string_view::npos;
}

// Unicode White_Space (Rust's char::is_whitespace and regex `\s`).
bool IsWhiteSpace(uint32_t c) {
  return (c >= 0x9 && c <= 0xd) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
         c == 0x3000;
}

absl::Status CheckUtf8(std::string_view text) {
  if (size_t bad = FindInvalidUtf8(text); bad != std::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("text is not valid UTF-8: bad byte 0x",
                     absl::Hex(static_cast<unsigned char>(text[bad]), absl::kZeroPad2),
                     " at offset ", bad, " of ", text.size()));
  }
  return absl::OkStatus();
}

// ---- PCRE2 -------------------------------------------------------------------------------

// Rewrites Oniguruma escapes whose PCRE2 meaning differs: `\s`/`\S` become White_Space (PCRE2
// also counts U+180E), `\w`/`\W` become Oniguruma's word class (letters, marks, Nd, Pc).
// `\W` inside a character class is kept as is.
std::string ToPcre2Syntax(const std::string& pattern) {
  constexpr char kWord[] = R"(\p{L}\p{M}\p{Nd}\p{Pc})";
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      char e = pattern[++i];
      if (e == 's') {
        out += R"(\p{White_Space})";
      } else if (e == 'S') {
        out += R"(\P{White_Space})";
      } else if (e == 'w') {
        out += in_class ? std::string(kWord) : absl::StrCat("[", kWord, "]");
      } else if (e == 'W' && !in_class) {
        out += absl::StrCat("[^", kWord, "]");
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      size_t end = pattern.find(":]", i + 2);  // POSIX class such as [:alpha:]
      if (end != std::string::npos) {
        out.append(pattern, i, end + 2 - i);
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

namespace {

pcre2_jit_stack* ThreadJitStack(void*) {
  struct Holder {
    pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    ~Holder() { pcre2_jit_stack_free(stack); }
  };
  thread_local Holder holder;
  return holder.stack;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Regex>> Regex::Compile(const std::string& pcre2_pattern,
                                                            const std::string& where) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pcre2_pattern.data()), pcre2_pattern.size(),
                    PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR buffer[256];
    pcre2_get_error_message(error, buffer, sizeof(buffer));
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": not a valid regex (PCRE2: ", reinterpret_cast<const char*>(buffer), " at offset ",
        offset, " of the ", pcre2_pattern.size(), "-byte translated pattern)"));
  }
  auto regex = std::shared_ptr<Regex>(new Regex());
  regex->code_ = code;
  // Without JIT support pcre2_match falls back to the interpreter.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  regex->context_ = pcre2_match_context_create(nullptr);
  pcre2_jit_stack_assign(regex->context_, ThreadJitStack, nullptr);
  return std::shared_ptr<const Regex>(std::move(regex));
}

Regex::~Regex() {
  pcre2_match_context_free(context_);
  pcre2_code_free(code_);
}

absl::Status Regex::FindAll(std::string_view s, std::vector<std::pair<size_t, size_t>>* out) const {
  out->clear();
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
  size_t last_end = 0;
  std::optional<size_t> last_match_end;
  absl::Status status;
  while (last_end <= s.size()) {
    int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), last_end,
                         PCRE2_NO_UTF_CHECK, md, context_);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR buffer[256];
      pcre2_get_error_message(rc, buffer, sizeof(buffer));
      status = absl::InvalidArgumentError(
          absl::StrCat("regex match failed on a ", s.size(),
                       "-byte piece: ", reinterpret_cast<const char*>(buffer)));
      break;
    }
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t begin = ov[0], end = ov[1];
    if (begin == end && last_match_end == end) {
      last_end += last_end < s.size() ? Utf8Len(static_cast<unsigned char>(s[last_end])) : 1;
      continue;
    }
    last_end = end;
    last_match_end = end;
    out->emplace_back(begin, end);
  }
  pcre2_match_data_free(md);
  return status;
}

bool Regex::MatchesAt(std::string_view s, size_t at) const {
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
  int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at,
                       PCRE2_NO_UTF_CHECK | PCRE2_ANCHORED, md, context_);
  pcre2_match_data_free(md);
  return rc >= 0;
}

// ---- literal tokens -----------------------------------------------------------------------

void LiteralMatcher::Add(std::string content, int32_t value) {
  if (content.empty()) return;
  literals_.emplace_back(std::move(content), value);
}

void LiteralMatcher::Finish() {
  for (auto& list : by_first_byte_) list.clear();
  for (int i = 0; i < static_cast<int>(literals_.size()); ++i) {
    by_first_byte_[static_cast<unsigned char>(literals_[i].first[0])].push_back(i);
  }
  for (auto& list : by_first_byte_) {
    std::stable_sort(list.begin(), list.end(), [&](int a, int b) {
      return literals_[a].first.size() > literals_[b].first.size();
    });
  }
}

std::optional<std::pair<int32_t, size_t>> LiteralMatcher::LongestAt(std::string_view s,
                                                                    size_t pos) const {
  if (pos >= s.size()) return std::nullopt;
  for (int idx : by_first_byte_[static_cast<unsigned char>(s[pos])]) {
    const std::string& lit = literals_[idx].first;
    if (s.compare(pos, lit.size(), lit) == 0) {
      return std::make_pair(literals_[idx].second, lit.size());
    }
  }
  return std::nullopt;
}

}  // namespace mq::data::internal
