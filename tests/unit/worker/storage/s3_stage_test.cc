// Staging an s3:// model directory and reading it through CheckpointReader, against a real S3
// server (rclone serve s3) and the fault proxy: every tensor equals the local reader's.
#include "worker/storage/s3_stage.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "common/sha256.h"
#include "tests/unit/common/s3/s3_test_env.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/checkpoint_reader_remote.h"
#include "worker/storage/s3_output.h"

namespace mq::storage {
namespace {

using ::testing::HasSubstr;
using testing::S3TestEnv;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string ModelDir() {
  const char* src = std::getenv("MQ_SOURCE_DIR");
  return std::string(src ? src : ".") + "/tests/data/ds3-trained";
}

class S3StageTest : public ::testing::Test {
 protected:
  S3StageTest() : env_(/*with_proxy=*/true) {}
  void SetUp() override {
    MQ_REQUIRE_S3(env_);
    env_.CreateBucket("models");
    client_ = std::make_shared<s3::S3Client>(env_.Config());
    for (const char* f : {"config.json", "generation_config.json", "model.safetensors",
                          "tokenizer.json", "tokenizer_config.json"}) {
      ASSERT_TRUE(
          client_->Put("models", std::string("ds3/") + f, ReadFile(ModelDir() + "/" + f)).ok());
    }
    ASSERT_TRUE(client_->Put("models", "ds3/sub/ignored.bin", "x").ok());
    staged_ =
        std::filesystem::temp_directory_path() / ("mq-stage-test-" + std::to_string(::getpid()));
  }
  void TearDown() override { std::filesystem::remove_all(staged_); }

  S3TestEnv env_;
  std::shared_ptr<s3::S3Client> client_;
  std::filesystem::path staged_;
};

TEST_F(S3StageTest, StagedCheckpointReadsLikeTheLocalOne) {
  absl::StatusOr<StageResult> r =
      StageRemoteCheckpoint(*client_, "spec.model_uri", "s3://models/ds3", staged_.string());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->shard_stubs, 1);
  EXPECT_EQ(r->copied_files, 4);
  EXPECT_FALSE(std::filesystem::exists(staged_ / "sub"));
  EXPECT_EQ(ReadFile((staged_ / "config.json").string()), ReadFile(ModelDir() + "/config.json"));
  // The stub has the shard's size but holds only its header (sparse).
  EXPECT_EQ(std::filesystem::file_size(staged_ / "model.safetensors"),
            std::filesystem::file_size(ModelDir() + "/model.safetensors"));
  // Mapping the stub directly is refused (its data would read as zeros).
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> stub =
      model::SafetensorsFile::Open((staged_ / "model.safetensors").string());
  ASSERT_FALSE(stub.ok());
  EXPECT_THAT(std::string(stub.status().message()), HasSubstr("stub of a remote shard"));

