#include "worker/model/checkpoint_reader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/model/smaps_test_util.h"
#include "worker/model/fp8.h"
#include "worker/model/mapping_guard.h"
#include "worker/model/numeric.h"
#include "worker/model/safetensors_writer.h"

namespace mq::model {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

class CheckpointReaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("checkpoint_reader_test." + std::to_string(::getpid()) + "." +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  std::string Dir() const { return dir_.string(); }

  void WriteRaw(const std::string& name, const std::string& bytes) const {
    std::ofstream(Path(name), std::ios::binary) << bytes;
  }

  fs::path dir_;
};

// A tensor whose bytes are a recognisable pattern (byte i = seed + i·7).
TensorData Patterned(std::string name, DType dtype, std::vector<int64_t> shape, uint8_t seed) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  TensorData t{std::move(name), dtype, std::move(shape), {}};
  t.bytes.resize(static_cast<size_t>(n * DTypeBits(dtype) / 8));
  for (size_t i = 0; i < t.bytes.size(); ++i) t.bytes[i] = static_cast<uint8_t>(seed + i * 7);
  return t;
}

std::vector<uint8_t> Bytes(const TensorView& v) { return {v.data, v.data + v.num_bytes}; }

std::vector<uint8_t> F32Bytes(const std::vector<float>& values) {
  std::vector<uint8_t> out(values.size() * 4);
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

// 8-byte little-endian length + header + data: a hand-made (possibly malformed) file.
std::string Frame(const std::string& header, uint64_t data_bytes, uint64_t declared_len) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((declared_len >> (8 * i)) & 0xff);
  out += header;
  out.append(data_bytes, '\0');
  return out;
}
std::string Frame(const std::string& header, uint64_t data_bytes) {
  return Frame(header, data_bytes, header.size());
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

TEST_F(CheckpointReaderTest, FileViewsPointAtTheExactBytes) {
  std::vector<TensorData> tensors = {
      Patterned("a.weight", DType::kBF16, {3, 5}, 1), Patterned("b.bias", DType::kF32, {7}, 2),
      Patterned("c.codes", DType::kF8E4M3, {4, 9}, 3), Patterned("d.scalar", DType::kI64, {}, 4),
      Patterned("e.empty", DType::kF16, {0, 3}, 5)};
  const std::vector<TensorData> expected = tensors;
  ASSERT_TRUE(WriteSafetensors(Path("m.safetensors"), std::move(tensors)).ok());

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(Path("m.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), Path("m.safetensors"));
  EXPECT_EQ((*file)->header().tensors.size(), 5u);
  EXPECT_EQ((*file)->header().metadata.at("format"), "pt");
  for (const TensorData& t : expected) {
    absl::StatusOr<TensorView> v = (*file)->Get(t.name);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->name, t.name);
    EXPECT_EQ(v->dtype, t.dtype);
    EXPECT_EQ(v->shape, t.shape);
    EXPECT_EQ(v->num_bytes, t.bytes.size());
    EXPECT_EQ(Bytes(*v), t.bytes) << t.name;
    EXPECT_EQ(v->num_elements(),
              t.shape.empty() ? 1 : t.shape[0] * (t.shape.size() > 1 ? t.shape[1] : 1));
  }
  // The view points into the file at 8 + N + begin.
  std::ifstream in(Path("m.safetensors"), std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(in)), {});
  const TensorInfo* info = (*file)->header().Find("b.bias");
  ASSERT_NE(info, nullptr);
  EXPECT_EQ(std::memcmp(raw.data() + info->file_offset, (*file)->Get("b.bias")->data, 28), 0);
}

// Resident kB of this process's mapping that contains `address`.
int64_t ResidentKbOfMappingAt(const void* address) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  return testing::ResidentKbOfMappings(
      [a](uintptr_t lo, uintptr_t hi, std::string_view) { return lo <= a && a < hi; });
}

