// How mq-client and mq-worker reach the coordinator: TLS (verifying the coordinator against a
// CA), an optional client certificate (mTLS) and an optional bearer token, or plaintext only
// when asked for explicitly. No torch here.
//
// Threading: free functions; safe from any thread.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace mq {

struct ChannelSecurity {
  // Plaintext and no token (--insecure): only for a coordinator started with --insecure.
  bool insecure = false;
  // CA (PEM) that signed the coordinator's certificate; empty = the system's roots.
  std::string ca_file;
  // Client certificate chain and key (PEM) for mTLS; both or neither.
  std::string cert_file;
  std::string key_file;
  // The name the coordinator's certificate must carry, when it differs from the address.
  std::string server_name;
  // Bearer token sent on every call; empty = none.
  std::string token;
};

// Reads a PEM file (certificate or key) of at most 1 MiB. Errors name `flag` and the path.
absl::StatusOr<std::string> ReadPemFile(const std::string& flag, const std::string& path);

// Reads a token file: its first line, surrounding blanks removed. Errors name `flag` and the
// path, never the content.
absl::StatusOr<std::string> ReadTokenFile(const std::string& flag, const std::string& path);

// A channel to `address` with `security` and `args`. Errors (unreadable or non-PEM files,
// cert without key) name the flag.
absl::StatusOr<std::shared_ptr<grpc::Channel>> SecureChannel(const std::string& address,
                                                             const ChannelSecurity& security,
                                                             grpc::ChannelArguments args);

}  // namespace mq
