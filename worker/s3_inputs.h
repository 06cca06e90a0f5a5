// The worker's s3:// inputs: an assignment whose model, datasets, tokenizer or candidate live in
// an S3 store gets them staged into local folders (worker/storage/s3_stage.h: small files
// copied, shards as header stubs whose tensors CheckpointReader fetches on load), and its spec
// rewritten to name the local copies, so the engine runs unchanged.
//
// The RPC layer's side (includes protobuf, never torch). Threading: one assignment at a time
// (the worker's loop); the staging folders are the worker's own, replaced at each staging.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "mq/v1/worker_service.pb.h"

namespace mq::worker {

// True when any input location of `a` is an s3:// URI.
bool HasS3Inputs(const mq::v1::Assignment& a);

// An assignment's s3:// output: the URI the job named and the local mirror folder the engine
// writes into (worker/storage/s3_output.h moves files between them). Empty uri: a local output.
struct S3Output {
  std::string uri;
  std::string mirror;
  std::string job_id;
};

// True when `a`'s output is an s3:// URI.
bool HasS3Output(const mq::v1::Assignment& a);

// Stages every s3:// input of `a` under `stage_root` (created) and sets `staged` to `a` with those
// locations replaced by the local paths. An s3:// output is claimed for the job (the marker
// object) and replaced by a mirror folder under `stage_root`, described in `output`. The S3 client
// is configured from the environment (MQ_S3_ENDPOINT, AWS_REGION, credentials:
// common/s3/s3_config.h). An error names the spec field and the URI (e.g. `spec.model_uri =
// "s3://m/ds3": no objects under this prefix ...`) or the configuration problem (missing
// credentials); `staged` is then unspecified.
absl::Status StageS3Inputs(const std::string& stage_root, const mq::v1::Assignment& a,
                           mq::v1::Assignment* staged, S3Output* output);

// Claims the output prefix for the job (its marker object). StageS3Inputs claims it for every
// assignment but PLAN, where it only checks it: a plan claims it once it found no problems.
absl::Status ClaimS3OutputPrefix(const S3Output& output);

// Before an assignment writing or reading an s3:// output runs: aborts the incomplete multipart
// uploads a killed attempt left (QUANTIZE, FINALIZE), and fetches into the mirror the committed
// files (QUANTIZE, FINALIZE) or the finished output (EVALUATE) it lacks.
absl::Status PrepareS3Output(const S3Output& output, const mq::v1::Assignment& a);

// Uploads a layer's files from the mirror (each checked against its recorded SHA-256), before
// the layer is reported.
absl::Status UploadS3Files(const S3Output& output,
                           const std::vector<std::pair<std::string, std::string>>& name_sha256);

// After FINALIZE or EVALUATE succeeded: every manifest-listed file the store lacks, then the
// manifest; stray layer files of the job and incomplete uploads removed (s3_output.h).
absl::Status PublishS3Output(const S3Output& output);

}  // namespace mq::worker