TEST_F(CheckpointReaderTest, ReleaseDropsATensorsPagesAndItsViewsStillRead) {
  constexpr int64_t kBig = int64_t{32} << 20;
  std::vector<TensorData> tensors = {Patterned("model.layers.0.a", DType::kU8, {1000}, 1),
                                     Patterned("model.layers.0.big", DType::kU8, {kBig}, 2),
                                     Patterned("model.layers.1.c", DType::kU8, {1000}, 3)};
  const std::vector<TensorData> expected = tensors;
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), std::move(tensors)).ok());
  absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok()) << reader.status();
  reader->get()->Release("model.layers.0.big");  // not opened yet: nothing to do
  std::vector<TensorView> views;
  for (const TensorData& t : expected) {
    absl::StatusOr<TensorView> v = (*reader)->Get(t.name);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(Bytes(*v), t.bytes) << t.name;  // every page read, so resident
    views.push_back(*v);
  }
  const int64_t before = ResidentKbOfMappingAt(views[1].data);
  ASSERT_GE(before, kBig / 1024) << "the tensor's pages were read";

  (*reader)->Release("model.layers.0.big");
  (*reader)->Release("no.such.tensor");  // ignored
  const int64_t after = ResidentKbOfMappingAt(views[1].data);
  // All of the tensor's whole pages left; at most the two it shares with its neighbours stay.
  EXPECT_LE(after, before - kBig / 1024 + 2 * ::sysconf(_SC_PAGESIZE) / 1024)
      << "before " << before << " kB, after " << after << " kB";
  // Nothing was lost: every view reads the file's bytes again, the neighbours' shared pages too.
  for (size_t i = 0; i < views.size(); ++i) EXPECT_EQ(Bytes(views[i]), expected[i].bytes) << i;
}

