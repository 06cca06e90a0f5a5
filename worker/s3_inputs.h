// The worker's s3:// inputs: an assignment whose model, datasets, tokenizer or candidate live in
// an S3 store gets them staged into local folders (worker/storage/s3_stage.h: small files
// copied, shards as header stubs whose tensors CheckpointReader fetches on load), and its spec
// rewritten to name the local copies, so the engine runs unchanged.
//
// The RPC layer's side (includes protobuf, never torch). Threading: one assignment at a time
// (the worker's loop); the staging folders are the worker's own, replaced at each staging.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "mq/v1/worker_service.pb.h"

namespace mq::worker {

// True when any input location of `a` is an s3:// URI.
bool HasS3Inputs(const mq::v1::Assignment& a);

// Stages every s3:// input of `a` under `stage_root` (created) and sets `staged` to `a` with those
// locations replaced by the local paths. The S3 client is configured from the environment
// (MQ_S3_ENDPOINT, AWS_REGION, credentials: common/s3/s3_config.h). An error names the spec field
// and the URI (e.g. `spec.model_uri = "s3://m/ds3": no objects under this prefix ...`) or the
// configuration problem (missing credentials); `staged` is then unspecified.
absl::Status StageS3Inputs(const std::string& stage_root, const mq::v1::Assignment& a,
                           mq::v1::Assignment* staged);

}  // namespace mq::worker
