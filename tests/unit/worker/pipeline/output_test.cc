// worker/pipeline/output: hashing, file naming, the output-location check and claim (a directory
// belongs to one job), verification of committed files (VerifyFiles, FileSetReader) and of
// hidden-state checkpoints.
#include "worker/pipeline/output.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "worker/model/tensor_io.h"

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

std::string Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream b;
  b << in.rdbuf();
  return b.str();
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Flips one byte of a file in place (offset from the start, or from the end when negative).
void FlipByte(const std::string& path, long offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(offset, offset < 0 ? std::ios::end : std::ios::beg);
  const char c = static_cast<char>(f.get());
  f.seekp(offset, offset < 0 ? std::ios::end : std::ios::beg);
  f.put(static_cast<char>(c ^ 0x5a));
}

TEST(OutputTest, OutputLocationChecks) {
  const std::string model = TempDir();
  // The model directory itself is refused.
  absl::Status s = CheckOutputLocation(model, model, "j-a");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("is the model directory"), std::string::npos) << s;
  // A new directory is created (no marker yet: checking writes nothing into it); an empty one
  // is fine.
  const std::string fresh = TempDir() + "/new/out";
  EXPECT_TRUE(CheckOutputLocation(model, fresh, "j-a").ok());
  EXPECT_TRUE(Exists(fresh));
  EXPECT_FALSE(Exists(fresh + "/" + kOwnerMarkerName));
  // A regular file where the directory should be.
  const std::string file = TempDir() + "/file";
  Touch(file);
  s = CheckOutputLocation(model, file, "j-a");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("not a directory"), std::string::npos) << s;
  // No job to claim it for.
  EXPECT_EQ(CheckOutputLocation(model, fresh, "").code(), absl::StatusCode::kInvalidArgument);
}

TEST(OutputTest, UnclaimedDirectoryWithAnyEntryIsRefusedAndUntouched) {
  const std::string model = TempDir();
  // Another model's checkpoint (names an mq output also uses) and someone's notes.
  const std::string busy = TempDir();
  const std::vector<std::string> names = {"config.json",
                                          "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors",
                                          "model.safetensors.index.json",
                                          "notes.txt",
                                          "tokenizer.json",
                                          ".hidden"};
  for (const std::string& n : names) Touch(busy + "/" + n, "theirs:" + n);
  for (auto check : {&CheckOutputLocation, &ClaimOutputLocation}) {
    absl::Status s = check(model, busy, "j-a");
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(s.message().find("7 entries"), std::string::npos) << s;
    EXPECT_NE(s.message().find(".hidden, config.json, model-00001-of-00002.safetensors"),
              std::string::npos)
        << s;
    EXPECT_NE(s.message().find("and 2 more"), std::string::npos) << s;
  }
  EXPECT_FALSE(Exists(busy + "/" + kOwnerMarkerName));
  for (const std::string& n : names) EXPECT_EQ(Read(busy + "/" + n), "theirs:" + n) << n;
}