TEST_F(CheckpointReaderTest, FileWithEmptyDataRegion) {
  // Only a zero-element tensor: the data buffer is 0 bytes long.
  ASSERT_TRUE(WriteSafetensors(Path("e.safetensors"), {Patterned("x", DType::kBF16, {0}, 0)}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(Path("e.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<TensorView> v = (*file)->Get("x");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->num_bytes, 0u);
  EXPECT_EQ(v->num_elements(), 0);
  // And no tensors at all.
  WriteRaw("none.safetensors", Frame("{}", 0));
  file = SafetensorsFile::Open(Path("none.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->header().tensors.empty());
}

TEST_F(CheckpointReaderTest, FileGetUnknownTensorIsNotFound) {
  ASSERT_TRUE(WriteSafetensors(Path("m.safetensors"), {Patterned("a", DType::kU8, {2}, 0)}).ok());
  auto file = SafetensorsFile::Open(Path("m.safetensors"));
  ASSERT_TRUE(file.ok());
  absl::StatusOr<TensorView> v = (*file)->Get("nope");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(v.status().message()), HasSubstr("\"nope\""));
  EXPECT_THAT(std::string(v.status().message()), HasSubstr(Path("m.safetensors")));
}

TEST_F(CheckpointReaderTest, FileRejectsMalformedFilesNamingThePath) {
  struct Bad {
    std::string name, bytes, message;
  } cases[] = {
      {"short", "abc", "too short"},
      {"huge_len", Frame("{}", 0, 100'000'001), "exceeds"},
      {"past_end", Frame("{}", 0, 100), "does not fit"},
      {"not_json", Frame("{nope", 0), "not valid JSON"},
      {"trailing", Frame(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 3),
       "trailing"},
      {"truncated", Frame(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 2),
       "truncated"},
      {"bad_dtype", Frame(R"({"a":{"dtype":"Q9","shape":[],"data_offsets":[0,1]}})", 1),
       "unknown dtype"},
  };
  for (const Bad& bad : cases) {
    WriteRaw(bad.name, bad.bytes);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(Path(bad.name));
    ASSERT_FALSE(file.ok()) << bad.name;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << bad.name;
    EXPECT_THAT(std::string(file.status().message()), StartsWith(Path(bad.name) + ": "))
        << bad.name;
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(bad.message)) << file.status();
  }
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> missing = SafetensorsFile::Open(Path("x"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> dir = SafetensorsFile::Open(Dir());
  EXPECT_EQ(dir.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(dir.status().message()), HasSubstr("not a regular file"));
}

TEST_F(CheckpointReaderTest, UnknownTensorFieldsMayRepeatKeysInsideThem) {
  // serde ignores unknown fields wholesale: keys inside an ignored value (even "dtype", or the
  // same key in two nested objects) are not the tensor's own keys. Regression test for the
  // header parser, which used to count them as duplicates of the tensor's fields.
  const std::string header =
      R"({"a":{"extra":{"dtype":1,"shape":[{"k":1},{"k":2}]},"dtype":"U8","shape":[2],)"
      R"("data_offsets":[0,2],"more":[{"data_offsets":0}]}})";
  WriteRaw("m.safetensors", Frame(header, 2));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(Path("m.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Get("a")->shape, (std::vector<int64_t>{2}));
  // A real duplicate is still rejected.
  WriteRaw("d.safetensors",
           Frame(R"({"a":{"dtype":"U8","shape":[2],"dtype":"U8","data_offsets":[0,2]}})", 2));
  file = SafetensorsFile::Open(Path("d.safetensors"));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("duplicate key \"dtype\""));
}

// ---------------------------------------------------------------------------------------------
// CheckpointReader

// Two shards + index: shard 1 has a, b; shard 2 has c.
void WriteTwoShards(const std::string& dir, const std::string& s1, const std::string& s2) {
  ASSERT_TRUE(WriteSafetensors(dir + "/" + s1, {Patterned("a", DType::kBF16, {2, 3}, 1),
                                                Patterned("b", DType::kF32, {4}, 2)})
                  .ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/" + s2, {Patterned("c", DType::kI32, {5}, 3)}).ok());
  ASSERT_TRUE(WriteShardedIndex(dir + "/model.safetensors.index.json", 12 + 16 + 20,
                                {{"a", s1}, {"b", s1}, {"c", s2}})
                  .ok());
}

TEST_F(CheckpointReaderTest, IndexMapsNamesToShards) {
  // DeepSeek's 6-digit total: nothing may be derived from the names.
  const std::string s1 = "model-00001-of-000002.safetensors";
  const std::string s2 = "model-00002-of-000002.safetensors";
  WriteTwoShards(Dir(), s1, s2);
  absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_THAT((*reader)->names(), ElementsAre("a", "b", "c"));
  EXPECT_TRUE((*reader)->Has("b"));
  EXPECT_FALSE((*reader)->Has("d"));
  EXPECT_EQ((*reader)->ShardOf("c"), s2);
  EXPECT_EQ((*reader)->ShardOf("d"), "");
  for (auto [name, seed] : {std::pair{"a", 1}, std::pair{"b", 2}, std::pair{"c", 3}}) {
    absl::StatusOr<TensorView> v = (*reader)->Get(name);
    ASSERT_TRUE(v.ok()) << v.status();
    const TensorData want = Patterned(name, v->dtype, v->shape, static_cast<uint8_t>(seed));
    EXPECT_EQ(Bytes(*v), want.bytes) << name;
  }
  EXPECT_EQ((*reader)->Get("c")->dtype, DType::kI32);
  absl::StatusOr<TensorView> missing = (*reader)->Get("zzz");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("\"zzz\""));
}

TEST_F(CheckpointReaderTest, IndexMetadataVariantsAreTolerated) {
  ASSERT_TRUE(WriteSafetensors(Path("s.safetensors"), {Patterned("a", DType::kU8, {1}, 0)}).ok());
  for (
      const char* index :
      {R"({"metadata": {}, "weight_map": {"a": "s.safetensors"}})",
       R"({"weight_map": {"a": "s.safetensors"}})",
       R"({"metadata": {"total_size": 1, "total_parameters": 1}, "weight_map": {"a": "s.safetensors"}})"}) {
    WriteRaw("model.safetensors.index.json", index);
    absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
    ASSERT_TRUE(reader.ok()) << index << ": " << reader.status();
    EXPECT_TRUE((*reader)->Get("a").ok());
  }
}

TEST_F(CheckpointReaderTest, SingleFileFallback) {
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), {Patterned("y", DType::kBF16, {2}, 9),
                                                           Patterned("x", DType::kU8, {3}, 8)})
                  .ok());
  absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_THAT((*reader)->names(), ElementsAre("x", "y"));
  EXPECT_EQ((*reader)->ShardOf("x"), "model.safetensors");
  EXPECT_EQ(Bytes(*(*reader)->Get("y")), Patterned("y", DType::kBF16, {2}, 9).bytes);
}

TEST_F(CheckpointReaderTest, EmptyDirectoryIsNotFound) {
  absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(reader.status().message()), HasSubstr("model.safetensors.index.json"));
  reader = CheckpointReader::Open(Path("does-not-exist"));
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CheckpointReaderTest, MissingShardFailsOnlyItsTensors) {
  WriteTwoShards(Dir(), "s1.safetensors", "s2.safetensors");
  fs::remove(Path("s2.safetensors"));
  absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok()) << reader.status();  // shards open lazily
  absl::StatusOr<TensorView> c = (*reader)->Get("c");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("tensor \"c\" (shard s2.safetensors)"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("file not found"));
  EXPECT_TRUE((*reader)->Get("a").ok());
}

TEST_F(CheckpointReaderTest, MalformedShardIsReportedWithTensorAndPath) {
  WriteTwoShards(Dir(), "s1.safetensors", "s2.safetensors");
  WriteRaw("s2.safetensors", Frame("{bad", 0));
  auto reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok());
  absl::StatusOr<TensorView> c = (*reader)->Get("c");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("tensor \"c\""));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(Path("s2.safetensors")));
}

