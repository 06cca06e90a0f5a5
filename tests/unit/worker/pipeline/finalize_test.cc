// worker/pipeline/output FinalizeOutputDir on a generated checkpoint: the output directory is
// claimed and locked, committed files are verified before anything is written, the publish hook
// runs before the manifest and can stop it, and another job's output is never touched.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "worker/pipeline/output.h"

namespace mq::pipeline {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/mq-finalize-test-XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  EXPECT_NE(d, nullptr);
  return d;
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream b;
  b << in.rdbuf();
  return b.str();
}

// Name -> SHA-256 of every entry of `dir`.
std::map<std::string, std::string> Hashes(const std::string& dir) {
  std::map<std::string, std::string> out;
  bool exists = false;
  const std::vector<std::string> names = *ListDirectory(dir, &exists);
  for (const std::string& n : names) out[n] = *Sha256OfFile(dir + "/" + n);
  return out;
}

// A tiny FP8 DeepseekV3 checkpoint from mq-gen-model ($MQ_BUILD_DIR, set by ctest).
const std::string& Model() {
  static const std::string* dir = [] {
    const char* build = std::getenv("MQ_BUILD_DIR");
    auto* d = new std::string(TempDir() + "/model");
    const std::string cmd = std::string(build ? build : ".") +
                            "/tests/tools/mq-gen-model --output '" + *d +
                            "' --layers 1 --dense-layers 1 --hidden 128 --intermediate 192 "
                            "--heads 2 --vocab 256 > /dev/null";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << " (set MQ_BUILD_DIR)";
    return d;
  }();
  return *dir;
}

// An output directory claimed by `job` holding one committed layer file.
FinalizeOptions Prepared(const std::string& job, const std::string& out) {
  EXPECT_TRUE(ClaimOutputLocation(Model(), out, job).ok());
  std::vector<model::TensorData> t;
  t.push_back({"extra.test", model::DType::kU8, {64}, std::vector<uint8_t>(64, 9)});
  absl::StatusOr<OutputFileInfo> f =
      WriteDescribedSafetensors(out, "model-layer00000-rank000-of-001.safetensors", t);
  EXPECT_TRUE(f.ok()) << f.status();
  FinalizeOptions o;
  o.job_id = job;
  o.model_dir = Model();
  o.output_dir = out;
  o.committed_files = {*f};
  o.num_pipeline_layers = 0;  // every model tensor goes to the globals file
  return o;
}

TEST(FinalizeTest, PublishRunsBeforeTheManifestAndTheMarkerStays) {
  const std::string out = TempDir() + "/out";
  FinalizeOptions o = Prepared("j-one", out);
  // A stray of this job (an uncommitted step's file) is removed; the marker is not.
  std::ofstream(out + "/model-layer00007-rank000-of-001.safetensors") << "stale";
  int calls = 0;
  o.publish = [&]() -> absl::Status {
    ++calls;
    EXPECT_TRUE(Exists(out + "/model-globals.safetensors"));
    EXPECT_TRUE(Exists(out + "/config.json"));
    EXPECT_FALSE(Exists(out + "/manifest.json"));
    return absl::OkStatus();
  };
  absl::StatusOr<FinalizeOutput> r = FinalizeOutputDir(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(r->removed_files, 1);
  EXPECT_FALSE(Exists(out + "/model-layer00007-rank000-of-001.safetensors"));
  EXPECT_EQ(*OutputOwner(out), "j-one");
  const std::string manifest = Read(out + "/manifest.json");
  EXPECT_EQ(Sha256Hex(manifest), r->manifest_sha256);
  EXPECT_EQ(manifest.find(kOwnerMarkerName), std::string::npos) << manifest;
  EXPECT_NE(manifest.find("model-layer00000-rank000-of-001.safetensors"), std::string::npos);

  // Finished: another job pointed at it is refused, byte for byte untouched.
  const std::map<std::string, std::string> before = Hashes(out);
  FinalizeOptions other = o;
  other.job_id = "j-two";
  other.publish = nullptr;
  absl::StatusOr<FinalizeOutput> refused = FinalizeOutputDir(other);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("belongs to job j-one"), std::string::npos)
      << refused.status();
  EXPECT_EQ(ClaimOutputLocation(Model(), out, "j-two").code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Hashes(out), before);
  // The same job finalizing again gives the same manifest.
  o.publish = nullptr;
  absl::StatusOr<FinalizeOutput> again = FinalizeOutputDir(o);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->manifest_sha256, r->manifest_sha256);
}

