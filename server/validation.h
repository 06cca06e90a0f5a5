// Request validation for the coordinator's APIs. Every error is INVALID_ARGUMENT and names
// the field, the value given and what is allowed, e.g.
//   spec.group_size = 96: must be 32, 64, 128 or -1 (per channel)
// Pure functions; safe from any thread.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "mq/v1/job_service.pb.h"
#include "mq/v1/worker_service.pb.h"

namespace mq::server {

// Checks a submitted spec and returns it with every unset field set to its default.
absl::StatusOr<mq::v1::JobSpec> NormalizeJobSpec(const mq::v1::JobSpec& spec);

// A location field (model, output, dataset): an absolute path or file:// URI.
absl::Status ValidateLocation(const std::string& field, const std::string& value, bool required);

// "j-" + 26 Crockford base32 characters.
absl::Status ValidateJobId(const std::string& field, const std::string& value);
absl::Status ValidateIdempotencyKey(const std::string& value);
absl::Status ValidateWorkerName(const std::string& value);
absl::Status ValidateInspectRequest(const mq::v1::InspectModelRequest& request);

// The path part of a validated location ("file:///a/b" -> "/a/b").
std::string LocationPath(const std::string& value);

}  // namespace mq::server