TEST(OutputTest, ClaimMarksTheDirectoryForOneJob) {
  const std::string model = TempDir();
  const std::string out = TempDir() + "/out";
  ASSERT_TRUE(ClaimOutputLocation(model, out, "j-first").ok());
  EXPECT_EQ(Read(out + "/" + kOwnerMarkerName), "{\"job_id\":\"j-first\"}\n");
  absl::StatusOr<std::string> owner = OutputOwner(out);
  ASSERT_TRUE(owner.ok()) << owner.status();
  EXPECT_EQ(*owner, "j-first");
  // Idempotent for its job, also with the job's own files in it (an earlier attempt's).
  Touch(out + "/model-layer00001-rank000-of-002.safetensors");
  Touch(out + "/model-globals.safetensors.tmp.123");
  Touch(out + "/config.json");
  EXPECT_TRUE(ClaimOutputLocation(model, out, "j-first").ok());
  EXPECT_TRUE(CheckOutputLocation(model, out, "j-first").ok());
  // Another job is refused, naming the owner; nothing changes.
  for (auto check : {&CheckOutputLocation, &ClaimOutputLocation}) {
    absl::Status s = check(model, out, "j-second");
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(s.message().find("belongs to job j-first"), std::string::npos) << s;
  }
  EXPECT_EQ(*OutputOwner(out), "j-first");
  // A file no mq output consists of, even in the job's own directory: refused and left alone.
  Touch(out + "/notes.txt", "mine");
  absl::Status s = ClaimOutputLocation(model, out, "j-first");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("notes.txt"), std::string::npos) << s;
  EXPECT_EQ(Read(out + "/notes.txt"), "mine");
  // A marker that is not ours to read.
  const std::string odd = TempDir();
  Touch(odd + "/" + kOwnerMarkerName, "garbage");
  EXPECT_EQ(OutputOwner(odd).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ClaimOutputLocation(model, odd, "j-first").code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Read(odd + "/" + kOwnerMarkerName), "garbage");
  EXPECT_EQ(OutputOwner(TempDir()).status().code(), absl::StatusCode::kNotFound);
}

std::vector<model::TensorData> SmallTensors(uint8_t fill) {
  std::vector<model::TensorData> tensors;
  tensors.push_back({"a.weight", model::DType::kU8, {4, 256}, std::vector<uint8_t>(1024, fill)});
  tensors.push_back({"b.weight", model::DType::kU8, {8}, std::vector<uint8_t>(8, fill)});
  return tensors;
}

// `n` small layer files written into `dir` (with their sizes and SHA-256).
std::vector<OutputFileInfo> LayerFiles(const std::string& dir, int n) {
  std::vector<OutputFileInfo> files;
  for (int i = 0; i < n; ++i) {
    absl::StatusOr<OutputFileInfo> f =
        WriteDescribedSafetensors(dir, LayerFileName(i, 0, 1), SmallTensors(i));
    EXPECT_TRUE(f.ok()) << f.status();
    if (f.ok()) files.push_back(*f);
  }
  return files;
}

TEST(OutputTest, VerifyFilesNamesEveryDamagedFile) {
  const std::string dir = TempDir();
  const std::vector<OutputFileInfo> files = LayerFiles(dir, 4);
  ASSERT_EQ(files.size(), 4u);
  EXPECT_TRUE(VerifyFiles(dir, files).ok());
  FlipByte(dir + "/" + files[1].name, -3);               // same size, other bytes
  ::truncate((dir + "/" + files[2].name).c_str(), 100);  // shorter
  ::unlink((dir + "/" + files[3].name).c_str());         // gone
  absl::Status s = VerifyFiles(dir, files);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(CorruptFilesOf(s),
            (std::vector<std::string>{files[1].name, files[2].name, files[3].name}));
  EXPECT_NE(s.message().find(files[1].name + " has SHA-256"), std::string::npos) << s;
  EXPECT_NE(s.message().find(files[2].name + " has 100 bytes"), std::string::npos) << s;
  EXPECT_NE(s.message().find(files[3].name + " is missing"), std::string::npos) << s;
  EXPECT_TRUE(CorruptFilesOf(absl::InternalError("x")).empty());
  EXPECT_TRUE(CorruptFilesOf(absl::DataLossError("no payload")).empty());
}

// More files than verification hashes at once (several threads): every damaged one is still
// named, each with its own problem, in the files' order.
TEST(OutputTest, VerifyFilesHashedAtOnceNamesEachDamagedFileInOrder) {
  const std::string dir = TempDir();
  const std::vector<OutputFileInfo> files = LayerFiles(dir, 21);
  ASSERT_EQ(files.size(), 21u);
  EXPECT_TRUE(VerifyFiles(dir, files).ok());
  const std::vector<int> damaged = {2, 9, 10, 20};
  for (int i : damaged) FlipByte(dir + "/" + files[i].name, -1 - i);
  ::truncate((dir + "/" + files[15].name).c_str(), 7);
  absl::Status s = VerifyFiles(dir, files);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(CorruptFilesOf(s),
            (std::vector<std::string>{files[2].name, files[9].name, files[10].name, files[15].name,
                                      files[20].name}));
  size_t at = 0;
  for (int i : {2, 9, 10, 15, 20}) {
    const std::string what = files[i].name + (i == 15 ? " has 7 bytes" : " has SHA-256");
    const size_t found = s.message().find(what, at);
    EXPECT_NE(found, std::string::npos) << what << " in " << s;
    at = found == std::string::npos ? at : found;
  }
}

