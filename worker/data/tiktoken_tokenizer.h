// Byte-level BPE in the tiktoken format: a ranks file (one "<base64 token bytes> <rank>" per
// line, e.g. Kimi-K2's tiktoken.model), a pre-tokenizer pattern and special tokens. Produces
// the same ids as the Python `tiktoken` package:
//   tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
//                     special_tokens=specials).encode(text, allowed_special="all")
// (plus the BOS id in front when asked for), without Python, torch or protobuf.
//
// Encoding: special tokens are split out of the text first (leftmost, the longest at a
// position; tiktoken tries them in hash order, which only differs when one special token is a
// prefix of another starting at the same place); each remaining segment is cut by the pattern
// (text between matches is dropped, as tiktoken does), a piece that is itself a token becomes
// that token, and any other piece is merged from its bytes by repeatedly joining the adjacent
// pair whose concatenation has the lowest rank (leftmost on ties), tiktoken's byte_pair_merge.
// Kimi-K2's tokenization_kimi.py also cuts a text into chunks of at most 400,000 characters and
// runs of at most 25,000 consecutive whitespace or non-whitespace characters before calling
// tiktoken (a guard against tiktoken's stack limits); texts are encoded whole here, so ids can
// differ from that file's only at such cut points of very long texts.
// The pattern is Rust regex syntax (tiktoken uses fancy-regex), translated to PCRE2 by
// RustRegexToPcre2 (rust_regex.h) and matched with UTF + UCP. Unicode tables may differ for
// characters assigned after the PCRE2 library's Unicode version (PCRE2 10.42: Unicode 14).
#ifndef MQ_WORKER_DATA_TIKTOKEN_TOKENIZER_H_
#define MQ_WORKER_DATA_TIKTOKEN_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/data/tokenizer.h"

namespace mq::data {

// Kimi-K2's pre-tokenizer pattern (pat_str in its tokenization_kimi.py), Rust regex syntax.
extern const char kKimiK2Pattern[];
// Kimi-K2 reserves this many special-token ids right after the BPE ranks
// (num_reserved_special_tokens in tokenization_kimi.py).
inline constexpr int32_t kKimiReservedSpecialTokens = 256;

struct TiktokenOptions {
  std::string pattern = kKimiK2Pattern;  // Rust regex syntax
  // Special tokens (content, id); contents and ids must be unique and must not collide with
  // the ranks' ids.
  std::vector<std::pair<std::string, int32_t>> special_tokens;
  std::optional<int32_t> bos_id;  // prepended when Encode's add_special_tokens is true
};

// Immutable after construction; thread-safety as Tokenizer. Movable, not copyable.
class TiktokenTokenizer final : public Tokenizer {
 public:
  // Parses ranks file contents (`ranks`): lines "<base64> <rank>" (blank lines skipped), every
  // token distinct and non-empty, every rank distinct and in [0, 2^31 - 2], and all 256
  // single-byte tokens present (byte-level BPE must be able to encode any text).
  // INVALID_ARGUMENT naming the line number and the problem (file contents are never quoted);
  // also for a pattern that does not translate or compile, bad special tokens, or a bos_id that
  // is not a special token's id.
  static absl::StatusOr<TiktokenTokenizer> Create(std::string_view ranks, TiktokenOptions options);

  // Reads the ranks file at `ranks_path` (NOT_FOUND when it cannot be opened; other messages
  // start with the path) and calls Create.
  static absl::StatusOr<TiktokenTokenizer> FromFile(const std::string& ranks_path,
                                                    TiktokenOptions options);

  // The Kimi-K2 layout: the ranks file `ranks_path` (tiktoken.model) and the tokenizer_config
  // .json at `config_path`, read as tokenization_kimi.py does:
  //   special tokens  ids [N, N + 256) where N is the number of ranks; the content of id i is
  //                   added_tokens_decoder["i"].content, or "<|reserved_token_i|>" when absent
  //                   (an added_tokens_decoder id outside that range is an error)
  //   BOS             bos_token (a string or {"content": ...}) must be one of those special
  //                   tokens; it is prepended when add_special_tokens, unless add_bos_token is
  //                   false; no bos_token: nothing is prepended
  //   pattern         kKimiK2Pattern, or the string "pat_str" in tokenizer_config.json when
  //                   present (an mq extension for other tiktoken-format tokenizers)
  // NOT_FOUND when either file is missing; INVALID_ARGUMENT naming the file and the key.
  static absl::StatusOr<TiktokenTokenizer> FromModelFiles(const std::string& ranks_path,
                                                          const std::string& config_path);

  TiktokenTokenizer(TiktokenTokenizer&&) noexcept;
  TiktokenTokenizer& operator=(TiktokenTokenizer&&) noexcept;
  ~TiktokenTokenizer() override;

  // See Tokenizer::Encode; add_special_tokens prepends the BOS id (when there is one).
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override;
  int64_t vocab_size() const override;
  // A special token's content, or the raw bytes of a BPE token.
  std::optional<int32_t> TokenToId(std::string_view token) const override;
  std::optional<int32_t> bos_id() const;

  struct Impl;

 private:
  explicit TiktokenTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mq::data

#endif  // MQ_WORKER_DATA_TIKTOKEN_TOKENIZER_H_
