#include "worker/model/safetensors_writer.h"

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mq::model {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class SafetensorsWriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("safetensors_writer_test." + std::to_string(::getpid()) + "." +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  static std::string ReadAll(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  static uint64_t HeaderLength(const std::string& file) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(file[i]);
    return n;
  }

  static std::string Header(const std::string& file) { return file.substr(8, HeaderLength(file)); }

  // Files in the test directory (to check that nothing stray is left behind).
  std::vector<std::string> Listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

  fs::path dir_;
};

TensorData Zeros(std::string name, DType dtype, std::vector<int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return {std::move(name), dtype, std::move(shape),
          std::vector<uint8_t>(static_cast<size_t>(n * DTypeBits(dtype) / 8), 0)};
}

// Expected bytes produced by safetensors.torch.save_file({"b": bf16 [1, -2], "a": f32 0.5
// (scalar), "c": u8 [1, 2, 255]}, path, metadata={"format": "pt"}) with safetensors 0.8.0.
TEST_F(SafetensorsWriterTest, MatchesSaveFileBytesForSmallCase) {
  std::vector<TensorData> tensors;
  tensors.push_back({"b", DType::kBF16, {2}, {0x80, 0x3F, 0x00, 0xC0}});
  tensors.push_back({"a", DType::kF32, {}, {0x00, 0x00, 0x00, 0x3F}});
  tensors.push_back({"c", DType::kU8, {3}, {0x01, 0x02, 0xFF}});
  ASSERT_TRUE(WriteSafetensors(Path("x.safetensors"), std::move(tensors)).ok());

  const std::string header =
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
      "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[4,8]},"
      "\"c\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[8,11]}} ";
  ASSERT_EQ(header.size(), 0xC0u);
  std::string expected("\xC0\0\0\0\0\0\0\0", 8);
  expected += header;
  expected += std::string("\x00\x00\x00\x3F\x80\x3F\x00\xC0\x01\x02\xFF", 11);
  EXPECT_EQ(ReadAll(Path("x.safetensors")), expected);
  EXPECT_EQ(Listing(), std::vector<std::string>{"x.safetensors"});
}

// The observer sees exactly the file's bytes, in order; without one the file is the same.
TEST_F(SafetensorsWriterTest, ObserverSeesTheFileBytes) {
  std::vector<TensorData> tensors;
  tensors.push_back({"b", DType::kBF16, {2}, {0x80, 0x3F, 0x00, 0xC0}});
  tensors.push_back(Zeros("big", DType::kF32, {3, 100000}));
  tensors.push_back({"c", DType::kU8, {3}, {0x01, 0x02, 0xFF}});
  std::vector<TensorData> copy = tensors;
  std::string seen;
  ASSERT_TRUE(WriteSafetensorsObserved(Path("o.safetensors"), std::move(tensors),
                                       {{"format", "pt"}},
                                       [&](const std::vector<FilePiece>& pieces) {
                                         for (const FilePiece& p : pieces)
                                           seen.append(static_cast<const char*>(p.data), p.size);
                                       })
                  .ok());
  ASSERT_TRUE(WriteSafetensors(Path("p.safetensors"), std::move(copy)).ok());
  EXPECT_EQ(seen, ReadAll(Path("o.safetensors")));
  EXPECT_EQ(seen, ReadAll(Path("p.safetensors")));
  // An error (a duplicate name) is reported, and the observer may not be needed at all.
  std::vector<TensorData> dup = {Zeros("x", DType::kU8, {1}), Zeros("x", DType::kU8, {1})};
  EXPECT_EQ(WriteSafetensorsObserved(Path("d.safetensors"), std::move(dup), {}, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SafetensorsWriterTest, OrdersByDtypeDescendingThenNameAscending) {
  std::vector<TensorData> tensors;
  tensors.push_back(Zeros("u8", DType::kU8, {3}));
  tensors.push_back(Zeros("layer.2", DType::kBF16, {1}));
  tensors.push_back(Zeros("layer.10", DType::kBF16, {1}));
  tensors.push_back(Zeros("fp8", DType::kF8E4M3, {2, 2}));
  tensors.push_back(Zeros("i64", DType::kI64, {2}));
  tensors.push_back(Zeros("f32", DType::kF32, {1}));
  tensors.push_back(Zeros("i32", DType::kI32, {1}));
  tensors.push_back(Zeros("bool", DType::kBool, {1}));
  tensors.push_back(Zeros("f16", DType::kF16, {1}));
  ASSERT_TRUE(WriteSafetensors(Path("o.safetensors"), std::move(tensors), {}).ok());
  const std::string header = Header(ReadAll(Path("o.safetensors")));
  const std::vector<std::string> order = {"i64", "f32", "i32", "layer.10", "layer.2",
                                          "f16", "fp8", "u8",  "bool"};
  size_t last = 0;
  for (const std::string& name : order) {
    const size_t pos = header.find("\"" + name + "\":");
    ASSERT_NE(pos, std::string::npos) << name;
    EXPECT_GT(pos, last) << name << " out of order in " << header;
    last = pos;
  }
  EXPECT_THAT(header,
              HasSubstr("\"i64\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}"));
  EXPECT_THAT(header,
              HasSubstr("\"bool\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[37,38]}"));
  EXPECT_EQ(header.find("__metadata__"), std::string::npos);  // empty map: omitted
}

TEST_F(SafetensorsWriterTest, PadsHeaderWithSpacesToMultipleOfEight) {
  for (int len = 1; len <= 16; ++len) {
    const std::string path = Path("p" + std::to_string(len) + ".safetensors");
    std::vector<TensorData> tensors;
    tensors.push_back(Zeros(std::string(len, 'n'), DType::kF32, {3, 1}));
    ASSERT_TRUE(WriteSafetensors(path, std::move(tensors)).ok());
    const std::string file = ReadAll(path);
    const uint64_t n = HeaderLength(file);
    EXPECT_EQ(n % 8, 0u) << len;
    EXPECT_EQ(file.size(), 8 + n + 12) << len;
    const std::string header = Header(file);
    const size_t close = header.find_last_of('}');
    EXPECT_LT(header.size() - 1 - close, 8u);
    EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos) << len;
  }
}

TEST_F(SafetensorsWriterTest, EscapesStringsLikeSerdeJson) {
  std::vector<TensorData> tensors;
  tensors.push_back(Zeros("q\"b\\n\n\x01\x7f\xc3\xa9", DType::kU8, {1}));
  ASSERT_TRUE(WriteSafetensors(Path("e.safetensors"), std::move(tensors), {{"k\t", "v\x1f"}}).ok());
  EXPECT_EQ(Header(ReadAll(Path("e.safetensors"))),
            "{\"__metadata__\":{\"k\\t\":\"v\\u001f\"},"
            "\"q\\\"b\\\\n\\n\\u0001\x7f\xc3\xa9\":{\"dtype\":\"U8\",\"shape\":[1],"
            "\"data_offsets\":[0,1]}} ");  // as save_file writes it (safetensors 0.8.0)
}

TEST_F(SafetensorsWriterTest, WritesEmptyAndScalarTensors) {
  std::vector<TensorData> tensors;
  tensors.push_back(Zeros("empty", DType::kF32, {0, 4}));
  tensors.push_back({"scalar", DType::kI64, {}, std::vector<uint8_t>(8, 7)});
  ASSERT_TRUE(WriteSafetensors(Path("s.safetensors"), std::move(tensors)).ok());
  const std::string header = Header(ReadAll(Path("s.safetensors")));
  EXPECT_THAT(header,
              HasSubstr("\"scalar\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]}"));
  EXPECT_THAT(header,
              HasSubstr("\"empty\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[8,8]}"));
}

TEST_F(SafetensorsWriterTest, ReplacesExistingFileAtomically) {
  std::vector<TensorData> first;
  first.push_back(Zeros("a", DType::kF32, {100}));
  ASSERT_TRUE(WriteSafetensors(Path("r.safetensors"), std::move(first)).ok());
  std::vector<TensorData> second;
  second.push_back(Zeros("b", DType::kU8, {1}));
  ASSERT_TRUE(WriteSafetensors(Path("r.safetensors"), std::move(second)).ok());
  EXPECT_THAT(Header(ReadAll(Path("r.safetensors"))), HasSubstr("\"b\""));
  EXPECT_EQ(Listing(), std::vector<std::string>{"r.safetensors"});
}

struct BadCase {
  const char* label;
  std::vector<TensorData> tensors;
  std::string message_part;
};

TEST_F(SafetensorsWriterTest, RejectsInvalidTensorsNamingThem) {
  std::vector<BadCase> cases;
  cases.push_back({"empty name", {Zeros("", DType::kF32, {1})}, "tensors[0].name is empty"});
  cases.push_back({"duplicate",
                   {Zeros("w", DType::kF32, {1}), Zeros("w", DType::kBF16, {1})},
                   "tensor \"w\" appears more than once"});
  cases.push_back({"size mismatch",
                   {{"m.weight", DType::kBF16, {2, 3}, std::vector<uint8_t>(11)}},
                   "tensor \"m.weight\": data is 11 bytes but shape [2, 3] of BF16 needs 12"});
  cases.push_back({"negative dim",
                   {{"neg", DType::kU8, {-1}, {}}},
                   "tensor \"neg\": shape [-1] has a negative dimension"});
  cases.push_back({"reserved", {Zeros("__metadata__", DType::kU8, {1})}, "reserved"});
  cases.push_back({"bad utf8", {Zeros("a\xff", DType::kU8, {1})}, "not valid UTF-8"});
  cases.push_back({"sub-byte",
                   {{"f4", DType::kF4, {3}, std::vector<uint8_t>(2)}},
                   "tensor \"f4\": shape [3] of F4 is 12 bits, not a whole number of bytes"});
  for (BadCase& c : cases) {
    const absl::Status status = WriteSafetensors(Path("bad.safetensors"), std::move(c.tensors));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.label;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.message_part)) << c.label;
  }
  EXPECT_TRUE(Listing().empty());  // nothing written, no temp file left
}