TEST_F(CheckpointReaderTest, IndexPointingAtTheWrongShard) {
  WriteTwoShards(Dir(), "s1.safetensors", "s2.safetensors");
  ASSERT_TRUE(WriteShardedIndex(Path("model.safetensors.index.json"), 0,
                                {{"a", "s2.safetensors"}, {"c", "s2.safetensors"}})
                  .ok());
  auto reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok());
  absl::StatusOr<TensorView> a = (*reader)->Get("a");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("maps it to s2.safetensors"));
}

TEST_F(CheckpointReaderTest, RejectsShardNamesOutsideTheDirectory) {
  for (const char* shard : {"../x.safetensors", "sub/x.safetensors", "/etc/passwd", "..", ".", "",
                            "a..b.safetensors"}) {
    WriteRaw("model.safetensors.index.json",
             std::string(R"({"weight_map": {"w": ")") + shard + "\"}}");
    absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
    ASSERT_FALSE(reader.ok()) << shard;
    EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(reader.status().message()), HasSubstr("weight_map[\"w\"]"))
        << reader.status();
  }
}

TEST_F(CheckpointReaderTest, RejectsMalformedIndex) {
  struct Bad {
    const char* text;
    const char* message;
  } cases[] = {
      {"{", "invalid JSON"},
      {"[]", "must be a JSON object"},
      {R"({"metadata": {}})", "missing \"weight_map\""},
      {R"({"weight_map": []})", "\"weight_map\" must be an object"},
      {R"({"weight_map": {"w": 5}})", "must be a shard file name"},
      {R"({"weight_map": {"w": "a", "w": "b"}})", "duplicate key"},
  };
  for (const Bad& bad : cases) {
    WriteRaw("model.safetensors.index.json", bad.text);
    absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
    ASSERT_FALSE(reader.ok()) << bad.text;
    EXPECT_EQ(reader.status().code(), absl::StatusCode::kInvalidArgument) << bad.text;
    EXPECT_THAT(std::string(reader.status().message()),
                StartsWith(Path("model.safetensors.index.json")));
    EXPECT_THAT(std::string(reader.status().message()), HasSubstr(bad.message)) << reader.status();
  }
}

