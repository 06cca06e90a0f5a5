#include "server/auth/tokens.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/random_secret.h"
#include "common/sha256.h"

namespace mq::server {
namespace {

constexpr absl::string_view kHashPrefix = "sha256:";
// Tokens are 256 random bits: a plain SHA-256 of them cannot be searched, so no slow hash.
constexpr size_t kTokenBytes = 32;
constexpr size_t kMaxFileBytes = 4 << 20;

bool IsLowerHex(absl::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace

const char* RoleName(Role role) {
  switch (role) {
    case Role::kViewer:
      return "viewer";
    case Role::kSubmitter:
      return "submitter";
    case Role::kAdmin:
      return "admin";
    case Role::kWorker:
      return "worker";
  }
  return "unknown";
}

absl::StatusOr<Role> ParseRole(absl::string_view name) {
  for (Role r : {Role::kViewer, Role::kSubmitter, Role::kAdmin, Role::kWorker}) {
    if (name == RoleName(r)) return r;
  }
  return absl::InvalidArgumentError(absl::StrCat("role \"", absl::CHexEscape(name.substr(0, 32)),
                                                 "\": must be viewer, submitter, admin or worker"));
}

absl::Status ValidatePrincipal(absl::string_view principal) {
  if (principal.empty() || principal.size() > 64) {
    return absl::InvalidArgumentError("principal: must be 1..64 characters of [A-Za-z0-9._@-]");
  }
  for (char c : principal) {
    if (!(absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-' ||
          c == '@')) {
      return absl::InvalidArgumentError("principal: must be 1..64 characters of [A-Za-z0-9._@-]");
    }
  }
  if (principal == "anonymous" || principal == Caller::kCoordinator ||
      principal.rfind("x509:", 0) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "principal \"", principal, "\": reserved (anonymous, mq-coordinator and x509:*)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<TokenTable> TokenTable::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("tokens file ", path, ": cannot open (", std::strerror(errno), ")"));
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string text = buffer.str();
  if (text.size() > kMaxFileBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokens file ", path, ": larger than ", kMaxFileBytes, " bytes"));
  }
  TokenTable table;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    const std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    auto where = [&] { return absl::StrCat("tokens file ", path, " line ", line_no, ": "); };
    if (fields.size() != 3) {
      return absl::InvalidArgumentError(absl::StrCat(
          where(), "expected 3 fields (PRINCIPAL ROLE sha256:HEX), found ", fields.size()));
    }
    if (absl::Status s = ValidatePrincipal(fields[0]); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(where(), s.message()));
    }
    auto role = ParseRole(fields[1]);
    if (!role.ok())
      return absl::InvalidArgumentError(absl::StrCat(where(), role.status().message()));
    absl::string_view hash = fields[2];
    if (hash.substr(0, kHashPrefix.size()) != kHashPrefix ||
        hash.size() != kHashPrefix.size() + 64 || !IsLowerHex(hash.substr(kHashPrefix.size()))) {
      return absl::InvalidArgumentError(
          absl::StrCat(where(),
                       "third field must be sha256: and 64 lowercase hex digits (the hash of a "
                       "token, never the token itself; mq-coordinator add-token writes it)"));
    }
    const std::string key(hash.substr(kHashPrefix.size()));
    if (table.by_hash_.count(key)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where(), "the same token hash appears on an earlier line"));
    }
    table.by_hash_[key] = Entry{std::string(fields[0]), *role};
  }
  return table;
}

const TokenTable::Entry* TokenTable::Find(absl::string_view token) const {
  auto it = by_hash_.find(Sha256Hex(std::string(token)));
  return it == by_hash_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::string> AddToken(const std::string& path, absl::string_view principal,
                                     Role role) {
  if (absl::Status s = ValidatePrincipal(principal); !s.ok()) return s;
  if (::access(path.c_str(), F_OK) == 0) {
    if (auto existing = TokenTable::Load(path); !existing.ok()) return existing.status();
  }
  auto secret = RandomHexSecret(kTokenBytes);
  if (!secret.ok()) return secret.status();
  const std::string token = absl::StrCat("mqt_", *secret);
  const std::string line =
      absl::StrCat(principal, " ", RoleName(role), " ", kHashPrefix, Sha256Hex(token), "\n");
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("open ", path, ": ", std::strerror(errno)));
  }
  const ssize_t n = ::write(fd, line.data(), line.size());
  const bool ok = n == static_cast<ssize_t>(line.size()) && ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) return absl::InternalError(absl::StrCat("write ", path, ": ", std::strerror(err)));
  return token;
}

}  // namespace mq::server
