// Pieces shared by the tokenizers in worker/data (BpeTokenizer, TiktokenTokenizer): UTF-8
// checks, a PCRE2 (UTF + UCP) regex wrapper, the Oniguruma -> PCRE2 escape rewrite, and a
// leftmost-longest literal matcher for special tokens. Internal to worker/data; not a public API.
//
// Thread-safety: every function is pure; Regex and LiteralMatcher are immutable after they are
// built and may then be used from any number of threads.
#ifndef MQ_WORKER_DATA_TEXT_INTERNAL_H_
#define MQ_WORKER_DATA_TEXT_INTERNAL_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

struct pcre2_real_code_8;
struct pcre2_real_match_context_8;

namespace mq::data::internal {

// ---- UTF-8 --------------------------------------------------------------------------------

// Byte length of the UTF-8 sequence starting with `lead` (input already validated).
size_t Utf8Len(unsigned char lead);
// The code point at byte offset `i` of validated UTF-8 `s`.
uint32_t DecodeAt(std::string_view s, size_t i);
void AppendUtf8(uint32_t cp, std::string* out);
// The offset of the first invalid byte, or npos when `s` is valid UTF-8 (no overlongs, no
// surrogates, nothing above U+10FFFF).
size_t FindInvalidUtf8(std::string_view s);
// INVALID_ARGUMENT "text is not valid UTF-8: bad byte 0x.. at offset N of M" when `text` is not
// valid UTF-8; OK otherwise.
absl::Status CheckUtf8(std::string_view text);
// Unicode White_Space (Rust's char::is_whitespace and regex `\s`).
bool IsWhiteSpace(uint32_t c);

// ---- regexes ------------------------------------------------------------------------------

// Rewrites Oniguruma escapes whose PCRE2 meaning differs: `\s`/`\S` become White_Space (PCRE2
// also counts U+180E), `\w`/`\W` become Oniguruma's word class (letters, marks, Nd, Pc).
// `\W` inside a character class is kept as is.
std::string ToPcre2Syntax(const std::string& pattern);

// A compiled UTF/UCP regex. Thread-safety: immutable after Compile; FindAll and MatchesAt may
// run concurrently (match data is per call, the JIT stack per thread).
class Regex {
 public:
  // Compiles `pcre2_pattern` (PCRE2 syntax, used as is). INVALID_ARGUMENT starting with `where`
  // when PCRE2 refuses it.
  static absl::StatusOr<std::shared_ptr<const Regex>> Compile(const std::string& pcre2_pattern,
                                                              const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // All matches of the regex in `s` as (begin, end) byte offsets, with the semantics of the
  // Rust `onig` crate's find_iter (an empty match right after the previous match is skipped by
  // advancing one character). `s` must be valid UTF-8.
  absl::Status FindAll(std::string_view s, std::vector<std::pair<size_t, size_t>>* out) const;
  // True when the regex matches at exactly offset `at` of `s` (anchored).
  bool MatchesAt(std::string_view s, size_t at) const;

 private:
  Regex() = default;
  pcre2_real_code_8* code_ = nullptr;
  pcre2_real_match_context_8* context_ = nullptr;
};

// ---- literal tokens -----------------------------------------------------------------------

// A set of non-empty literal strings (special or added tokens) matched leftmost-longest: at a
// position the longest one that starts there wins. Build once with Add, then Finish.
class LiteralMatcher {
 public:
  // Adds `content` (ignored when empty) with a caller-chosen `value`.
  void Add(std::string content, int32_t value);
  // Sorts each first-byte bucket longest first; call after the last Add.
  void Finish();
  bool empty() const { return literals_.empty(); }
  // The value of the longest literal that starts at byte `pos` of `s`, with its length.
  std::optional<std::pair<int32_t, size_t>> LongestAt(std::string_view s, size_t pos) const;

 private:
  std::vector<std::pair<std::string, int32_t>> literals_;
  std::array<std::vector<int>, 256> by_first_byte_;
};

}  // namespace mq::data::internal

#endif  // MQ_WORKER_DATA_TEXT_INTERNAL_H_
