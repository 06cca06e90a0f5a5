// Principals, roles and the coordinator's tokens file.
//
// The tokens file (mq-coordinator --tokens-file) holds one bearer token per line, hashed:
//
//   # comment
//   PRINCIPAL ROLE sha256:HEX
//
// PRINCIPAL is 1..64 characters of [A-Za-z0-9._@-]; ROLE is viewer, submitter, admin or worker;
// HEX is the SHA-256 of the token. The file never holds a token itself, and errors about it
// name the line and what is wrong with it, never its content. `mq-coordinator add-token`
// appends a line and prints the new token once.
//
// Threading: a TokenTable is immutable after Load and safe to share between threads.
#pragma once

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mq::server {

// What a principal may do. viewer < submitter < admin for jobs; worker only runs work.
enum class Role { kViewer, kSubmitter, kAdmin, kWorker };

const char* RoleName(Role role);
absl::StatusOr<Role> ParseRole(absl::string_view name);

// Who is calling. On a coordinator started with --insecure every caller is "anonymous" with
// `insecure` set, which every check allows (the flag's documented meaning).
struct Caller {
  std::string principal;
  Role role = Role::kViewer;
  bool insecure = false;
  // The worker session secret the call carried (metadata "mq-worker-session"), if any.
  std::string worker_session;

  static Caller Anonymous() { return Caller{"anonymous", Role::kAdmin, true, ""}; }
  // Events the coordinator causes itself (leases, scheduling).
  static constexpr const char* kCoordinator = "mq-coordinator";
};

// "PRINCIPAL" check shared by the tokens file and add-token.
absl::Status ValidatePrincipal(absl::string_view principal);

class TokenTable {
 public:
  struct Entry {
    std::string principal;
    Role role;
  };

  // Reads and checks the whole file. Errors name the path and line number.
  static absl::StatusOr<TokenTable> Load(const std::string& path);

  // The entry whose hash matches SHA-256(token), or nullptr.
  const Entry* Find(absl::string_view token) const;
  size_t size() const { return by_hash_.size(); }

 private:
  std::map<std::string, Entry> by_hash_;  // hex SHA-256 -> entry
};

// Makes a new random token for (principal, role), appends its hashed line to `path` (created
// with mode 0600 if absent; fsynced) and returns the token. The file is re-read first, so a
// malformed file is refused rather than appended to.
absl::StatusOr<std::string> AddToken(const std::string& path, absl::string_view principal,
                                     Role role);

}  // namespace mq::server