// A committed file read back after its write carries its stamp; verification then reads only
// the files whose stamp changed (a byte written in place, a file replaced, times touched) and
// still names every damaged one.
TEST(OutputTest, ReadBackFilesAreReadAgainOnlyWhenTheirStampChanged) {
  const std::string dir = TempDir();
  std::vector<OutputFileInfo> files = LayerFiles(dir, 6);
  ASSERT_EQ(files.size(), 6u);
  for (OutputFileInfo& f : files) {
    ASSERT_TRUE(ReadBackCommitted(dir, &f).ok()) << f.name;
    ASSERT_TRUE(f.verified.has_value()) << f.name;
  }
  VerifyCounts counts;
  EXPECT_TRUE(VerifyFiles(dir, files, &counts).ok());
  EXPECT_EQ(counts.stamped_files, 6);
  EXPECT_EQ(counts.hashed_files, 0);
  // Right after the read-back (the same clock tick, for files this small): each change is seen.
  FlipByte(dir + "/" + files[1].name, -2);  // in place: same size and inode
  {
    const std::string copy = dir + "/copy";  // replaced by an equal copy: a new inode
    std::ofstream(copy, std::ios::binary) << Read(dir + "/" + files[3].name);
    ASSERT_EQ(::rename(copy.c_str(), (dir + "/" + files[3].name).c_str()), 0);
  }
  {
    const std::string copy = dir + "/copy";  // replaced by another file of the same size
    std::string other = Read(dir + "/" + files[4].name);
    other[other.size() - 1] ^= 1;
    std::ofstream(copy, std::ios::binary) << other;
    ASSERT_EQ(::rename(copy.c_str(), (dir + "/" + files[4].name).c_str()), 0);
  }
  // Times set back to the stamp's: the change of ctime still shows.
  const struct timespec times[2] = {
      {files[5].verified->mtime_ns / 1000000000, files[5].verified->mtime_ns % 1000000000},
      {files[5].verified->mtime_ns / 1000000000, files[5].verified->mtime_ns % 1000000000}};
  FlipByte(dir + "/" + files[5].name, 0);
  ASSERT_EQ(::utimensat(AT_FDCWD, (dir + "/" + files[5].name).c_str(), times, 0), 0);
  absl::Status s = VerifyFiles(dir, files, &counts);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_EQ(CorruptFilesOf(s),
            (std::vector<std::string>{files[1].name, files[4].name, files[5].name}));
  EXPECT_EQ(counts.stamped_files, 2);  // 0 and 2
  EXPECT_EQ(counts.hashed_files, 4);   // 1, 3 (equal: passes), 4 and 5
  // Without stamps (a file committed before stamps, or by another host) every file is read.
  for (OutputFileInfo& f : files) f.verified.reset();
  EXPECT_EQ(VerifyFiles(dir, files, &counts).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(counts.hashed_files, 6);
  EXPECT_EQ(counts.stamped_files, 0);
}

TEST(OutputTest, ReadBackNamesAFileThatDiffersFromWhatWasWritten) {
  const std::string dir = TempDir();
  std::vector<OutputFileInfo> files = LayerFiles(dir, 2);
  ASSERT_EQ(files.size(), 2u);
  FlipByte(dir + "/" + files[0].name, 10);
  absl::Status s = ReadBackCommitted(dir, &files[0]);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_EQ(CorruptFilesOf(s), std::vector<std::string>{files[0].name});
  EXPECT_NE(s.message().find("reads back as"), std::string::npos) << s;
  EXPECT_FALSE(files[0].verified.has_value());
  ::unlink((dir + "/" + files[1].name).c_str());
  s = ReadBackCommitted(dir, &files[1]);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("cannot be read back"), std::string::npos) << s;
  EXPECT_FALSE(files[1].verified.has_value());
}

