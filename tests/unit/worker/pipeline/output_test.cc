// worker/pipeline/output: hashing, file naming, and the output-location check that makes a job
// with a bad output directory fail during planning.
#include "worker/pipeline/output.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace mq::pipeline {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/mq-output-test-XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  EXPECT_NE(d, nullptr);
  return d;
}

void Touch(const std::string& path, const std::string& content = "x") {
  std::ofstream(path) << content;
}

TEST(OutputTest, Sha256MatchesKnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string dir = TempDir();
  Touch(dir + "/f", "abc");
  absl::StatusOr<OutputFileInfo> info = DescribeFile(dir, "f");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 3);
  EXPECT_EQ(info->sha256, Sha256Hex("abc"));
  EXPECT_EQ(Sha256OfFile(dir + "/missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(OutputTest, WrittenFileDescribedWithoutReadingItBack) {
  const std::string dir = TempDir();
  std::vector<model::TensorData> tensors;
  tensors.push_back({"w", model::DType::kU8, {4, 1000}, std::vector<uint8_t>(4000, 7)});
  tensors.push_back({"s", model::DType::kBF16, {2}, {0x80, 0x3F, 0x00, 0xC0}});
  absl::StatusOr<OutputFileInfo> info = WriteDescribedSafetensors(dir, "x.safetensors", tensors);
  ASSERT_TRUE(info.ok()) << info.status();
  absl::StatusOr<OutputFileInfo> read = DescribeFile(dir, "x.safetensors");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(info->name, "x.safetensors");
  EXPECT_EQ(info->size, read->size);
  EXPECT_EQ(info->sha256, read->sha256);
  EXPECT_EQ(
      WriteDescribedSafetensors(dir + "/missing-dir", "y.safetensors", tensors).status().code(),
      absl::StatusCode::kNotFound);
}

TEST(OutputTest, LayerFileNames) {
  EXPECT_EQ(LayerFileName(3, 1, 2), "model-layer00003-rank001-of-002.safetensors");
  EXPECT_EQ(LayerFileName(60, 0, 1), "model-layer00060-rank000-of-001.safetensors");
}

TEST(OutputTest, OutputLocationChecks) {
  const std::string model = TempDir();
  // The model directory itself is refused.
  absl::Status s = CheckOutputLocation(model, model);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("is the model directory"), std::string::npos) << s;
  // A new directory is created; an empty one is fine.
  const std::string fresh = TempDir() + "/new/out";
  EXPECT_TRUE(CheckOutputLocation(model, fresh).ok());
  struct stat st;
  EXPECT_EQ(::stat(fresh.c_str(), &st), 0);
  // Files of an earlier mq output (and temporaries) are fine: they are replaced or removed.
  const std::string ours = TempDir();
  Touch(ours + "/model-layer00001-rank000-of-002.safetensors");
  Touch(ours + "/config.json");
  Touch(ours + "/model-globals.safetensors.tmp.123");
  Touch(ours + "/manifest.json");
  EXPECT_TRUE(CheckOutputLocation(model, ours).ok());
  // Someone else's file: refused, named, and left alone.
  Touch(ours + "/notes.txt", "mine");
  s = CheckOutputLocation(model, ours);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("notes.txt"), std::string::npos) << s;
  std::ifstream in(ours + "/notes.txt");
  std::string content;
  in >> content;
  EXPECT_EQ(content, "mine");
  // A regular file where the directory should be.
  const std::string file = TempDir() + "/file";
  Touch(file);
  s = CheckOutputLocation(model, file);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("not a directory"), std::string::npos) << s;
}

TEST(OutputTest, RemoveHiddenCheckpointsKeepsOtherFiles) {
  const std::string dir = TempDir();
  Touch(dir + "/hidden-step00001-seq000000-000004.safetensors");
  Touch(dir + "/hidden-step00002-seq000000-000004.safetensors");
  RemoveHiddenCheckpoints(dir);
  struct stat st;
  EXPECT_NE(::stat(dir.c_str(), &st), 0);  // emptied and removed
  const std::string other = TempDir();
  Touch(other + "/hidden-step00001-seq000000-000004.safetensors");
  Touch(other + "/keep.txt");
  RemoveHiddenCheckpoints(other);
  EXPECT_NE(::stat((other + "/hidden-step00001-seq000000-000004.safetensors").c_str(), &st), 0);
  EXPECT_EQ(::stat((other + "/keep.txt").c_str(), &st), 0);
}

}  // namespace
}  // namespace mq::pipeline
