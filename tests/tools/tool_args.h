// Shared pieces of the torch-side test tools (mq-forward, mq-eval-local): their `--flag value`
// command line and the token ids they read.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mq::tools {

// Parses `--flag value` pairs of argv into `flags`; `--help`/`-h` prints `usage` and exits 0.
// Errors name an unknown flag, a flag without a value, or the first of `required` left empty.
absl::Status ParseToolFlags(int argc, char** argv, const std::map<std::string, std::string*>& flags,
                            std::initializer_list<const char*> required, const char* usage);

// "input_ids" of a safetensors file: I64 or I32 [batch, seq], returned as int64.
absl::StatusOr<at::Tensor> ReadInputIds(const std::string& path);

}  // namespace mq::tools