// A write with read-back ranges hashes each range of the file from the bytes it writes (the
// same digests the file's own bytes give), and the read-back checks the ranges: a good file
// passes and is stamped; a changed byte is named with its range; a changed size, or ranges that
// do not cover the file, fall back to the whole file's digest.
TEST(OutputTest, ReadBackByRangesChecksEveryRangeOfTheFile) {
  const std::string dir = TempDir();
  ReadBackRanges ranges;
  ranges.range_bytes = 100;
  absl::StatusOr<OutputFileInfo> f =
      WriteDescribedSafetensors(dir, LayerFileName(0, 0, 1), SmallTensors(3), &ranges);
  ASSERT_TRUE(f.ok()) << f.status();
  const std::string path = dir + "/" + f->name;
  const std::string bytes = Read(path);
  ASSERT_EQ(static_cast<int64_t>(bytes.size()), f->size);
  EXPECT_EQ(f->sha256, Sha256Hex(bytes));
  ASSERT_EQ(ranges.sha256.size(), (bytes.size() + 99) / 100);
  ASSERT_NE(bytes.size() % 100, 0u);  // the last range is a short one
  for (size_t i = 0; i < ranges.sha256.size(); ++i) {
    EXPECT_EQ(ranges.sha256[i], Sha256Hex(std::string_view(bytes).substr(i * 100, 100))) << i;
  }
  ASSERT_TRUE(ReadBackCommitted(dir, &*f, &ranges).ok());
  EXPECT_TRUE(f->verified.has_value());

  // One byte changed in the sixth range (and in the short last one: the first is named).
  FlipByte(path, 512);
  FlipByte(path, -1);
  f->verified.reset();
  absl::Status s = ReadBackCommitted(dir, &*f, &ranges);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_EQ(CorruptFilesOf(s), std::vector<std::string>{f->name});
  EXPECT_NE(s.message().find(absl::StrCat("reads back as bytes [500, 600) of its ", f->size)),
            std::string::npos)
      << s;
  EXPECT_FALSE(f->verified.has_value());

  // Ranges that do not cover the file's recorded size: the whole file is hashed instead.
  ReadBackRanges short_list = ranges;
  short_list.sha256.pop_back();
  s = ReadBackCommitted(dir, &*f, &short_list);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find(absl::StrCat("reads back as ", f->size, " bytes with SHA-256")),
            std::string::npos)
      << s;
  FlipByte(path, 512);
  FlipByte(path, -1);
  EXPECT_TRUE(ReadBackCommitted(dir, &*f, &short_list).ok());
  EXPECT_TRUE(ReadBackCommitted(dir, &*f, &ranges).ok());

  // A shorter file: its size is named, not a range.
  ASSERT_EQ(::truncate(path.c_str(), f->size - 1), 0);
  s = ReadBackCommitted(dir, &*f, &ranges);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find(absl::StrCat("reads back as ", f->size - 1, " bytes")),
            std::string::npos)
      << s;

  ranges.range_bytes = 0;
  EXPECT_EQ(
      WriteDescribedSafetensors(dir, "z.safetensors", SmallTensors(1), &ranges).status().code(),
      absl::StatusCode::kInvalidArgument);
}

