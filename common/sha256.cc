#include "common/sha256.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace mq {
namespace {

std::string Hex(const unsigned char* d, unsigned n) {
  static const char* kDigits = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (unsigned i = 0; i < n; ++i) {
    out[2 * i] = kDigits[d[i] >> 4];
    out[2 * i + 1] = kDigits[d[i] & 15];
  }
  return out;
}

}  // namespace

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(ctx_), EVP_sha256(), nullptr);
}

Sha256::~Sha256() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_)); }

void Sha256::Update(const void* data, size_t size) {
  EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), data, size);
}

std::string Sha256::HexDigest() {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx_), md, &n);
  return Hex(md, n);
}

std::string Sha256Hex(std::string_view data) {
  Sha256 h;
  h.Update(data);
  return h.HexDigest();
}

absl::StatusOr<std::string> Sha256OfFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InternalError(absl::StrCat("open ", path, ": ", std::strerror(errno)));
  }
  absl::StatusOr<std::string> sha = Sha256OfOpenFile(fd, path);
  ::close(fd);
  return sha;
}

absl::StatusOr<std::string> Sha256OfOpenFile(int fd, const std::string& path) {
  Sha256 h;
  std::vector<char> buf(1 << 22);
  while (true) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return absl::InternalError(absl::StrCat("read ", path, ": ", std::strerror(errno)));
    if (r == 0) break;
    h.Update(buf.data(), static_cast<size_t>(r));
  }
  return h.HexDigest();
}

absl::StatusOr<std::string> Sha256OfFileRange(int fd, uint64_t offset, uint64_t size,
                                              const std::string& path) {
  Sha256 h;
  std::vector<char> buf(std::min<uint64_t>(size, 1 << 22));
  for (uint64_t at = offset, end = offset + size; at < end;) {
    const ssize_t r =
        ::pread(fd, buf.data(), std::min<uint64_t>(buf.size(), end - at), static_cast<off_t>(at));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return absl::InternalError(absl::StrCat("read ", path, ": ", std::strerror(errno)));
    if (r == 0) {
      return absl::OutOfRangeError(
          absl::StrCat(path, " ends at byte ", at, ", before byte ", end, " of the range read"));
    }
    h.Update(buf.data(), static_cast<size_t>(r));
    at += static_cast<uint64_t>(r);
  }
  return h.HexDigest();
}

}  // namespace mq
