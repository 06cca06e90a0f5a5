#include "server/auth/authenticator.h"

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace mq::server {
namespace {

constexpr absl::string_view kBearer = "Bearer ";
constexpr const char* kSessionKey = "mq-worker-session";

absl::string_view Metadata(const grpc::ServerContextBase& ctx, const char* key, int* count) {
  auto range = ctx.client_metadata().equal_range(key);
  *count = 0;
  absl::string_view value;
  for (auto it = range.first; it != range.second; ++it) {
    ++*count;
    value = absl::string_view(it->second.data(), it->second.size());
  }
  return value;
}

}  // namespace

absl::StatusOr<Caller> Authenticator::Authenticate(const grpc::ServerContextBase& ctx) const {
  Caller caller = tokens_ ? Caller{} : Caller::Anonymous();
  int sessions = 0;
  caller.worker_session = std::string(Metadata(ctx, kSessionKey, &sessions));
  if (sessions > 1) {
    return absl::UnauthenticatedError("metadata mq-worker-session: given more than once");
  }
  if (!tokens_) return caller;

  int tokens = 0;
  const absl::string_view authorization = Metadata(ctx, "authorization", &tokens);
  if (tokens > 1) return absl::UnauthenticatedError("metadata authorization: given more than once");
  if (tokens == 1) {
    if (!absl::StartsWith(authorization, kBearer) || authorization.size() == kBearer.size()) {
      return absl::UnauthenticatedError(
          "metadata authorization: expected \"Bearer TOKEN\" (mq-client --token-file or "
          "MQ_TOKEN)");
    }
    const TokenTable::Entry* entry = tokens_->Find(authorization.substr(kBearer.size()));
    if (!entry) {
      return absl::UnauthenticatedError(
          "the bearer token is not in the coordinator's tokens file (revoked, mistyped, or made "
          "for another coordinator)");
    }
    caller.principal = entry->principal;
    caller.role = entry->role;
    return caller;
  }
  const std::shared_ptr<const grpc::AuthContext> auth = ctx.auth_context();
  if (auth && auth->IsPeerAuthenticated()) {
    const std::vector<grpc::string_ref> identity = auth->GetPeerIdentity();
    if (!identity.empty()) {
      caller.principal = absl::StrCat(
          "x509:", absl::string_view(identity.front().data(), identity.front().size()));
      caller.role = Role::kWorker;
      return caller;
    }
  }
  return absl::UnauthenticatedError(
      "no credentials: this coordinator needs a bearer token (mq-client --token-file FILE or "
      "MQ_TOKEN) or, for workers, a client certificate signed by its --tls-ca");
}

absl::Status Authorize(const Caller& caller, Need need, absl::string_view method) {
  if (caller.insecure) return absl::OkStatus();
  bool ok = false;
  const char* allowed = "";
  switch (need) {
    case Need::kView:
      ok = caller.role == Role::kViewer || caller.role == Role::kSubmitter ||
           caller.role == Role::kAdmin;
      allowed = "viewer, submitter or admin";
      break;
    case Need::kSubmit:
      ok = caller.role == Role::kSubmitter || caller.role == Role::kAdmin;
      allowed = "submitter or admin";
      break;
    case Need::kWork:
      ok = caller.role == Role::kWorker;
      allowed = "worker (a worker token or client certificate)";
      break;
  }
  if (ok) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat("principal \"", caller.principal, "\" (role ",
                                                  RoleName(caller.role), ") may not call ", method,
                                                  ": it needs role ", allowed));
}

absl::Status AuthorizeOwner(const Caller& caller, absl::string_view owner, absl::string_view job_id,
                            absl::string_view action) {
  if (caller.insecure || caller.role == Role::kAdmin || caller.principal == owner) {
    return absl::OkStatus();
  }
  return absl::PermissionDeniedError(absl::StrCat(
      "job ", job_id, " belongs to \"", owner.empty() ? "(nobody)" : owner, "\": principal \"",
      caller.principal, "\" may not ", action, " it (only its owner or an admin)"));
}

}  // namespace mq::server