// A range read past the end of a file is an error naming the file, never a short digest.
TEST(OutputTest, Sha256OfFileRangeHashesExactlyTheRange) {
  const std::string dir = TempDir();
  Touch(dir + "/f", "0123456789");
  const int fd = ::open((dir + "/f").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(*Sha256OfFileRange(fd, 2, 5, "f"), Sha256Hex("23456"));
  EXPECT_EQ(*Sha256OfFileRange(fd, 10, 0, "f"), Sha256Hex(""));
  absl::StatusOr<std::string> past = Sha256OfFileRange(fd, 8, 5, dir + "/f");
  EXPECT_EQ(past.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(past.status().message().find(dir + "/f ends at byte 10"), std::string::npos)
      << past.status();
  ::close(fd);
}

TEST(OutputTest, FileSetReaderVerifiesEachFileBeforeUse) {
  const std::string dir = TempDir();
  absl::StatusOr<OutputFileInfo> a = WriteDescribedSafetensors(
      dir, "model-layer00000-rank000-of-001.safetensors", SmallTensors(1));
  std::vector<model::TensorData> other;
  other.push_back({"c.weight", model::DType::kU8, {16}, std::vector<uint8_t>(16, 3)});
  absl::StatusOr<OutputFileInfo> b =
      WriteDescribedSafetensors(dir, "model-layer00001-rank000-of-001.safetensors", other);
  ASSERT_TRUE(a.ok() && b.ok());
  {
    absl::StatusOr<std::unique_ptr<FileSetReader>> r = FileSetReader::Open(dir, {*a, *b});
    ASSERT_TRUE(r.ok()) << r.status();
    absl::StatusOr<model::TensorView> v = (*r)->Get("c.weight");
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->data[0], 3);
  }
  // One byte of a tensor flipped: the file opens (its header is intact) but no tensor of it is
  // handed out; the other file still serves.
  FlipByte(dir + "/" + a->name, -1);
  {
    absl::StatusOr<std::unique_ptr<FileSetReader>> r = FileSetReader::Open(dir, {*a, *b});
    ASSERT_TRUE(r.ok()) << r.status();
    absl::StatusOr<model::TensorView> v = (*r)->Get("a.weight");
    EXPECT_EQ(v.status().code(), absl::StatusCode::kDataLoss) << v.status();
    EXPECT_EQ(CorruptFilesOf(v.status()), std::vector<std::string>{a->name});
    EXPECT_EQ((*r)->Get("b.weight").status().code(), absl::StatusCode::kDataLoss);
    EXPECT_TRUE((*r)->Get("c.weight").ok());
  }
  // A damaged header: named at Open, like a file of another size.
  FlipByte(dir + "/" + a->name, -1);  // data restored
  FlipByte(dir + "/" + b->name, 8);   // the JSON header's "{"
  ::truncate((dir + "/" + a->name).c_str(), a->size - 1);
  absl::StatusOr<std::unique_ptr<FileSetReader>> r = FileSetReader::Open(dir, {*a, *b});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_EQ(CorruptFilesOf(r.status()), std::vector<std::string>{a->name});  // sizes first
  ::truncate((dir + "/" + a->name).c_str(), a->size);  // right size, wrong bytes (a zero)
  r = FileSetReader::Open(dir, {*a, *b});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_EQ(CorruptFilesOf(r.status()), std::vector<std::string>{b->name});
}

TEST(OutputTest, HiddenCheckpointWithDamagedBytesIsRefused) {
  const std::string dir = TempDir();
  const std::string path = dir + "/hidden-step00002-seq000000-000004.safetensors";
  std::vector<model::TensorData> chunks;
  for (int i = 0; i < 3; ++i) {
    chunks.push_back({"chunk." + std::to_string(i),
                      model::DType::kF32,
                      {2, 4, 1024},
                      std::vector<uint8_t>(2 * 4 * 1024 * 4, static_cast<uint8_t>(i + 1))});
  }
  ASSERT_TRUE(WriteHiddenCheckpoint(path, chunks).ok());
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> f = OpenHiddenCheckpoint(path, 3);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(OpenHiddenCheckpoint(dir + "/none.safetensors", 3).status().code(),
            absl::StatusCode::kNotFound);
  // 4 KiB of the last chunk overwritten with zeros.
  {
    std::fstream out(path, std::ios::in | std::ios::out | std::ios::binary);
    out.seekp(-8192, std::ios::end);
    const std::string zeros(4096, '\0');
    out.write(zeros.data(), zeros.size());
  }
  f = OpenHiddenCheckpoint(path, 3);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss) << f.status();
  EXPECT_NE(f.status().message().find(path), std::string::npos) << f.status();
  EXPECT_NE(f.status().message().find("failed its SHA-256 check in chunk.2"), std::string::npos)
      << f.status();
  // A checkpoint without a checksum (or with fewer chunks) is not used either.
  ASSERT_TRUE(model::WriteSafetensors(path, chunks).ok());
  EXPECT_EQ(OpenHiddenCheckpoint(path, 3).status().code(), absl::StatusCode::kDataLoss);
  ASSERT_TRUE(WriteHiddenCheckpoint(path, chunks).ok());
  EXPECT_EQ(OpenHiddenCheckpoint(path, 4).status().code(), absl::StatusCode::kDataLoss);
  // Checksums for another number of chunks than the file holds.
  ASSERT_TRUE(
      model::WriteSafetensors(
          path, chunks, {{"mq_chunk_sha256", std::string(64, '0') + "," + std::string(64, '0')}})
          .ok());
  f = OpenHiddenCheckpoint(path, 3);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(f.status().message().find("has 2 chunk checksums for 3 chunks"), std::string::npos)
      << f.status();
  // An older worker's checkpoint (one SHA-256 over every chunk's length and bytes) is still read,
  // and still refused once damaged.
  Sha256 whole;
  for (const model::TensorData& c : chunks) {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(c.size() >> (8 * i));
    whole.Update(len, sizeof(len));
    whole.Update(c.data(), c.size());
  }
  ASSERT_TRUE(model::WriteSafetensors(path, chunks, {{"mq_sha256", whole.HexDigest()}}).ok());
  f = OpenHiddenCheckpoint(path, 3);
  ASSERT_TRUE(f.ok()) << f.status();
  {
    std::fstream out(path, std::ios::in | std::ios::out | std::ios::binary);
    out.seekp(-8192, std::ios::end);
    out.write("\x01", 1);
  }
  f = OpenHiddenCheckpoint(path, 3);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(f.status().message().find("failed its SHA-256 check"), std::string::npos) << f.status();
  // Chunks must be named in order.
  std::swap(chunks[0].name, chunks[1].name);
  EXPECT_EQ(WriteHiddenCheckpoint(path, chunks).code(), absl::StatusCode::kInvalidArgument);
}

