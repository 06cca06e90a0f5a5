// The one mapping between absl::Status (used everywhere inside mq) and grpc::Status.
// Pure functions; safe from any thread.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace mq {

// Same code, same message. Codes absl has and gRPC lacks cannot occur (they share a table).
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace mq