TEST_F(CheckpointReaderTest, ConcurrentGetsOpenEachShardOnce) {
  WriteTwoShards(Dir(), "s1.safetensors", "s2.safetensors");
  auto reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok());
  std::vector<const uint8_t*> seen(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      absl::StatusOr<TensorView> v = (*reader)->Get(t % 2 ? "c" : "a");
      seen[t] = v.ok() ? v->data : nullptr;
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 8; ++t) {
    EXPECT_NE(seen[t], nullptr);
    EXPECT_EQ(seen[t], seen[t % 2]);  // same mapping every time
  }
}

// ---------------------------------------------------------------------------------------------
// LoadAsBf16

// Independent per-element reference: numeric.h's decode and RNE.
uint16_t Expected(uint8_t code, float scale) { return FloatToBf16(Fp8E4M3ToFloat(code) * scale); }

TEST_F(CheckpointReaderTest, LoadAsBf16DequantizesFp8) {
  const int64_t rows = 200, cols = 300;  // scale [2, 3], edge blocks 72 rows / 44 cols
  std::mt19937 rng(5);
  TensorData w{"l.weight", DType::kF8E4M3, {rows, cols}, std::vector<uint8_t>(rows * cols)};
  for (auto& b : w.bytes) {
    do b = static_cast<uint8_t>(rng());
    while ((b & 0x7F) == 0x7F);  // no NaN codes (numeric.h's NaN bits differ by design)
  }
  std::vector<float> scale = {0.5f, 1.25f, 3e-3f, 7.0f, 0x1p-10f, 2.5e-5f};
  const std::vector<uint8_t> codes = w.bytes;
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"),
                               {std::move(w),
                                {"l.weight_scale_inv", DType::kF32, {2, 3}, F32Bytes(scale)},
                                Patterned("x", DType::kU8, {3}, 0)})
                  .ok());
  auto reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok());
  absl::StatusOr<std::vector<uint16_t>> out = LoadAsBf16(**reader, "l.weight");
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      ASSERT_EQ((*out)[i * cols + j], Expected(codes[i * cols + j], scale[(i / 128) * 3 + j / 128]))
          << i << "," << j;
    }
  }
}

