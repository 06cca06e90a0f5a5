#include "common/random_secret.h"

#include <openssl/rand.h>

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace mq {

absl::StatusOr<std::string> RandomHexSecret(size_t bytes) {
  if (bytes < 1 || bytes > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("bytes = ", bytes, ": must be 1..1024"));
  }
  std::vector<unsigned char> buf(bytes);
  if (RAND_bytes(buf.data(), static_cast<int>(buf.size())) != 1) {
    return absl::InternalError("RAND_bytes failed: the random generator is not seeded");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * bytes);
  for (unsigned char c : buf) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

}  // namespace mq
