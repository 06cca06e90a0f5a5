#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/model/safetensors.h"

namespace mq::model {
namespace {

using ::testing::HasSubstr;

// 8-byte little-endian length + header + `data_bytes` zero bytes: a real safetensors file.
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

// Parses `header` as if it were in a file with `data_bytes` of tensor data after it.
absl::StatusOr<SafetensorsHeader> Parse(const std::string& header, uint64_t data_bytes) {
  return ParseSafetensorsHeader(header, header.size(), 8 + header.size() + data_bytes);
}

// The message of a failed parse (empty when the parse succeeded, so EXPECT_THAT fails clearly).
std::string ErrorOf(const absl::StatusOr<SafetensorsHeader>& result) {
  if (result.ok()) return "";
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  return std::string(result.status().message());
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "st_header_XXXXXX").string();
    path_ = mkdtemp(pattern.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string Write(const std::string& name, const std::string& bytes) const {
    const std::string path = (path_ / name).string();
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

 private:
  std::filesystem::path path_;
};

TEST(SafetensorsHeaderTest, ParsesValidHeaderInOffsetOrder) {
  const std::string header = R"({"__metadata__":{"format":"pt"},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]},)"
                             R"("a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},)"
                             R"("empty":{"dtype":"F8_E4M3","shape":[0,5],"data_offsets":[20,20]},)"
                             R"("scalar":{"dtype":"I64","shape":[],"data_offsets":[20,28]},)"
                             R"("nibbles":{"dtype":"F4","shape":[2,3],"data_offsets":[28,31]}})"
                             "   ";  // space padding is allowed
  absl::StatusOr<SafetensorsHeader> h = Parse(header, 31);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->header_len, header.size());
  EXPECT_EQ(h->data_offset(), 8 + header.size());
  EXPECT_EQ(h->metadata.at("format"), "pt");
  ASSERT_EQ(h->tensors.size(), 5u);
  EXPECT_EQ(h->tensors[0].name, "a");
  EXPECT_EQ(h->tensors[0].dtype, DType::kBF16);
  EXPECT_EQ(h->tensors[0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(h->tensors[0].num_elements(), 6);
  EXPECT_EQ(h->tensors[0].num_bytes(), 12u);
  EXPECT_EQ(h->tensors[0].file_offset, 8 + header.size());
  EXPECT_EQ(h->tensors[1].name, "b");
  EXPECT_EQ(h->tensors[1].file_offset, 8 + header.size() + 12);
  EXPECT_EQ(h->tensors[2].name, "empty");
  EXPECT_EQ(h->tensors[2].num_elements(), 0);
  EXPECT_EQ(h->tensors[3].name, "scalar");
  EXPECT_EQ(h->tensors[3].num_elements(), 1);
  EXPECT_EQ(h->tensors[4].dtype, DType::kF4);
  ASSERT_NE(h->Find("b"), nullptr);
  EXPECT_EQ(h->Find("b")->dtype, DType::kF32);
  EXPECT_EQ(h->Find("missing"), nullptr);
}

TEST(SafetensorsHeaderTest, AcceptsEmptyHeaderNullMetadataAndUnknownFields) {
  EXPECT_TRUE(Parse("{}", 0).ok());
  EXPECT_TRUE(Parse(R"({"__metadata__":null})", 0).ok());
  absl::StatusOr<SafetensorsHeader> h =
      Parse(R"({"t":{"dtype":"U8","extra":{"x":[1,[2,{"y":3}]]},"shape":[4],"note":"hi",)"
            R"("data_offsets":[0,4]}})",
            4);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->tensors.at(0).shape, (std::vector<int64_t>{4}));
}

TEST(SafetensorsHeaderTest, RejectsHeaderLongerThanLimit) {
  EXPECT_THAT(ErrorOf(ParseSafetensorsHeader("{}", 100'000'001, 200'000'000)),
              HasSubstr("header length 100000001 exceeds the 100000000-byte limit"));
}

TEST(SafetensorsHeaderTest, RejectsHeaderLongerThanFile) {
  EXPECT_THAT(ErrorOf(ParseSafetensorsHeader("{}", 2, 9)),
              HasSubstr("header length 2 does not fit in the file: 8 + 2 > file size 9"));
}

TEST(SafetensorsHeaderTest, RejectsTruncatedHeaderView) {
  EXPECT_THAT(ErrorOf(ParseSafetensorsHeader("{", 2, 10)),
              HasSubstr("header truncated: expected 2 bytes, got 1"));
}

TEST(SafetensorsHeaderTest, RejectsHeaderNotStartingWithBrace) {
  EXPECT_THAT(ErrorOf(Parse(" {}", 0)), HasSubstr("header must start with '{', found byte 0x20"));
  EXPECT_THAT(ErrorOf(Parse("[]", 0)), HasSubstr("header must start with '{', found byte 0x5b"));
  EXPECT_THAT(ErrorOf(ParseSafetensorsHeader("", 0, 8)), HasSubstr("header is empty"));
}

TEST(SafetensorsHeaderTest, RejectsInvalidJson) {
  EXPECT_THAT(ErrorOf(Parse(R"({"a":)", 0)), HasSubstr("header is not valid JSON"));
  EXPECT_THAT(ErrorOf(Parse(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x)", 1)),
              HasSubstr("header is not valid JSON"));
  // NUL padding is not whitespace (the reference's serde_json rejects it too).
  EXPECT_THAT(ErrorOf(Parse(std::string("{}\0\0", 4), 0)), HasSubstr("header is not valid JSON"));
}

TEST(SafetensorsHeaderTest, RejectsInvalidUtf8) {
  EXPECT_THAT(ErrorOf(Parse("{\"\xff\":{}}", 0)), HasSubstr("header is not valid JSON"));
  EXPECT_THAT(ErrorOf(Parse("{\"__metadata__\":{\"k\":\"\xc3\x28\"}}", 0)),
              HasSubstr("header is not valid JSON"));
}

TEST(SafetensorsHeaderTest, RejectsDuplicateKeys) {
  EXPECT_THAT(ErrorOf(Parse(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                            R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                            2)),
              HasSubstr("duplicate key \"a\" in the header"));
  EXPECT_THAT(
      ErrorOf(Parse(R"({"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})", 1)),
      HasSubstr("tensor \"a\": duplicate key \"dtype\""));
  EXPECT_THAT(ErrorOf(Parse(R"({"__metadata__":{"k":"1","k":"2"}})", 0)),
              HasSubstr("__metadata__: duplicate key \"k\""));
}

TEST(SafetensorsHeaderTest, RejectsNonStringMetadata) {
  EXPECT_THAT(ErrorOf(Parse(R"({"__metadata__":{"format":"pt","n":3}})", 0)),
              HasSubstr("__metadata__ \"n\": value must be a string, found a number"));
  EXPECT_THAT(ErrorOf(Parse(R"({"__metadata__":{"m":{"x":"y"}}})", 0)),
              HasSubstr("__metadata__ \"m\": value must be a string, found an object"));
  EXPECT_THAT(ErrorOf(Parse(R"({"__metadata__":["pt"]})", 0)),
              HasSubstr("__metadata__ must be an object of strings, found an array"));
}

TEST(SafetensorsHeaderTest, RejectsUnknownDtype) {
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}})", 1)),
              HasSubstr("tensor \"w\": unknown dtype \"F7\" (expected one of BOOL, F4,"));
}