TEST_F(CheckpointReaderTest, LoadAsBf16ConvertsFloatDtypes) {
  const std::vector<float> f32 = {1.0f, -2.5f, 1.00390625f, 3.0e38f, 1e-40f, 0.1f};
  std::vector<uint8_t> f16_bytes;
  const std::vector<uint16_t> f16 = {0x3C00, 0xC100, 0x0001, 0x7BFF, 0xFC00, 0x3555};
  const std::vector<float> f16_values = {1.0f,     -2.5f,     0x1p-24f,
                                         65504.0f, -INFINITY, 0.333251953125f};
  for (uint16_t h : f16) {
    f16_bytes.push_back(static_cast<uint8_t>(h & 0xFF));
    f16_bytes.push_back(static_cast<uint8_t>(h >> 8));
  }
  TensorData bf16 = Patterned("bf", DType::kBF16, {2, 2}, 3);
  const std::vector<uint8_t> bf16_bytes = bf16.bytes;
  ASSERT_TRUE(
      WriteSafetensors(Path("model.safetensors"), {{"f32", DType::kF32, {6}, F32Bytes(f32)},
                                                   {"f16", DType::kF16, {2, 3}, f16_bytes},
                                                   std::move(bf16),
                                                   Patterned("i32", DType::kI32, {2}, 1),
                                                   Patterned("lonely", DType::kF8E4M3, {2, 2}, 1),
                                                   Patterned("vec", DType::kF8E4M3, {4}, 1)})
          .ok());
  auto reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok());

  absl::StatusOr<std::vector<uint16_t>> out = LoadAsBf16(**reader, "f32");
  ASSERT_TRUE(out.ok()) << out.status();
  for (size_t i = 0; i < f32.size(); ++i) EXPECT_EQ((*out)[i], FloatToBf16(f32[i])) << i;
  out = LoadAsBf16(**reader, "f16");
  ASSERT_TRUE(out.ok()) << out.status();
  for (size_t i = 0; i < f16.size(); ++i) EXPECT_EQ((*out)[i], FloatToBf16(f16_values[i])) << i;
  out = LoadAsBf16(**reader, "bf");
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 4u);
  EXPECT_EQ(std::memcmp(out->data(), bf16_bytes.data(), 8), 0);

  out = LoadAsBf16(**reader, "i32");
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("tensor \"i32\": dtype I32"));
  out = LoadAsBf16(**reader, "lonely");
  EXPECT_EQ(out.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("\"lonely_scale_inv\""));
  out = LoadAsBf16(**reader, "missing");
  EXPECT_EQ(out.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CheckpointReaderTest, LoadAsBf16ChecksTheScale) {
  auto fp8 = [](const char* name, std::vector<int64_t> shape) {
    return Patterned(name, DType::kF8E4M3, std::move(shape), 2);
  };
  ASSERT_TRUE(
      WriteSafetensors(Path("model.safetensors"),
                       {fp8("a", {129, 5}),
                        {"a_scale_inv", DType::kF32, {1, 1}, F32Bytes({1.0f})},  // needs [2, 1]
                        fp8("b", {4, 4}),
                        Patterned("b_scale_inv", DType::kBF16, {1, 1}, 0),
                        fp8("c", {2, 2, 2}),
                        {"c_scale_inv", DType::kF32, {1, 1}, F32Bytes({1.0f})},
                        fp8("d", {0, 7}),
                        {"d_scale_inv", DType::kF32, {0, 1}, {}}})
          .ok());
  auto reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok());
  absl::StatusOr<std::vector<uint16_t>> out = LoadAsBf16(**reader, "a");
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()),
              HasSubstr("\"a_scale_inv\": shape [1, 1], expected [2, 1]"));
  out = LoadAsBf16(**reader, "b");
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("dtype BF16, expected F32"));
  out = LoadAsBf16(**reader, "c");
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("must be 2-D"));
  out = LoadAsBf16(**reader, "d");
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(out->empty());
}

TEST_F(CheckpointReaderTest, ReadsGeneratorOutput) {
  // Uses mq-gen-model when it is built (ctest sets MQ_BUILD_DIR).
  const char* build = std::getenv("MQ_BUILD_DIR");
  const std::string gen = build ? std::string(build) + "/tests/tools/mq-gen-model" : "";
  if (gen.empty() || ::access(gen.c_str(), X_OK) != 0) {
    GTEST_SKIP() << "mq-gen-model not built (set MQ_BUILD_DIR)";
  }
  const std::string model = Path("gen");
  const std::string cmd = gen + " --output " + model +
                          " --hidden 200 --q-lora-rank 0 --moe-intermediate 130 --shards 3"
                          " --seed 11 > /dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto reader = CheckpointReader::Open(model);
  ASSERT_TRUE(reader.ok()) << reader.status();
  int fp8_weights = 0;
  for (const std::string& name : (*reader)->names()) {
    absl::StatusOr<TensorView> v = (*reader)->Get(name);
    ASSERT_TRUE(v.ok()) << v.status();
    if (v->dtype != DType::kF8E4M3) continue;
    ++fp8_weights;
    absl::StatusOr<TensorView> s = (*reader)->Get(name + "_scale_inv");
    ASSERT_TRUE(s.ok()) << s.status();
    absl::StatusOr<std::vector<uint16_t>> out = LoadAsBf16(**reader, name);
    ASSERT_TRUE(out.ok()) << out.status();
    const int64_t cols = v->shape[1], nb = (cols + 127) / 128;
    for (int64_t i = 0; i < v->num_elements(); ++i) {
      float scale;
      std::memcpy(&scale, s->data + 4 * ((i / cols / 128) * nb + (i % cols) / 128), 4);
      ASSERT_EQ((*out)[i], Expected(v->data[i], scale)) << name << " element " << i;
    }
  }
  EXPECT_GT(fp8_weights, 10);
}

