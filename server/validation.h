// Request validation for the coordinator's APIs. Every error is INVALID_ARGUMENT and names
// the field, the value given and what is allowed, e.g.
//   spec.group_size = 96: must be 32, 64, 128 or -1 (per channel)
// Pure functions; safe from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "mq/v1/job_service.pb.h"
#include "mq/v1/worker_service.pb.h"

namespace mq::server {

// Checks a submitted spec and returns it with every unset field set to its default (spec.awq
// only for methods awq and awq-gptq; it must be unset for the others).
absl::StatusOr<mq::v1::JobSpec> NormalizeJobSpec(const mq::v1::JobSpec& spec);

// A location field (model, output, dataset): an absolute path or file:// URI.
absl::Status ValidateLocation(const std::string& field, const std::string& value, bool required);

// "j-" + 26 Crockford base32 characters.
absl::Status ValidateJobId(const std::string& field, const std::string& value);
absl::Status ValidateIdempotencyKey(const std::string& value);
absl::Status ValidateWorkerName(const std::string& value);
absl::Status ValidateInspectRequest(const mq::v1::InspectModelRequest& request);

// The parts of a ReportLayer request checkable without state: step >= 0, rank >= 0, every
// file (name 1..255 characters, no '/', NUL or line break, not "." or ".."; sha256 64 lowercase
// hex; size_bytes >= 0), stats numbers finite and >= 0, at most 64 AWQ mappings (smooth at most
// 512 characters, counts >= 0, identity_chosen <= mappings, routing_changed_tokens <=
// routing_tokens, alpha in [0, 1], losses finite and >= 0).
absl::Status ValidateReportLayer(const mq::v1::ReportLayerRequest& request);
// One output file, fields named under `field` (e.g. "files[2]").
absl::Status ValidateOutputFile(const std::string& field, const mq::v1::OutputFile& file);
// A FINALIZE result: manifest_sha256 64 lowercase hex, counts >= 0.
absl::Status ValidateFinalizeResult(const mq::v1::FinalizeResult& result);
// An EVALUATE assignment's result: numbers >= 0 (perplexities may be infinite), bounded strings
// and layer count, a manifest hash exactly when the job writes an output (`writes_output`).
absl::Status ValidateEvaluateResult(const mq::v1::EvaluateResult& result, bool writes_output);

// The path part of a validated location ("file:///a/b" -> "/a/b").
std::string LocationPath(const std::string& value);

// A validated location as a lexically normal absolute path: no file:// prefix, no empty, "."
// or ".." components, no trailing '/' ("file:///x//a/./b/../c/" -> "/x/a/c"). Symlinks are not
// resolved.
std::string NormalLocationPath(const std::string& value);

// How two normal paths (NormalLocationPath) relate, component by component: "/x/out2" is not
// inside "/x/out".
enum class PathOverlap { kNone, kSame, kInside, kContains };
// kInside: `path` lies inside `other`; kContains: `other` lies inside `path`.
PathOverlap ComparePaths(const std::string& path, const std::string& other);

// The path policy of mq-coordinator --allow-read / --allow-write: each root absolute (or
// file://) and lexically normalised; enforced when either flag was given. INVALID_ARGUMENT
// naming the flag for an empty or relative root.
absl::StatusOr<mq::v1::PathPolicy> MakePathPolicy(const std::vector<std::string>& read_roots,
                                                  const std::vector<std::string>& write_roots);
// A job's locations against `policy` (lexically; workers check again after resolving
// symlinks): spec.model_uri, spec.calibration.dataset_uri and tokenizer_uri inside the read
// roots, spec.output_uri inside the write roots. PERMISSION_DENIED naming the field, the path,
// the allowed roots and the flag that sets them.
absl::Status CheckJobPaths(const mq::v1::JobSpec& spec, const mq::v1::PathPolicy& policy);
// InspectModel's model_uri inside the read roots; as CheckJobPaths.
absl::Status CheckInspectPaths(const mq::v1::InspectModelRequest& request,
                               const mq::v1::PathPolicy& policy);

// How many ended jobs a coordinator keeps in memory (--retain-ended-jobs): a count ("1000")
// or a duration ("3600s", "30m", "24h", "7d").
struct EndedJobRetention {
  int64_t jobs = 1000;  // the newest this many ended jobs (when ms == 0)
  int64_t ms = 0;       // > 0: the jobs that ended within this many milliseconds
};
// INVALID_ARGUMENT naming the flag, the value and what is allowed.
absl::StatusOr<EndedJobRetention> ParseEndedJobRetention(const std::string& value);

}  // namespace mq::server
