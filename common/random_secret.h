// Random secrets from the operating system's CSPRNG (OpenSSL RAND_bytes). No torch here.
//
// Threading: thread-safe (OpenSSL's generator is).
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"

namespace mq {

// `bytes` random bytes (1..1024) as lowercase hex (2 * bytes characters). INTERNAL when the
// generator fails (it is not seeded); INVALID_ARGUMENT for a size outside 1..1024.
absl::StatusOr<std::string> RandomHexSecret(size_t bytes);

}  // namespace mq
