// Translation of Rust `regex` / `fancy-regex` syntax (the pre-tokenizer patterns of tiktoken
// encodings, e.g. Kimi-K2's tokenization_kimi.py) into PCRE2 syntax with the same meaning under
// PCRE2_UTF | PCRE2_UCP.
//
// What is translated (everything else is copied unchanged, since PCRE2 reads it the same way):
//   character-class set operations  `[A&&B]` (intersection) and `[A--B]` (difference), nested
//       classes `[a[bc]]` (union) and `[^...]` around any of them, to PCRE2 lookaheads over one
//       character: `[A&&B]` -> `(?:(?=A)B)`, `[A--B]` -> `(?:(?!B)A)`; plain classes stay classes
//       (e.g. `[\p{Lu}\p{M}&&[^\p{Han}]]` -> `(?:(?=[\p{Lu}\p{M}])[^\p{sc:Han}])`)
//   `\p{Script}`  Rust means the Script property; PCRE2 >= 10.40 reads a bare script name as
//       Script_Extensions, so script names become `\p{sc:Name}` (general categories, `Any` and
//       the common binary properties such as White_Space stay as they are; `sc=`, `scx=`,
//       `gc=` and their long forms map to PCRE2's `sc:`, `scx:` and bare forms)
//   `\s` `\S` `\d` `\D` `\w` `\W`  to Rust's Unicode definitions (White_Space; Nd;
//       Alphabetic, M, Nd, Pc, Join_Control)
//   `\v` (Rust: U+000B; PCRE2: vertical space), `\xHH`, `\x{H..}`, `\uHHHH`, `\u{H..}`,
//       `\UHHHHHHHH` to `\x{..}`
// Refused with INVALID_ARGUMENT naming the offset: symmetric difference `~~`, POSIX classes
// such as `[[:alpha:]]` (ASCII in Rust, Unicode under PCRE2_UCP), unknown escapes of letters,
// unbalanced brackets and empty class operands. Not translated: `^`/`$` (Rust: text ends
// unless (?m); PCRE2 `$` also matches before a final newline) and `\b` (word boundary by each
// engine's `\w`); the tiktoken patterns in use (cl100k, o200k, Kimi-K2) use none of these.
//
// Pure function; safe from any thread.
#ifndef MQ_WORKER_DATA_RUST_REGEX_H_
#define MQ_WORKER_DATA_RUST_REGEX_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace mq::data {

absl::StatusOr<std::string> RustRegexToPcre2(std::string_view pattern);

}  // namespace mq::data

#endif  // MQ_WORKER_DATA_RUST_REGEX_H_