// ---------------------------------------------------------------------------------------------
// Shards that shrink: refused at open, and a job error (never SIGBUS) once mapped.

TEST_F(CheckpointReaderTest, ShardShorterThanItsHeaderIsRefusedWithBothSizes) {
  ASSERT_TRUE(
      WriteSafetensors(Path("s.safetensors"), {Patterned("w", DType::kBF16, {64, 64}, 1)}).ok());
  const uint64_t full = fs::file_size(Path("s.safetensors"));
  ASSERT_EQ(::truncate(Path("s.safetensors").c_str(), static_cast<off_t>(full - 100)), 0);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(Path("s.safetensors"));
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()), StartsWith(Path("s.safetensors") + ": "));
  EXPECT_THAT(std::string(file.status().message()),
              HasSubstr("file is " + std::to_string(full - 100) + " bytes but its header needs " +
                        std::to_string(full)));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("truncated by 100 bytes"));
}

// A 4 MiB tensor: a shard truncated to its first page after it was mapped.
class ShrinkingShardTest : public CheckpointReaderTest {
 protected:
  void SetUp() override {
    CheckpointReaderTest::SetUp();
    ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"),
                                 {Patterned("a.early", DType::kBF16, {8}, 3),
                                  Patterned("big.weight", DType::kBF16, {1024, 2048}, 1)})
                    .ok());
    absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
    ASSERT_TRUE(reader.ok()) << reader.status();
    reader_ = *std::move(reader);
  }
  void Truncate(off_t size) {
    ASSERT_EQ(::truncate(Path("model.safetensors").c_str(), size), 0) << std::strerror(errno);
  }
  // After Truncate(4096): reading big.weight is DATA_LOSS naming the shard and its size, through
  // a caught fault (more than `faults_before`); the process lives on, and the same view keeps
  // failing when prefetched and checked.
  void ExpectTruncatedReadFails(const TensorView& view, uint64_t faults_before) {
    absl::StatusOr<std::vector<uint16_t>> bits = LoadAsBf16(*reader_, "big.weight");
    ASSERT_FALSE(bits.ok());
    EXPECT_EQ(bits.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(bits.status().message()),
                HasSubstr("model shard " + Path("model.safetensors") +
                          " shrank or became unreadable while reading tensor \"big.weight\""));
    EXPECT_THAT(std::string(bits.status().message()), HasSubstr("4096 bytes on disk now"));
    EXPECT_GT(GuardedMappingFaults(), faults_before);
    TouchTensor(view);
    EXPECT_EQ(CheckTensorRead(view).code(), absl::StatusCode::kDataLoss);
  }
  std::unique_ptr<CheckpointReader> reader_;
};

TEST_F(ShrinkingShardTest, ReadingAfterTruncationIsAnErrorNamingTheFile) {
  absl::StatusOr<TensorView> view = reader_->Get("big.weight");
  ASSERT_TRUE(view.ok()) << view.status();
  // Read once while intact: the pages are in the page cache, and truncation still drops them.
  ASSERT_TRUE(LoadAsBf16(*reader_, "big.weight").ok());
  const uint64_t faults = GuardedMappingFaults();
  Truncate(4096);
  // The process is alive; the same view keeps failing, and prefetching it neither crashes nor
  // succeeds silently.
  ExpectTruncatedReadFails(*view, faults);
  // A tensor entirely inside the surviving first page was read intact.
  absl::StatusOr<std::vector<uint16_t>> early = LoadAsBf16(*reader_, "a.early");
  EXPECT_TRUE(early.ok()) << early.status();
}