TEST(SafetensorsHeaderTest, RejectsBadEntryTypes) {
  EXPECT_THAT(ErrorOf(Parse(R"({"w":[1]})", 0)),
              HasSubstr("tensor \"w\": entry must be an object with dtype, shape and "
                        "data_offsets, found an array"));
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":5,"shape":[1],"data_offsets":[0,1]}})", 1)),
              HasSubstr("tensor \"w\": \"dtype\" must be a string, found a number"));
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":3,"data_offsets":[0,1]}})", 1)),
              HasSubstr("tensor \"w\": \"shape\" must be an array of integers, found a number"));
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":[1]}})", 0)),
              HasSubstr("tensor \"w\": missing \"data_offsets\""));
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", 1)),
              HasSubstr("tensor \"w\": data_offsets [0, 1, 2] must have exactly 2 entries"));
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}})", 1)),
              HasSubstr("tensor \"w\": shape[0] must be a non-negative integer, found an array"));
}

TEST(SafetensorsHeaderTest, RejectsNegativeOrFractionalShape) {
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":[2,-3],"data_offsets":[0,6]}})", 6)),
              HasSubstr("tensor \"w\": shape[1] = -3: must be a non-negative integer"));
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":[2.5],"data_offsets":[0,2]}})", 2)),
              HasSubstr("tensor \"w\": shape[0] = 2.5: must be a non-negative integer"));
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,1]}})", 1)),
              HasSubstr("tensor \"w\": data_offsets[0] = -1: must be a non-negative integer"));
}