TEST(OutputTest, HiddenCheckpointFromTensorViewsEqualsOneFromCopies) {
  const std::string dir = TempDir();
  std::vector<at::Tensor> hidden = {at::randn({2, 5, 64}).to(at::kBFloat16),
                                    at::randn({1, 7, 64}).to(at::kBFloat16)};
  std::vector<model::TensorData> copies, views;
  for (size_t i = 0; i < hidden.size(); ++i) {
    copies.push_back(model::ToTensorData("chunk." + std::to_string(i), hidden[i]));
    views.push_back(model::ToTensorDataView("chunk." + std::to_string(i), hidden[i]));
    EXPECT_EQ(views.back().data(), hidden[i].data_ptr());  // no copy
    EXPECT_TRUE(views.back().bytes.empty());
  }
  // A non-contiguous tensor is copied.
  model::TensorData strided = model::ToTensorDataView("t", hidden[0].transpose(1, 2));
  EXPECT_EQ(strided.size(), hidden[0].nbytes());
  EXPECT_EQ(strided.view, nullptr);
  ASSERT_TRUE(WriteHiddenCheckpoint(dir + "/a.safetensors", std::move(copies)).ok());
  ASSERT_TRUE(WriteHiddenCheckpoint(dir + "/b.safetensors", std::move(views)).ok());
  auto read = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  EXPECT_EQ(read(dir + "/a.safetensors"), read(dir + "/b.safetensors"));
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> f =
      OpenHiddenCheckpoint(dir + "/b.safetensors", 2);
  ASSERT_TRUE(f.ok()) << f.status();
  absl::StatusOr<at::Tensor> back = model::FromTensorView(*(*f)->Get("chunk.1"));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(at::equal(*back, hidden[1]));
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