// A written layer's pages are released (CheckpointReader::Release) and its shard then shrinks: the
// pages fault in again through the same guarded mapping, so the read is DATA_LOSS, not SIGBUS and
// not zeros taken for weights.
TEST_F(ShrinkingShardTest, ReadingAReleasedTensorAfterTruncationIsAnErrorToo) {
  absl::StatusOr<TensorView> view = reader_->Get("big.weight");
  ASSERT_TRUE(view.ok()) << view.status();
  ASSERT_TRUE(LoadAsBf16(*reader_, "big.weight").ok());  // resident
  reader_->Release("big.weight");
  ASSERT_TRUE(LoadAsBf16(*reader_, "big.weight").ok());  // read back from the page cache
  reader_->Release("big.weight");
  const uint64_t faults = GuardedMappingFaults();
  Truncate(4096);
  ExpectTruncatedReadFails(*view, faults);
  reader_->Release("big.weight");  // releasing pages beyond the file's end is harmless
  EXPECT_EQ(CheckTensorRead(*view).code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(LoadAsBf16(*reader_, "a.early").ok());
}

TEST_F(ShrinkingShardTest, FaultsOnOtherThreadsAreCaughtToo) {
  absl::StatusOr<TensorView> view = reader_->Get("big.weight");
  ASSERT_TRUE(view.ok()) << view.status();
  Truncate(0);
  std::vector<uint8_t> copy(view->num_bytes);
  std::vector<std::thread> threads;
  const uint64_t quarter = view->num_bytes / 4;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back(
        [&, i] { std::memcpy(copy.data() + i * quarter, view->data + i * quarter, quarter); });
  }
  for (std::thread& t : threads) t.join();
  absl::Status s = CheckTensorRead(*view);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr(Path("model.safetensors")));
  EXPECT_THAT(std::string(s.message()), HasSubstr("0 bytes on disk now"));
}

TEST_F(ShrinkingShardTest, ReopeningTheRestoredShardReadsIt) {
  Truncate(4096);
  ASSERT_FALSE(LoadAsBf16(*reader_, "big.weight").ok());
  reader_.reset();  // the mapping (and its guard slot) is released
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"),
                               {Patterned("a.early", DType::kBF16, {8}, 3),
                                Patterned("big.weight", DType::kBF16, {1024, 2048}, 1)})
                  .ok());
  absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(Dir());
  ASSERT_TRUE(reader.ok()) << reader.status();
  absl::StatusOr<std::vector<uint16_t>> bits = LoadAsBf16(**reader, "big.weight");
  ASSERT_TRUE(bits.ok()) << bits.status();
  EXPECT_EQ(bits->size(), 1024u * 2048u);
}

// A fault in memory the guard does not own still kills the process the way SIGBUS always did.
TEST_F(CheckpointReaderTest, UnguardedMappingFaultStillKills) {
  ASSERT_TRUE(
      WriteSafetensors(Path("m.safetensors"), {Patterned("w", DType::kU8, {65536}, 1)}).ok());
  // Install the guard's handler (opening any file does).
  ASSERT_TRUE(SafetensorsFile::Open(Path("m.safetensors")).ok());
  EXPECT_EXIT(
      {
        const int fd = ::open(Path("m.safetensors").c_str(), O_RDONLY);
        void* p = ::mmap(nullptr, 65536, PROT_READ, MAP_PRIVATE, fd, 0);
        if (::ftruncate(::open(Path("m.safetensors").c_str(), O_WRONLY), 0) != 0) std::exit(3);
        volatile uint8_t sink = static_cast<const uint8_t*>(p)[32768];
        (void)sink;
        std::exit(0);
      },
      ::testing::KilledBySignal(SIGBUS), "");
}

}  // namespace
}  // namespace mq::model