  ::setenv("MQ_S3_ENDPOINT", env_.endpoint().c_str(), 1);
  ::setenv("AWS_ACCESS_KEY_ID", testing::kTestAccessKey, 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", testing::kTestSecretKey, 1);
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> remote =
      model::CheckpointReader::Open(staged_.string());
  ASSERT_TRUE(remote.ok()) << remote.status();
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> local =
      model::CheckpointReader::Open(ModelDir());
  ASSERT_TRUE(local.ok()) << local.status();
  ASSERT_EQ((*remote)->names(), (*local)->names());
  ASSERT_GT((*local)->names().size(), 10u);
  // A few faults on the way: retried, never visible.
  env_.Fault("POST", R"([{"match":"GET /models/ds3/model.safetensors","kind":"slowdown","count":2},
                         {"match":"GET /models/ds3/model.safetensors","kind":"truncate","count":2}])");
  for (const std::string& name : (*local)->names()) {
    absl::StatusOr<model::TensorView> a = (*remote)->Get(name);
    absl::StatusOr<model::TensorView> b = (*local)->Get(name);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_EQ(a->num_bytes, b->num_bytes) << name;
    EXPECT_EQ(a->shape, b->shape);
    EXPECT_EQ(a->dtype, b->dtype);
    EXPECT_EQ(std::memcmp(a->data, b->data, a->num_bytes), 0) << name;
    EXPECT_NE(a->owner, nullptr);
  }
  EXPECT_THAT(env_.Fault("GET"), HasSubstr("\"truncate\": 2"));
}

TEST_F(S3StageTest, ConcurrentGetsFetchOnceAndTheCacheIsBounded) {
  ASSERT_TRUE(
      StageRemoteCheckpoint(*client_, "spec.model_uri", "s3://models/ds3", staged_.string()).ok());
  absl::StatusOr<std::unique_ptr<model::RemoteShards>> shards =
      model::RemoteShards::Open(staged_.string(), "s3://models/ds3", client_, 1 << 20);
  ASSERT_TRUE(shards.ok()) << shards.status();
  absl::StatusOr<std::vector<std::string>> names = (*shards)->Names("model.safetensors");
  ASSERT_TRUE(names.ok());
  // The largest tensor, fetched by 4 threads at once: one fetch.
  std::string big;
  uint64_t big_bytes = 0;
  for (const std::string& n : *names) {
    absl::StatusOr<model::TensorView> v = (*shards)->Get("model.safetensors", n);
    ASSERT_TRUE(v.ok());
    if (v->num_bytes > big_bytes) big = n, big_bytes = v->num_bytes;
  }
  const uint64_t before = (*shards)->fetched_bytes();
  // With a 1 MiB cache the big tensor was evicted by later ones (unless it came last).
  std::vector<std::thread> threads;
  std::vector<model::TensorView> views(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] { views[t] = *(*shards)->Get("model.safetensors", big); });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_LE((*shards)->fetched_bytes() - before, big_bytes);
  for (int t = 1; t < 4; ++t) {
    EXPECT_EQ(std::memcmp(views[0].data, views[t].data, big_bytes), 0);
  }
}

TEST_F(S3StageTest, ClearErrors) {
  absl::StatusOr<StageResult> r = StageRemoteCheckpoint(
      *client_, "spec.model_uri", "s3://models/nothing-here", staged_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("spec.model_uri = \"s3://models/nothing-here\""));
  r = StageRemoteCheckpoint(*client_, "spec.model_uri", "s3://no-such-bucket/m", staged_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("NoSuchBucket"));
  r = StageRemoteCheckpoint(*client_, "spec.model_uri", "s3://Bad_Bucket/m", staged_.string());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  // A shard whose header is garbage.
  ASSERT_TRUE(client_
                  ->Put("models", "bad/model.safetensors",
                        std::string("\x10\0\0\0\0\0\0\0{not json}xxxxxx", 24))
                  .ok());
  r = StageRemoteCheckpoint(*client_, "spec.model_uri", "s3://models/bad", staged_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("s3://models/bad/model.safetensors"));

  absl::Status s = StageRemoteFile(*client_, "spec.calibration.dataset_uri",
                                   "s3://models/none.jsonl", (staged_ / "x").string());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("spec.calibration.dataset_uri"));
  s = StageRemoteFile(*client_, "f", "s3://models/ds3/config.json",
                      (staged_ / "d/c.json").string());
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(ReadFile((staged_ / "d/c.json").string()), ReadFile(ModelDir() + "/config.json"));
}

}  // namespace
}  // namespace mq::storage

