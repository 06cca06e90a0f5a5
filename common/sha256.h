// SHA-256 of bytes and of files (OpenSSL EVP), shared by the worker's output code and mq-client
// (`verify`), neither of which may pull the other's dependencies in. No torch here.
//
// Threading: free functions are thread-safe; one Sha256 object is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace mq {

// Lowercase hex SHA-256 of `data`.
std::string Sha256Hex(std::string_view data);

// Lowercase hex SHA-256 of the file's content. NOT_FOUND naming the path when it does not
// exist; an errno-derived status naming the path for other I/O errors.
absl::StatusOr<std::string> Sha256OfFile(const std::string& path);
// Same, of an open file read from its current offset to the end; `path` only names it in errors.
absl::StatusOr<std::string> Sha256OfOpenFile(int fd, const std::string& path);
// Same, of `size` bytes from `offset` (pread: the file offset is not moved, so several threads
// may hash ranges of one open file at once). OUT_OF_RANGE naming the path when the file ends
// before offset + size.
absl::StatusOr<std::string> Sha256OfFileRange(int fd, uint64_t offset, uint64_t size,
                                              const std::string& path);

// An incremental SHA-256: Update any number of times, then HexDigest once.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(const void* data, size_t size);
  void Update(std::string_view data) { Update(data.data(), data.size()); }
  // Lowercase hex digest of everything passed to Update; call once.
  std::string HexDigest();

 private:
  void* ctx_;  // EVP_MD_CTX*
};

}  // namespace mq
