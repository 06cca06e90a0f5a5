// The tokenizer interface calibration uses, and the loader that picks the implementation from
// what a model directory (or a --tokenizer path) holds:
//   tokenizer.json                        BpeTokenizer (Hugging Face tokenizers)
//   tiktoken.model + tokenizer_config.json  TiktokenTokenizer (Kimi-K2 layout)
#ifndef MQ_WORKER_DATA_TOKENIZER_H_
#define MQ_WORKER_DATA_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace mq::data {

// A loaded tokenizer. Implementations are immutable after loading: every const method may be
// called concurrently from any number of threads. No durability: files are read once, at load.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Encodes UTF-8 `text` to token ids. Special (added) tokens in the text are always split
  // out; `add_special_tokens` adds the tokenizer's own framing (e.g. prepends BOS).
  // INVALID_ARGUMENT when `text` is not valid UTF-8 (the message gives the byte offset).
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_special_tokens) const = 0;
  // Max id + 1 over the vocabulary and the special tokens.
  virtual int64_t vocab_size() const = 0;
  // The id of a vocabulary entry or special token (its exact content), if any.
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
};

// Loads the tokenizer at `path`, which is one of:
//   a directory        its tokenizer.json when present, else its tiktoken.model (with the
//                      tokenizer_config.json beside it)
//   a file             a tokenizer.json (a name ending in .json, or first non-blank byte '{'),
//                      or else a tiktoken BPE ranks file (e.g. tiktoken.model) read with the
//                      tokenizer_config.json in the same directory
//                      (TiktokenTokenizer::FromModelFiles)
// NOT_FOUND when `path` does not exist or a directory holds neither file; otherwise the errors
// of BpeTokenizer::FromFile / TiktokenTokenizer::FromModelFiles (messages name the file).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path);

// The files LoadTokenizer(path) reads, the one that decides the format first: [tokenizer.json]
// or [tiktoken ranks file, tokenizer_config.json]; a directory's files are inside it. Lets a
// caller check each file (e.g. for symlinks leading out of a directory) before loading.
// NOT_FOUND as LoadTokenizer.
absl::StatusOr<std::vector<std::string>> TokenizerFiles(const std::string& path);

}  // namespace mq::data

#endif  // MQ_WORKER_DATA_TOKENIZER_H_
