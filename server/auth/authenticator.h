// Who is calling, and may they: the coordinator's authentication and authorization, consulted
// by the gRPC adapters (server/grpc_services.cc) before any handler runs.
//
// Authentication: a bearer token (metadata "authorization: Bearer TOKEN") found in the tokens
// file gives its principal and role; without a token, a client certificate verified against
// the coordinator's --tls-ca makes the caller the worker principal "x509:IDENTITY" (the
// certificate's SAN, else its CN). Anything else is UNAUTHENTICATED. A coordinator started
// with --insecure authenticates nobody: every caller is Caller::Anonymous().
//
// Authorization by role: viewer reads (jobs, events, workers); submitter also submits,
// inspects, and cancels or resumes its own jobs; admin any job; worker only the worker API.
//
// Threading: immutable after construction; Authenticate may run on many threads at once.
#pragma once

#include <grpcpp/grpcpp.h>

#include <optional>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/auth/tokens.h"

namespace mq::server {

// What an RPC needs of its caller.
enum class Need {
  kView,    // GetJob, ListJobs, WatchJob, ListWorkers
  kSubmit,  // SubmitJob, InspectModel, CancelJob, ResumeJob (ownership checked by the handler)
  kWork,    // the WorkerService
};

class Authenticator {
 public:
  // No authentication: every caller is Caller::Anonymous() (mq-coordinator --insecure).
  Authenticator() = default;
  explicit Authenticator(TokenTable tokens) : tokens_(std::move(tokens)) {}

  bool enabled() const { return tokens_.has_value(); }

  // The caller of this RPC, or UNAUTHENTICATED saying what credential was missing or wrong
  // (never echoing it).
  absl::StatusOr<Caller> Authenticate(const grpc::ServerContextBase& ctx) const;

 private:
  std::optional<TokenTable> tokens_;
};

// OK when `caller` may call `method`, which needs `need`; else PERMISSION_DENIED naming the
// principal, its role, the method and the roles that may.
absl::Status Authorize(const Caller& caller, Need need, absl::string_view method);

// For handlers that act on one job: OK when the caller owns it or is an admin.
absl::Status AuthorizeOwner(const Caller& caller, absl::string_view owner, absl::string_view job_id,
                            absl::string_view action);

}  // namespace mq::server
