// Byte-level BPE tokenizer that reads a Hugging Face `tokenizer.json` and produces the same ids
// as the Python `tokenizers` package (`Tokenizer.from_file(p).encode(text,
// add_special_tokens=...).ids`), without Python, torch or protobuf.
//
// Supported tokenizer.json subset (anything else is rejected by FromJson with
// INVALID_ARGUMENT naming the JSON path, the value and what is supported):
//   added_tokens     special and non-special; content, id, lstrip, rstrip, single_word,
//                    normalized (matched leftmost-longest, as tokenizers' AddedVocabulary does)
//   normalizer       null, or Sequence with no normalizers (NFC and others are rejected)
//   pre_tokenizer    null, ByteLevel (add_prefix_space, use_regex with the GPT-2 regex),
//                    Split (pattern Regex or String; behavior Isolated, Removed,
//                    MergedWithPrevious, MergedWithNext, Contiguous; invert), Digits
//                    (individual_digits), Sequence of these
//   model            BPE: vocab, merges ("a b" strings or [a, b] lists), ignore_merges,
//                    optional unk_token/fuse_unk; byte_fallback, dropout,
//                    continuing_subword_prefix and end_of_word_suffix must be off
//   post_processor   null, ByteLevel, TemplateProcessing (the "single" template),
//                    RobertaProcessing, BertProcessing, Sequence of these
//   truncation, padding  must be null
// Regexes are compiled with PCRE2 (UTF + UCP); tokenizers uses Oniguruma (Ruby syntax). `\s`,
// `\S`, `\w`, `\W` are rewritten to Oniguruma's meaning (White_Space; letters, marks, Nd, Pc).
// Not translated: Ruby-only syntax such as `\h` (hex digit), `\uXXXX` escapes, and `^`/`$`
// matching at every line (Oniguruma) rather than only at the ends (PCRE2); none appear in the
// GPT-2, Llama-3, Qwen2 or DeepSeek-V3 patterns. Unicode tables may differ for characters
// assigned after the PCRE2 library's Unicode version (PCRE2 10.42: Unicode 14).
#ifndef MQ_WORKER_DATA_BPE_TOKENIZER_H_
#define MQ_WORKER_DATA_BPE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/data/tokenizer.h"

namespace mq::data {

// An immutable, loaded tokenizer. Thread-safety: every const method may be called concurrently
// from any number of threads (the word cache inside is guarded by a mutex). Movable, not
// copyable. No durability: it only reads the file once, in FromFile.
class BpeTokenizer final : public Tokenizer {
 public:
  // Reads and parses `path` (a tokenizer.json). NOT_FOUND when the file cannot be opened;
  // INVALID_ARGUMENT (message starts with the path) when the JSON is malformed or uses a
  // feature outside the supported subset.
  static absl::StatusOr<BpeTokenizer> FromFile(const std::string& path);
  // Parses tokenizer.json contents. INVALID_ARGUMENT as above.
  static absl::StatusOr<BpeTokenizer> FromJson(std::string_view json);

  BpeTokenizer(BpeTokenizer&&) noexcept;
  BpeTokenizer& operator=(BpeTokenizer&&) noexcept;
  ~BpeTokenizer() override;

  // Encodes UTF-8 `text` to token ids. `add_special_tokens` applies the post-processor (e.g.
  // prepends BOS); added tokens in the text are always split out. INVALID_ARGUMENT when `text`
  // is not valid UTF-8 (the message gives the byte offset) or a regex match fails.
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override;

  // Max id + 1 over the model vocab and the added tokens.
  int64_t vocab_size() const override;
  // The id of a vocab entry or added token (its exact content), if any.
  std::optional<int32_t> TokenToId(std::string_view token) const override;

  struct Impl;

 private:
  explicit BpeTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mq::data

#endif  // MQ_WORKER_DATA_BPE_TOKENIZER_H_