TEST_F(SafetensorsWriterTest, AcceptsPackedSubByteTensors) {
  std::vector<TensorData> tensors;
  tensors.push_back({"f4", DType::kF4, {4}, std::vector<uint8_t>(2)});
  EXPECT_TRUE(WriteSafetensors(Path("f4.safetensors"), std::move(tensors)).ok());
}

TEST_F(SafetensorsWriterTest, ReportsIoErrors) {
  std::vector<TensorData> tensors;
  tensors.push_back(Zeros("a", DType::kU8, {1}));
  const absl::Status status =
      WriteSafetensors(Path("no/such/dir/x.safetensors"), std::move(tensors));
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr("no/such/dir/x.safetensors.tmp."));
}

TEST(ShardedIndexJsonTest, MatchesPythonJsonDumps) {
  // python3 -c 'import json; print(json.dumps({"metadata": {"total_size": 1234},
  //   "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
  //   "b\u00e9\U0001F600\x7f\"\\\n": "f"}}, indent=2, sort_keys=True))'
  absl::StatusOr<std::string> json =
      ShardedIndexJson(1234, {{"lm_head.weight", "model-00002-of-00002.safetensors"},
                              {"b\xc3\xa9\xf0\x9f\x98\x80\x7f\"\\\n", "f"}});
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(*json,
            "{\n"
            "  \"metadata\": {\n"
            "    \"total_size\": 1234\n"
            "  },\n"
            "  \"weight_map\": {\n"
            "    \"b\\u00e9\\ud83d\\ude00\\u007f\\\"\\\\\\n\": \"f\",\n"
            "    \"lm_head.weight\": \"model-00002-of-00002.safetensors\"\n"
            "  }\n"
            "}\n");
}

TEST(ShardedIndexJsonTest, EmptyWeightMap) {
  absl::StatusOr<std::string> json = ShardedIndexJson(0, {});
  ASSERT_TRUE(json.ok());
  EXPECT_EQ(*json, "{\n  \"metadata\": {\n    \"total_size\": 0\n  },\n  \"weight_map\": {}\n}\n");
}

TEST(ShardedIndexJsonTest, RejectsBadInput) {
  EXPECT_EQ(ShardedIndexJson(-1, {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ShardedIndexJson(1, {{"a\xc0\x80", "f"}}).status().code(),  // overlong NUL
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ShardedIndexJson(1, {{"\xed\xa0\x80", "f"}}).status().code(),  // surrogate
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SafetensorsWriterTest, WriteShardedIndexWritesTheJson) {
  ASSERT_TRUE(WriteShardedIndex(Path("model.safetensors.index.json"), 8, {{"a", "s"}}).ok());
  EXPECT_EQ(ReadAll(Path("model.safetensors.index.json")), *ShardedIndexJson(8, {{"a", "s"}}));
  EXPECT_EQ(Listing(), std::vector<std::string>{"model.safetensors.index.json"});
}

}  // namespace
}  // namespace mq::model
