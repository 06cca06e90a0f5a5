#include "worker/s3_inputs.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/s3/s3_client.h"
#include "common/s3/s3_config.h"
#include "common/sha256.h"
#include "common/util.h"
#include "worker/storage/s3_stage.h"

namespace mq::worker {
namespace {

// A stable local name per URI: repeated stagings of one URI replace the same folder.
std::string LocalName(const std::string& uri) { return Sha256Hex(uri).substr(0, 16); }

std::string BaseName(const std::string& uri) {
  const size_t slash = uri.rfind('/');
  return slash == std::string::npos ? uri : uri.substr(slash + 1);
}

}  // namespace

bool HasS3Inputs(const mq::v1::Assignment& a) {
  const mq::v1::JobSpec& s = a.spec();
  for (const std::string* uri :
       {&s.model_uri(), &s.calibration().dataset_uri(), &s.calibration().tokenizer_uri(),
        &s.eval().dataset_uri(), &s.eval().candidate_uri()}) {
    if (s3::IsS3Uri(*uri)) return true;
  }
  return false;
}

absl::Status StageS3Inputs(const std::string& stage_root, const mq::v1::Assignment& a,
                           mq::v1::Assignment* staged) {
  *staged = a;
  absl::StatusOr<s3::S3Config> config = s3::S3ConfigFromEnv(s3::ProcessEnv());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat("the job reads from s3:// but this worker's S3 settings are "
                                     "unusable: ",
                                     config.status().message()));
  }
  config->on_retry = [](const std::string& why) { LogLine("worker", "WARN", "s3: " + why); };
  s3::S3Client client(*std::move(config));
  mq::v1::JobSpec* spec = staged->mutable_spec();
  const auto start = std::chrono::steady_clock::now();
  struct Dir {
    const char* field;
    std::string* uri;
  };
  for (Dir d : {Dir{"spec.model_uri", spec->mutable_model_uri()},
                Dir{"spec.eval.candidate_uri", spec->mutable_eval()->mutable_candidate_uri()}}) {
    if (!s3::IsS3Uri(*d.uri)) continue;
    const std::string local = absl::StrCat(stage_root, "/", LocalName(*d.uri));
    absl::StatusOr<storage::StageResult> r =
        storage::StageRemoteCheckpoint(client, d.field, *d.uri, local);
    if (!r.ok()) return r.status();
    LogLine("worker", "INFO",
            absl::StrCat("staged ", *d.uri, " into ", local, ": ", r->copied_files, " files (",
                         r->copied_bytes, " bytes) copied, ", r->shard_stubs, " shards (",
                         r->remote_bytes, " bytes) read from the store on load"));
    *d.uri = local;
  }
  struct File {
    const char* field;
    std::string* uri;
  };
  for (File f : {File{"spec.calibration.dataset_uri",
                      spec->mutable_calibration()->mutable_dataset_uri()},
                 File{"spec.calibration.tokenizer_uri",
                      spec->mutable_calibration()->mutable_tokenizer_uri()},
                 File{"spec.eval.dataset_uri", spec->mutable_eval()->mutable_dataset_uri()}}) {
    if (!s3::IsS3Uri(*f.uri)) continue;
    const std::string local =
        absl::StrCat(stage_root, "/", LocalName(*f.uri), "-", BaseName(*f.uri));
    if (absl::Status s = storage::StageRemoteFile(client, f.field, *f.uri, local); !s.ok()) {
      return s;
    }
    *f.uri = local;
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  LogLine("worker", "INFO",
          absl::StrCat("s3 inputs of assignment ", a.assignment_id(), " staged in ", secs, " s"));
  return absl::OkStatus();
}

}  // namespace mq::worker
