// Calibration datasets for GPTQ/AWQ: token-id samples loaded from JSONL or safetensors files.
//
// Dataset formats (chosen by the file extension, then by the first non-blank line):
//   *.jsonl  one JSON object per line; blank (all-whitespace) lines are skipped. Each object is
//            exactly one of these kinds, checked in this order, and every line must be the same
//            kind as the first one:
//              "input_ids": [int, ...]   pre-tokenized (Hugging Face convention); no tokenizer
//              "messages": [{"role": str, "content": str}, ...]
//                        rendered as "<role>: <content>" per message, messages joined by a
//                        blank line ("\n\n"), no trailing newline; then tokenized as text.
//                        The role marker is the role name as plain text ("user: ..."), the
//                        same for every tokenizer: no chat template and no role special tokens
//                        (such as Kimi-K2's <|im_user|>) are inserted; special tokens written
//                        in the content itself are still recognised by the tokenizer
//              "<text_field>": str       plain text (text_field defaults to "text")
//   *.safetensors  one tensor named "input_ids", 2-D [num_rows, seq_len], dtype I32 or I64;
//            every row is one sample (no padding is removed).
// Text and messages are tokenized with the tokenizer LoadTokenizer (tokenizer.h) finds at
// spec.tokenizer_path (a tokenizer.json, a tiktoken.model or a directory holding one) and
// spec.add_special_tokens.
//
// Selection: every sample is parsed (and tokenized); samples with fewer than
// min_sequence_length tokens are dropped; the remaining ones, in file order, are shuffled with
// CalibrationShuffle(n, seed); the first skip_samples of that order are passed over, the next
// num_samples are taken and each is truncated to max_sequence_length tokens (no padding). When
// fewer are left, all of them are returned (`available` says how many passed the filter), possibly
// none: held-out sequences are those after a calibration's (skip_samples = its num_samples, same
// seed and filter), so the two never share a sample.
#ifndef MQ_WORKER_DATA_CALIBRATION_H_
#define MQ_WORKER_DATA_CALIBRATION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mq::data {

struct CalibrationSpec {
  std::string dataset_path;            // .jsonl or .safetensors
  std::string tokenizer_path;  // LoadTokenizer's path; required only for text/messages datasets
  int64_t num_samples = 128;           // > 0
  int64_t max_sequence_length = 2048;  // > 0; longer samples are truncated (no padding)
  int64_t min_sequence_length = 1;     // >= 0; shorter samples (after tokenization) are skipped
  uint64_t seed = 0;                   // deterministic shuffle (CalibrationShuffle)
  int64_t skip_samples = 0;            // >= 0; leading samples of the shuffled order passed over
  bool add_special_tokens = true;      // passed to Tokenizer::Encode
  std::string text_field = "text";     // key of the text in JSONL text datasets
};

struct CalibrationSet {
  std::vector<std::vector<int32_t>> samples;  // min(num_samples, available - skip) samples
  int64_t total_tokens = 0;                   // sum of the sample lengths
  std::string format;                         // "text", "messages", "input_ids" or "safetensors"
  int64_t skipped_short = 0;  // samples dropped for being shorter than min_sequence_length
  int64_t available = 0;      // samples that passed the length filter
};

// Loads, filters, shuffles and truncates a calibration dataset as described above. Every id
// must be in [0, vocab_size) unless vocab_size is 0 (unchecked).
// Errors (messages name the file, the line or row, and the problem):
//   INVALID_ARGUMENT  a spec field out of range; unknown extension; a line that is not a JSON
//                     object, lacks input_ids/messages/text_field, has wrong types, or differs in
//                     kind from the first line; ids that are not integers or out of range; a
//                     text dataset without spec.tokenizer_path; an empty file; a bad
//                     safetensors header or input_ids tensor; text that is not UTF-8
//   NOT_FOUND         the dataset or tokenizer file cannot be opened
//   FAILED_PRECONDITION  no sample reaches min_sequence_length
// Thread-safety: a pure function of its inputs and the files; safe to call concurrently.
absl::StatusOr<CalibrationSet> LoadCalibration(const CalibrationSpec& spec, int64_t vocab_size);

// Cheap fail-fast check before a job starts: spec fields in range, the dataset file exists and
// is readable with a known extension, its first non-blank line parses into a known kind (or the
// safetensors header has a valid input_ids tensor), and the tokenizer loads when that kind needs
// one. Does not read the whole dataset. Same error codes as LoadCalibration.
absl::Status CheckCalibrationSource(const CalibrationSpec& spec);

// Samples the dataset holds, counted without parsing or tokenizing them: non-blank lines of a
// .jsonl file, rows of a .safetensors input_ids tensor. An upper bound of LoadCalibration's
// `available` (the length filter may drop some). NOT_FOUND / INVALID_ARGUMENT as CheckCalibration-
// Source; DATA_LOSS for a read error. Reads the whole file once (JSONL); cheap next to loading.
absl::StatusOr<int64_t> CountCalibrationSamples(const CalibrationSpec& spec);

// The deterministic, platform-independent permutation used for selection: indices 0..n-1
// shuffled by Fisher–Yates driven by splitmix64 seeded with `seed`:
//   state = seed
//   next(): state += 0x9e3779b97f4a7c15; z = state;
//           z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9; z = (z ^ (z >> 27)) * 0x94d049bb133111eb;
//           return z ^ (z >> 31)                       (all arithmetic mod 2^64)
//   for i = n-1 down to 1: j = next() % (i + 1); swap(idx[i], idx[j])
std::vector<int64_t> CalibrationShuffle(int64_t n, uint64_t seed);

}  // namespace mq::data

#endif  // MQ_WORKER_DATA_CALIBRATION_H_