TEST(SafetensorsHeaderTest, RejectsShapeOverflow) {
  EXPECT_THAT(
      ErrorOf(Parse(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,1]}})",
                    1)),
      HasSubstr("tensor \"w\": shape [4294967296, 4294967296] of F32 is too large"));
  EXPECT_THAT(
      ErrorOf(
          Parse(R"({"w":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,1]}})", 1)),
      HasSubstr("is too large"));
}

TEST(SafetensorsHeaderTest, RejectsSubByteCountNotMultipleOf8) {
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2)),
              HasSubstr("tensor \"w\": shape [3] of F4 is 12 bits, not a whole number of bytes"));
  EXPECT_TRUE(Parse(R"({"w":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}})", 3).ok());
}

TEST(SafetensorsHeaderTest, RejectsSizeMismatch) {
  EXPECT_EQ(
      ErrorOf(Parse(R"({"x.weight":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}})", 10)),
      "tensor \"x.weight\": data_offsets [0, 10] span 10 bytes but shape [2, 3] of BF16 "
      "needs 12");
}

TEST(SafetensorsHeaderTest, RejectsEndBeforeBegin) {
  EXPECT_THAT(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}})", 4)),
              HasSubstr("tensor \"w\": data_offsets [4, 0]: end is before begin"));
}

TEST(SafetensorsHeaderTest, RejectsFirstBeginNotZero) {
  EXPECT_EQ(ErrorOf(Parse(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", 8)),
            "tensor \"w\": data_offsets [4, 8]: the first tensor (by offset) must begin at 0");
}

TEST(SafetensorsHeaderTest, RejectsHole) {
  EXPECT_EQ(ErrorOf(Parse(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                          R"("b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}})",
                          10)),
            "tensor \"b\": data_offsets [6, 10] begin at 6 but the previous tensor \"a\" ends at "
            "4: hole of 2 bytes");
}

TEST(SafetensorsHeaderTest, RejectsOverlap) {
  EXPECT_EQ(ErrorOf(Parse(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                          R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                          6)),
            "tensor \"b\": data_offsets [2, 6] begin at 2 but the previous tensor \"a\" ends at "
            "4: overlap of 2 bytes");
}

TEST(SafetensorsHeaderTest, RejectsTrailingBytesAndShortData) {
  const std::string header = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})";
  EXPECT_THAT(ErrorOf(Parse(header, 7)),
              HasSubstr("tensor data ends at 4 but the data buffer is 7 bytes"));
  EXPECT_THAT(ErrorOf(Parse(header, 7)), HasSubstr("3 trailing bytes"));
  EXPECT_THAT(ErrorOf(Parse(header, 3)),
              HasSubstr("tensor data ends at 4 but the data buffer is only 3 bytes"));
  EXPECT_THAT(ErrorOf(Parse("{}", 1)), HasSubstr("1 trailing bytes"));
}

