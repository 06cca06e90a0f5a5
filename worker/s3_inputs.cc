#include "worker/s3_inputs.h"

#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/s3/s3_client.h"
#include "common/s3/s3_config.h"
#include "common/sha256.h"
#include "common/util.h"
#include "nlohmann/json.hpp"
#include "worker/storage/s3_output.h"
#include "worker/storage/s3_stage.h"

namespace mq::worker {
namespace {

// A stable local name per URI: repeated stagings of one URI replace the same folder.
std::string LocalName(const std::string& uri) { return Sha256Hex(uri).substr(0, 16); }

std::string BaseName(const std::string& uri) {
  const size_t slash = uri.rfind('/');
  return slash == std::string::npos ? uri : uri.substr(slash + 1);
}

absl::StatusOr<std::unique_ptr<s3::S3Client>> ClientFromEnv() {
  absl::StatusOr<s3::S3Config> config = s3::S3ConfigFromEnv(s3::ProcessEnv());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat("the job uses s3:// but this worker's S3 settings are "
                                     "unusable: ",
                                     config.status().message()));
  }
  config->on_retry = [](const std::string& why) { LogLine("worker", "WARN", "s3: " + why); };
  return std::make_unique<s3::S3Client>(*std::move(config));
}

}  // namespace

bool HasS3Inputs(const mq::v1::Assignment& a) {
  const mq::v1::JobSpec& s = a.spec();
  for (const std::string* uri :
       {&s.model_uri(), &s.output_uri(), &s.calibration().dataset_uri(),
        &s.calibration().tokenizer_uri(), &s.eval().dataset_uri(), &s.eval().candidate_uri()}) {
    if (s3::IsS3Uri(*uri)) return true;
  }
  return false;
}

bool HasS3Output(const mq::v1::Assignment& a) { return s3::IsS3Uri(a.spec().output_uri()); }

absl::Status PrepareS3Output(const S3Output& output, const mq::v1::Assignment& a) {
  if (output.uri.empty()) return absl::OkStatus();
  absl::StatusOr<std::unique_ptr<s3::S3Client>> client = ClientFromEnv();
  if (!client.ok()) return client.status();
  std::vector<std::string> names;
  if (a.kind() == mq::v1::ASSIGNMENT_KIND_QUANTIZE ||
      a.kind() == mq::v1::ASSIGNMENT_KIND_FINALIZE) {
    absl::StatusOr<int> aborted = storage::AbortS3Uploads(**client, output.uri);
    if (!aborted.ok()) return aborted.status();
    if (*aborted > 0) {
      LogLine("worker", "INFO",
              absl::StrCat("aborted ", *aborted, " incomplete uploads under ", output.uri,
                           " (left by an earlier attempt)"));
    }
    for (const mq::v1::OutputFile& f : a.committed_files()) names.push_back(f.name());
  } else if (a.kind() == mq::v1::ASSIGNMENT_KIND_EVALUATE) {
    // The finished output: its manifest, then what it lists.
    if (absl::Status s =
            storage::FetchOutputFiles(**client, output.uri, output.mirror, {"manifest.json"});
        !s.ok()) {
      return s;
    }
    std::ifstream in(output.mirror + "/manifest.json");
    std::stringstream text;
    text << in.rdbuf();
    nlohmann::json manifest = nlohmann::json::parse(text.str(), nullptr, false);
    if (!manifest.is_object() || !manifest.contains("files") || !manifest["files"].is_array()) {
      return absl::DataLossError(absl::StrCat(output.uri, "/manifest.json: malformed"));
    }
    for (const nlohmann::json& f : manifest["files"]) names.push_back(f.value("name", ""));
  }
  return storage::FetchOutputFiles(**client, output.uri, output.mirror, names);
}

absl::Status ClaimS3OutputPrefix(const S3Output& output) {
  if (output.uri.empty()) return absl::OkStatus();
  absl::StatusOr<std::unique_ptr<s3::S3Client>> client = ClientFromEnv();
  if (!client.ok()) return client.status();
  return storage::ClaimS3Output(**client, output.uri, output.job_id);
}

absl::Status UploadS3Files(const S3Output& output,
                           const std::vector<std::pair<std::string, std::string>>& name_sha256) {
  if (output.uri.empty()) return absl::OkStatus();
  absl::StatusOr<std::unique_ptr<s3::S3Client>> client = ClientFromEnv();
  if (!client.ok()) return client.status();
  for (const auto& [name, sha] : name_sha256) {
    absl::StatusOr<std::string> up = storage::UploadOutputFile(
        **client, output.uri, output.mirror, name, sha, storage::OutputPartBytesFromEnv());
    if (!up.ok()) return up.status();
  }
  return absl::OkStatus();
}

absl::Status PublishS3Output(const S3Output& output) {
  if (output.uri.empty()) return absl::OkStatus();
  absl::StatusOr<std::unique_ptr<s3::S3Client>> client = ClientFromEnv();
  if (!client.ok()) return client.status();
  return storage::PublishS3Output(**client, output.uri, output.mirror, output.job_id,
                                  storage::OutputPartBytesFromEnv());
}

absl::Status StageS3Inputs(const std::string& stage_root, const mq::v1::Assignment& a,
                           mq::v1::Assignment* staged, S3Output* output) {
  *staged = a;
  *output = S3Output();
  absl::StatusOr<std::unique_ptr<s3::S3Client>> owned = ClientFromEnv();
  if (!owned.ok()) return owned.status();
  s3::S3Client& client = **owned;
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
  for (File f :
       {File{"spec.calibration.dataset_uri", spec->mutable_calibration()->mutable_dataset_uri()},
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
  if (s3::IsS3Uri(spec->output_uri()) && !a.job_id().empty()) {
    const std::string uri = spec->output_uri();
    const bool plan = a.kind() == mq::v1::ASSIGNMENT_KIND_PLAN;
    if (absl::Status s = storage::ClaimS3Output(client, uri, a.job_id(), /*check_only=*/plan);
        !s.ok()) {
      return s;
    }
    output->uri = uri;
    output->mirror = absl::StrCat(stage_root, "/out-", LocalName(uri));
    output->job_id = a.job_id();
    if (absl::Status s = storage::PrepareMirror(output->mirror, a.job_id()); !s.ok()) return s;
    spec->set_output_uri(output->mirror);
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  LogLine("worker", "INFO",
          absl::StrCat("s3 inputs of assignment ", a.assignment_id(), " staged in ", secs, " s"));
  return absl::OkStatus();
}

}  // namespace mq::worker
