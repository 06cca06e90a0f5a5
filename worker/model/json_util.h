// Small JSON helpers shared by the config and index readers in worker/model.
//
// Pure functions with no shared state; safe to call from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace mq::model {

// Deepest object/array nesting ParseJsonStrict accepts (config.json and the index need 3).
inline constexpr int kMaxJsonDepth = 64;

// Parses `text` as one JSON value. Unlike nlohmann::json::parse (which silently keeps the last
// of duplicated keys) this rejects duplicate keys in any object, and nesting deeper than
// kMaxJsonDepth. Errors are InvalidArgument: `invalid JSON: <parser message>`,
// `duplicate key "k" in object "parent"` or `JSON nesting deeper than 64 levels`.
absl::StatusOr<nlohmann::json> ParseJsonStrict(std::string_view text);

// Reads the whole file at `path`. NotFound when it does not exist; InvalidArgument when it is
// not a regular file or is larger than `max_bytes`; other errors from errno.
absl::StatusOr<std::string> ReadFileToString(const std::string& path, uint64_t max_bytes);

// "null", "boolean", "integer", "number", "string", "array" or "object".
const char* JsonTypeName(const nlohmann::json& value);

// Compact JSON text of `value` for error messages, cut to about 60 characters.
std::string JsonForMessage(const nlohmann::json& value);

}  // namespace mq::model