TEST(SafetensorsHeaderTest, ReadsFileFromDisk) {
  TempDir dir;
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}})"
      "      ";
  const std::string path = dir.Write("model-00001.safetensors", Frame(header, 8));
  absl::StatusOr<SafetensorsHeader> h = ReadSafetensorsHeader(path);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->file_size, 8 + header.size() + 8);
  EXPECT_EQ(h->tensors.at(0).file_offset, 8 + header.size());
}

TEST(SafetensorsHeaderTest, ReadErrorsNameTheFile) {
  TempDir dir;
  const std::string path =
      dir.Write("model-00001.safetensors",
                Frame(R"({"x.weight":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}})", 10));
  absl::StatusOr<SafetensorsHeader> h = ReadSafetensorsHeader(path);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(h.status().message(),
            path +
                ": tensor \"x.weight\": data_offsets [0, 10] span 10 bytes but shape [2, 3] of "
                "BF16 needs 12");
}

TEST(SafetensorsHeaderTest, ReadRejectsTruncatedFiles) {
  TempDir dir;
  EXPECT_THAT(ErrorOf(ReadSafetensorsHeader(dir.Write("short", "abc"))),
              HasSubstr("short: file is 3 bytes, too short for the 8-byte header length"));
  // Declares a 100-byte header but the file ends after 10.
  EXPECT_THAT(ErrorOf(ReadSafetensorsHeader(dir.Write("cut", Frame("{}", 0, 100)))),
              HasSubstr("cut: header length 100 does not fit in the file: 8 + 100 > file size 10"));
  // A huge declared length is refused before anything is allocated for it.
  EXPECT_THAT(ErrorOf(ReadSafetensorsHeader(dir.Write("huge", Frame("{}", 0, 1ULL << 62)))),
              HasSubstr("huge: header length 4611686018427387904 exceeds the 100000000-byte "
                        "limit"));
  EXPECT_THAT(ErrorOf(ReadSafetensorsHeader(dir.Write("large", Frame("{}", 0, 100'000'001)))),
              HasSubstr("exceeds the 100000000-byte limit"));
}

TEST(SafetensorsHeaderTest, ReadMissingFileIsNotFound) {
  TempDir dir;
  absl::StatusOr<SafetensorsHeader> h = ReadSafetensorsHeader(dir.Write("x", "") + ".nope");
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(h.status().message(), HasSubstr("x.nope: file not found"));
}

// Cheap in-test fuzzing: random byte edits of a valid file must never crash or read out of
// bounds (run under ASan for full value; tests/fuzz has the libFuzzer entry point).
TEST(SafetensorsHeaderTest, SurvivesRandomMutations) {
  const std::string valid = Frame(
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
      20);
  std::mt19937 rng(1234);
  const std::string alphabet =
      "{}[]\",:0123456789-.eE \\u\xff"
      "\x80"
      "abF_";
  int accepted = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string bytes = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % bytes.size();
      switch (rng() % 3) {
        case 0:
          bytes[pos] = alphabet[rng() % alphabet.size()];
          break;
        case 1:
          bytes.erase(pos, 1);
          break;
        default:
          bytes.insert(pos, 1, alphabet[rng() % alphabet.size()]);
      }
    }
    if (bytes.size() < 8) continue;
    uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | static_cast<unsigned char>(bytes[b]);
    std::string_view rest(bytes.data() + 8, bytes.size() - 8);
    std::string_view header = rest.substr(0, std::min<uint64_t>(n, rest.size()));
    accepted += ParseSafetensorsHeader(header, n, bytes.size()).ok() ? 1 : 0;
  }
  EXPECT_LT(accepted, 20000);
}

}  // namespace
}  // namespace mq::model