TEST(FinalizeTest, RefusedPublishWritesNoManifest) {
  const std::string out = TempDir() + "/out";
  FinalizeOptions o = Prepared("j-one", out);
  o.publish = [] { return absl::AbortedError("job cancelled"); };
  absl::StatusOr<FinalizeOutput> r = FinalizeOutputDir(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(r.status().message(), "job cancelled");
  EXPECT_FALSE(Exists(out + "/manifest.json"));
}

TEST(FinalizeTest, DamagedCommittedFileStopsFinalizationBeforeAnyWrite) {
  const std::string out = TempDir() + "/out";
  FinalizeOptions o = Prepared("j-one", out);
  const std::string path = out + "/" + o.committed_files[0].name;
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('\x7f');
  }
  bool published = false;
  o.publish = [&] {
    published = true;
    return absl::OkStatus();
  };
  absl::StatusOr<FinalizeOutput> r = FinalizeOutputDir(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_EQ(CorruptFilesOf(r.status()), std::vector<std::string>{o.committed_files[0].name});
  EXPECT_FALSE(published);
  bool exists = false;
  EXPECT_EQ(*ListDirectory(out, &exists),
            (std::vector<std::string>{kOwnerMarkerName, o.committed_files[0].name}));
}

TEST(FinalizeTest, SecondFinalizerOnTheDirectoryFailsAtOnce) {
  const std::string out = TempDir() + "/out";
  FinalizeOptions o = Prepared("j-one", out);
  // Another finalizer (here: another open file description) holds the marker's lock.
  const int fd = ::open((out + "/" + kOwnerMarkerName).c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  absl::StatusOr<FinalizeOutput> r = FinalizeOutputDir(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_NE(r.status().message().find("another finalization or evaluation holds " + out), std::string::npos)
      << r.status();
  EXPECT_FALSE(Exists(out + "/model-globals.safetensors"));
  ::close(fd);
  EXPECT_TRUE(FinalizeOutputDir(o).ok());
  // The lock is released when finalization returns: a second run gets it again.
  EXPECT_TRUE(FinalizeOutputDir(o).ok());
}

}  // namespace
// quality.json joins a finished output's manifest; the check accepts the manifest before and
// after, and refuses a manifest that changed otherwise or another job's directory.
TEST(FinalizeTest, QualityFileJoinsTheManifest) {
  const std::string out = TempDir() + "/out";
  FinalizeOptions o = Prepared("j-q", out);
  absl::StatusOr<FinalizeOutput> f = FinalizeOutputDir(o);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE(CheckFinalizedOutput(out, "j-q", f->manifest_sha256).ok());
  absl::StatusOr<FinalizeOutput> added =
      AddToManifest(out, "j-q", f->manifest_sha256, kQualityFileName, "{\"kl\": 1}\n");
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_EQ(added->files, f->files + 1);
  EXPECT_EQ(added->total_bytes, f->total_bytes + 10);
  const std::string manifest = Read(out + "/manifest.json");
  EXPECT_EQ(Sha256Hex(manifest), added->manifest_sha256);
  EXPECT_NE(manifest.find("\"quality.json\""), std::string::npos) << manifest;
  // Before and after: the same finalized output. Again (a crash after the rename): replaced.
  EXPECT_TRUE(CheckFinalizedOutput(out, "j-q", f->manifest_sha256).ok());
  absl::StatusOr<FinalizeOutput> again =
      AddToManifest(out, "j-q", f->manifest_sha256, kQualityFileName, "{\"kl\": 1}\n");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->manifest_sha256, added->manifest_sha256);
  // Another job, or a manifest changed by hand: refused, nothing written.
  EXPECT_EQ(CheckFinalizedOutput(out, "j-other", f->manifest_sha256).code(),
            absl::StatusCode::kFailedPrecondition);
  // (Whitespace is not a change: the files listed are what counts.)
  std::ofstream(out + "/manifest.json", std::ios::app) << " ";
  absl::StatusOr<FinalizeOutput> tampered =
      AddToManifest(out, "j-q", f->manifest_sha256, kQualityFileName, "{}\n");
  EXPECT_EQ(tampered.status().code(), absl::StatusCode::kOk) << tampered.status();
  std::ofstream(out + "/manifest.json") << "{\"format\": \"mq-manifest-1\", \"files\": []}";
  tampered = AddToManifest(out, "j-q", f->manifest_sha256, kQualityFileName, "{}\n");
  EXPECT_EQ(tampered.status().code(), absl::StatusCode::kDataLoss) << tampered.status();
  EXPECT_EQ(Read(out + "/quality.json"), "{}\n");  // the last accepted addition's, untouched
}

}  // namespace mq::pipeline