namespace mq::storage {
namespace {

class S3OutputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MQ_REQUIRE_S3(env_);
    env_.CreateBucket("outputs");
    client_ = std::make_unique<s3::S3Client>(env_.Config());
    mirror_ =
        std::filesystem::temp_directory_path() / ("mq-mirror-test-" + std::to_string(::getpid()));
    std::filesystem::remove_all(mirror_);
  }
  void TearDown() override { std::filesystem::remove_all(mirror_); }
  std::vector<std::string> Keys(const std::string& prefix) {
    std::vector<std::string> keys;
    absl::StatusOr<std::vector<s3::ListedObject>> objects = client_->ListObjects("outputs", prefix);
    EXPECT_TRUE(objects.ok()) << objects.status();
    if (!objects.ok()) return keys;
    for (const s3::ListedObject& o : *objects) keys.push_back(o.key);
    return keys;
  }
  testing::S3TestEnv env_;
  std::unique_ptr<s3::S3Client> client_;
  std::filesystem::path mirror_;
};

TEST_F(S3OutputTest, ClaimRefusesForeignObjectsAndOtherJobs) {
  ASSERT_TRUE(client_->Put("outputs", "theirs/notes.txt", "mine").ok());
  absl::Status s = ClaimS3Output(*client_, "s3://outputs/theirs", "j-1");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("theirs/notes.txt"));
  EXPECT_THAT(Keys("theirs/"), ::testing::ElementsAre("theirs/notes.txt"));  // untouched

  ASSERT_TRUE(ClaimS3Output(*client_, "s3://outputs/job", "j-1").ok());
  ASSERT_TRUE(ClaimS3Output(*client_, "s3://outputs/job", "j-1").ok());  // idempotent
  s = ClaimS3Output(*client_, "s3://outputs/job", "j-2");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("belongs to job j-1"));
}

TEST_F(S3OutputTest, PublishUploadsManifestLastAndRemovesOnlyItsStrays) {
  ASSERT_TRUE(ClaimS3Output(*client_, "s3://outputs/job", "j-1").ok());
  ASSERT_TRUE(PrepareMirror(mirror_.string(), "j-1").ok());
  EXPECT_TRUE(std::filesystem::exists(mirror_ / ".mq-job"));
  std::ofstream(mirror_ / "model-layer00000-rank000-of-001.safetensors") << "layer0";
  std::ofstream(mirror_ / "config.json") << "{}";
  // A layer file of an earlier attempt (another gang size) is in the store, and an object the
  // job did not write under a name mq never uses.
  ASSERT_TRUE(client_->Put("outputs", "job/model-layer00000-rank000-of-002.safetensors", "x").ok());
  ASSERT_TRUE(client_->Put("outputs", "job/README.md", "user's").ok());
  absl::StatusOr<std::string> sha = UploadOutputFile(*client_, "s3://outputs/job", mirror_.string(),
                                                     "model-layer00000-rank000-of-001.safetensors",
                                                     Sha256Hex("layer0"), 64 << 10);
  ASSERT_TRUE(sha.ok()) << sha.status();
  // A recorded hash that does not match is refused before anything is sent.
  EXPECT_EQ(UploadOutputFile(*client_, "s3://outputs/job", mirror_.string(), "config.json",
                             Sha256Hex("other"), 64 << 10)
                .status()
                .code(),
            absl::StatusCode::kDataLoss);
  std::ofstream(mirror_ / "manifest.json")
      << "{\"files\": [{\"name\": \"config.json\", \"size\": 2, \"sha256\": \"" << Sha256Hex("{}")
      << "\"}, {\"name\": \"model-layer00000-rank000-of-001.safetensors\", \"size\": 6, "
         "\"sha256\": \""
      << Sha256Hex("layer0") << "\"}]}";
  ASSERT_TRUE(
      PublishS3Output(*client_, "s3://outputs/job", mirror_.string(), "j-1", 64 << 10).ok());
  EXPECT_THAT(
      Keys("job/"),
      ::testing::ElementsAre("job/.mq-job", "job/README.md", "job/config.json", "job/manifest.json",
                             "job/model-layer00000-rank000-of-001.safetensors"));
  // Another job's mirror may not publish there.
  EXPECT_EQ(PublishS3Output(*client_, "s3://outputs/job", mirror_.string(), "j-2", 64 << 10).code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace mq::storage
