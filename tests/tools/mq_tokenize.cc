// mq-tokenize: command-line access to worker/data for tests (tests/interop/test_tokenizer.py,
// tests/interop/test_tiktoken.py).
//
//   mq-tokenize --tokenizer T [--no-special] [--json] < lines
//       T: a tokenizer.json, a tiktoken.model (with tokenizer_config.json beside it) or a
//       directory holding either (data::LoadTokenizer). Encodes every stdin line (without its '\n')
//       and prints its ids as a JSON array, one line per input line. With --json every input line
//       is a JSON string literal instead (so texts may contain newlines).
//   mq-tokenize --calibration --dataset P [--tokenizer T] [--num-samples N] [--max-seq-len N]
//               [--min-seq-len N] [--seed S] [--vocab-size V] [--text-field F] [--no-special]
//               [--check]
//       Prints the CalibrationSet as one JSON object {format, available, skipped_short,
//       total_tokens, samples}; with --check runs CheckCalibrationSource only and prints "ok".
// Errors go to stderr with exit status 1 (2 for bad flags).
#include <cstdint>
#include <iostream>
#include <map>
#include <string>

#include "absl/strings/numbers.h"
#include "nlohmann/json.hpp"
#include "worker/data/calibration.h"
#include "worker/data/tokenizer.h"

namespace {

int Usage(const std::string& why) {
  std::cerr << "mq-tokenize: " << why << "\n"
            << "usage: mq-tokenize --tokenizer T [--no-special] [--json] < lines\n"
            << "       mq-tokenize --calibration --dataset P [--tokenizer T] [--num-samples N]\n"
            << "                   [--max-seq-len N] [--min-seq-len N] [--seed S]\n"
            << "                   [--vocab-size V] [--text-field F] [--no-special] [--check]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> values;
  bool calibration = false, no_special = false, json_lines = false, check = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--calibration") {
      calibration = true;
    } else if (a == "--no-special") {
      no_special = true;
    } else if (a == "--json") {
      json_lines = true;
    } else if (a == "--check") {
      check = true;
    } else if (a == "--tokenizer" || a == "--dataset" || a == "--num-samples" ||
               a == "--max-seq-len" || a == "--min-seq-len" || a == "--seed" ||
               a == "--vocab-size" || a == "--text-field") {
      if (i + 1 >= argc) return Usage(a + " needs a value");
      values[a] = argv[++i];
    } else {
      return Usage("unknown flag " + a);
    }
  }

  if (calibration) {
    mq::data::CalibrationSpec spec;
    spec.dataset_path = values["--dataset"];
    spec.tokenizer_path = values["--tokenizer"];
    spec.add_special_tokens = !no_special;
    if (values.count("--text-field")) spec.text_field = values["--text-field"];
    int64_t vocab_size = 0;
    struct IntFlag {
      const char* name;
      int64_t* target;
    };
    for (IntFlag f : {IntFlag{"--num-samples", &spec.num_samples},
                      IntFlag{"--max-seq-len", &spec.max_sequence_length},
                      IntFlag{"--min-seq-len", &spec.min_sequence_length},
                      IntFlag{"--vocab-size", &vocab_size}}) {
      if (values.count(f.name) && !absl::SimpleAtoi(values[f.name], f.target)) {
        return Usage(std::string(f.name) + " = " + values[f.name] + ": not an integer");
      }
    }
    if (values.count("--seed") && !absl::SimpleAtoi(values["--seed"], &spec.seed)) {
      return Usage("--seed = " + values["--seed"] + ": not an unsigned integer");
    }
    if (check) {
      absl::Status s = mq::data::CheckCalibrationSource(spec);
      if (!s.ok()) {
        std::cerr << "mq-tokenize: " << s << "\n";
        return 1;
      }
      std::cout << "ok\n";
      return 0;
    }
    auto set = mq::data::LoadCalibration(spec, vocab_size);
    if (!set.ok()) {
      std::cerr << "mq-tokenize: " << set.status() << "\n";
      return 1;
    }
    nlohmann::json out = {{"format", set->format},
                          {"available", set->available},
                          {"skipped_short", set->skipped_short},
                          {"total_tokens", set->total_tokens},
                          {"samples", set->samples}};
    std::cout << out.dump() << "\n";
    return 0;
  }

  if (!values.count("--tokenizer")) return Usage("--tokenizer is required");
  auto tokenizer = mq::data::LoadTokenizer(values["--tokenizer"]);
  if (!tokenizer.ok()) {
    std::cerr << "mq-tokenize: " << tokenizer.status() << "\n";
    return 1;
  }
  std::ios::sync_with_stdio(false);
  std::string line;
  int64_t line_no = 0;
  while (std::getline(std::cin, line)) {
    ++line_no;
    std::string text = line;
    if (json_lines) {
      nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_string()) {
        std::cerr << "mq-tokenize: stdin line " << line_no << ": not a JSON string\n";
        return 1;
      }
      text = j.get<std::string>();
    }
    auto ids = (*tokenizer)->Encode(text, !no_special);
    if (!ids.ok()) {
      std::cerr << "mq-tokenize: stdin line " << line_no << ": " << ids.status() << "\n";
      return 1;
    }
    std::cout << nlohmann::json(*ids).dump() << "\n";
  }
  return 0;
}
