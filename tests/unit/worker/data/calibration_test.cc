#include "worker/data/calibration.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/data/bpe_tokenizer.h"
#include "worker/model/safetensors_writer.h"

namespace mq::data {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using Json = nlohmann::json;

// A character-level tokenizer: ids 0..25 = a..z, 26 = ' ', 27 = ':', 28 = '\n', 29 = BOS
// (prepended by the post-processor).
std::string CharTokenizerJson() {
  Json vocab = Json::object();
  for (int i = 0; i < 26; ++i) vocab[std::string(1, static_cast<char>('a' + i))] = i;
  vocab[" "] = 26;
  vocab[":"] = 27;
  vocab["\n"] = 28;
  Json j = {{"added_tokens", {{{"id", 29}, {"content", "<bos>"}, {"special", true}}}},
            {"normalizer", nullptr},
            {"pre_tokenizer", nullptr},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", Json::array()}}}};
  j["post_processor"] = Json::parse(R"({"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<bos>": {"id": "<bos>", "ids": [29], "tokens": ["<bos>"]}}})");
  return j.dump();
}

class CalibrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::create_directories(dir_);
    tokenizer_ = Write("tokenizer.json", CharTokenizerJson());
  }
  std::string Write(const std::string& name, const std::string& contents) {
    std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }
  // A JSONL text dataset whose line i has `i % 17 + 1` copies of one letter.
  std::string TextDataset(int lines) {
    std::string s;
    for (int i = 0; i < lines; ++i) {
      s += Json({{"text", std::string(i % 17 + 1, static_cast<char>('a' + i % 26))}}).dump();
      s += "\n";
    }
    return Write("data.jsonl", s);
  }
  CalibrationSpec Spec(const std::string& dataset) {
    CalibrationSpec spec;
    spec.dataset_path = dataset;
    spec.tokenizer_path = tokenizer_;
    return spec;
  }
  // The message of a failed load, checking its code.
  std::string LoadError(const CalibrationSpec& spec, absl::StatusCode code,
                        int64_t vocab_size = 0) {
    auto set = LoadCalibration(spec, vocab_size);
    if (set.ok()) return "(loaded fine)";
    EXPECT_EQ(set.status().code(), code) << set.status();
    return std::string(set.status().message());
  }

  std::filesystem::path dir_;
  std::string tokenizer_;
};

TEST(CalibrationShuffleTest, FixedPermutation) {
  // Pinned values (also re-derived in Python by tests/interop/test_tokenizer.py).
  EXPECT_THAT(CalibrationShuffle(10, 0), ElementsAre(6, 3, 2, 9, 8, 1, 4, 7, 0, 5));
  EXPECT_THAT(CalibrationShuffle(10, 42), ElementsAre(0, 9, 5, 8, 6, 4, 7, 2, 1, 3));
  EXPECT_THAT(CalibrationShuffle(1, 5), ElementsAre(0));
  EXPECT_TRUE(CalibrationShuffle(0, 5).empty());
}

TEST_F(CalibrationTest, TextSamplesAreTokenizedShuffledAndDeterministic) {
  CalibrationSpec spec = Spec(TextDataset(50));
  spec.num_samples = 20;
  auto a = LoadCalibration(spec, 30);
  auto b = LoadCalibration(spec, 30);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->format, "text");
  EXPECT_EQ(a->available, 50);
  EXPECT_EQ(a->skipped_short, 0);
  ASSERT_EQ(a->samples.size(), 20u);
  EXPECT_EQ(a->samples, b->samples);
  // Sample k is line CalibrationShuffle(50, 0)[k], with BOS in front.
  std::vector<int64_t> order = CalibrationShuffle(50, 0);
  int64_t total = 0;
  for (int k = 0; k < 20; ++k) {
    int line = static_cast<int>(order[k]);
    std::vector<int32_t> want = {29};
    want.insert(want.end(), line % 17 + 1, line % 26);
    EXPECT_EQ(a->samples[k], want) << "sample " << k;
    total += static_cast<int64_t>(want.size());
  }
  EXPECT_EQ(a->total_tokens, total);

  spec.seed = 1;
  auto c = LoadCalibration(spec, 30);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(c->samples, a->samples);
  auto sorted = [](std::vector<std::vector<int32_t>> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  spec.num_samples = 50;
  spec.seed = 0;
  auto all0 = LoadCalibration(spec, 30);
  spec.seed = 1;
  auto all1 = LoadCalibration(spec, 30);
  ASSERT_TRUE(all0.ok() && all1.ok());
  EXPECT_NE(all0->samples, all1->samples);                  // a different order
  EXPECT_EQ(sorted(all0->samples), sorted(all1->samples));  // of the same samples
}

TEST_F(CalibrationTest, TruncatesAndSkipsShort) {
  CalibrationSpec spec = Spec(TextDataset(34));  // lengths 2..18 tokens with BOS, twice
  spec.num_samples = 1000;
  spec.max_sequence_length = 5;
  spec.min_sequence_length = 10;  // keeps texts of >= 9 letters: 9..17 -> 9 per 17 lines
  auto set = LoadCalibration(spec, 0);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->available, 18);
  EXPECT_EQ(set->skipped_short, 16);
  EXPECT_EQ(set->samples.size(), 18u);  // fewer than num_samples: all of them
  for (const auto& s : set->samples) EXPECT_EQ(s.size(), 5u);
  EXPECT_EQ(set->total_tokens, 90);

  spec.add_special_tokens = false;
  spec.min_sequence_length = 17;
  set = LoadCalibration(spec, 0);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->available, 2);
}

TEST_F(CalibrationTest, MessagesRendering) {
  std::string data = Write("chat.jsonl", R"({"messages": [{"role": "user", "content": "hi"},)"
                                         R"( {"role": "assistant", "content": "yo"}]})"
                                         "\n");
  auto set = LoadCalibration(Spec(data), 0);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->format, "messages");
  auto tok = BpeTokenizer::FromFile(tokenizer_);
  ASSERT_TRUE(tok.ok());
  auto want = tok->Encode("user: hi\n\nassistant: yo", true);
  ASSERT_TRUE(want.ok());
  ASSERT_EQ(set->samples.size(), 1u);
  EXPECT_EQ(set->samples[0], *want);
}

TEST_F(CalibrationTest, InputIdsNeedNoTokenizerAndBlankLinesAreSkipped) {
  std::string data =
      Write("ids.jsonl", "{\"input_ids\": [1, 2, 3]}\n\n   \n{\"input_ids\": [4]}\n");
  CalibrationSpec spec = Spec(data);
  spec.tokenizer_path = "";
  spec.num_samples = 2;
  spec.seed = 42;
  auto set = LoadCalibration(spec, 5);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->format, "input_ids");
  std::vector<int64_t> order = CalibrationShuffle(2, 42);
  std::vector<std::vector<int32_t>> rows = {{1, 2, 3}, {4}};
  EXPECT_THAT(set->samples, ElementsAre(rows[order[0]], rows[order[1]]));
  EXPECT_TRUE(CheckCalibrationSource(spec).ok());
}

TEST_F(CalibrationTest, SafetensorsInput) {
  for (model::DType dtype : {model::DType::kI32, model::DType::kI64}) {
    const size_t elem = dtype == model::DType::kI32 ? 4 : 8;
    std::vector<uint8_t> bytes(3 * 4 * elem);
    for (int i = 0; i < 12; ++i) {
      int64_t v = 100 + i;
      std::memcpy(bytes.data() + i * elem, &v, elem);  // little-endian host
    }
    std::string path = (dir_ / "ids.safetensors").string();
    ASSERT_TRUE(model::WriteSafetensors(path, {{"input_ids", dtype, {3, 4}, bytes}}).ok());
    CalibrationSpec spec = Spec(path);
    spec.tokenizer_path = "";
    spec.max_sequence_length = 3;
    EXPECT_TRUE(CheckCalibrationSource(spec).ok());
    auto set = LoadCalibration(spec, 200);
    ASSERT_TRUE(set.ok()) << set.status();
    EXPECT_EQ(set->format, "safetensors");
    EXPECT_EQ(set->available, 3);
    std::vector<int64_t> order = CalibrationShuffle(3, 0);
    ASSERT_EQ(set->samples.size(), 3u);
    for (int k = 0; k < 3; ++k) {
      int32_t base = 100 + 4 * static_cast<int32_t>(order[k]);
      EXPECT_THAT(set->samples[k], ElementsAre(base, base + 1, base + 2));
    }
    EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument, 105),
                AllOf(HasSubstr(path), HasSubstr("input_ids[1, 1]"), HasSubstr("105")));
  }
  std::string path = (dir_ / "bad.safetensors").string();
  ASSERT_TRUE(
      model::WriteSafetensors(path, {{"tokens", model::DType::kI32, {1, 1}, {0, 0, 0, 0}}}).ok());
  CalibrationSpec spec = Spec(path);
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr(path), HasSubstr("no tensor named \"input_ids\"")));
  ASSERT_TRUE(
      model::WriteSafetensors(path, {{"input_ids", model::DType::kF32, {1}, {0, 0, 0, 0}}}).ok());
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("dtype = F32"), HasSubstr("I32 or I64")));
  EXPECT_FALSE(CheckCalibrationSource(spec).ok());
  ASSERT_TRUE(
      model::WriteSafetensors(path, {{"input_ids", model::DType::kI32, {1}, {0, 0, 0, 0}}}).ok());
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument), HasSubstr("must be 2-D"));
}

TEST_F(CalibrationTest, ErrorsNameFileLineAndProblem) {
  // Missing file.
  CalibrationSpec spec = Spec((dir_ / "missing.jsonl").string());
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kNotFound), HasSubstr("missing.jsonl"));
  EXPECT_EQ(CheckCalibrationSource(spec).code(), absl::StatusCode::kNotFound);
  // Empty file (blank lines only).
  spec = Spec(Write("empty.jsonl", "\n  \n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("empty.jsonl"), HasSubstr("empty file")));
  // Not JSON, with its line number.
  spec = Spec(Write("bad.jsonl", "{\"text\": \"ab\"}\n{oops\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("bad.jsonl line 2"), HasSubstr("not valid JSON")));
  // A file that is not a dataset (e.g. a symlink to a secret): the line, the position and the
  // reason, none of its text.
  spec = Spec(Write("secret.jsonl", "root:$6$s3cr3t-token$xyz:19000:0:99999:7:::\n"));
  std::string error = LoadError(spec, absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(error, HasSubstr("secret.jsonl line 1: not valid JSON (syntax error at byte"));
  EXPECT_THAT(error, Not(HasSubstr("s3cr3t")));
  EXPECT_THAT(error, Not(HasSubstr("root")));
  spec = Spec(Write("secret.safetensors", "root:$6$s3cr3t-token$xyz:19000:0:99999:7:::\n"));
  error = LoadError(spec, absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(error, HasSubstr("not a valid safetensors file"));
  EXPECT_THAT(error, Not(HasSubstr("header length")));  // the first 8 bytes, as a number
  spec = Spec(Write("values.jsonl", "{\"text\": [\"s3cr3t\"]}\n{\"input_ids\": \"s3cr3t\"}\n"));
  error = LoadError(spec, absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(error, HasSubstr("must be a string, got an array"));
  EXPECT_THAT(error, Not(HasSubstr("s3cr3t")));
  // Not an object.
  spec = Spec(Write("arr.jsonl", "[1, 2]\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("arr.jsonl line 1"), HasSubstr("must be a JSON object")));
  EXPECT_FALSE(CheckCalibrationSource(spec).ok());
  // No known key.
  spec = Spec(Write("nokey.jsonl", "{\"body\": \"x\"}\n"));
  EXPECT_THAT(
      LoadError(spec, absl::StatusCode::kInvalidArgument),
      AllOf(HasSubstr("nokey.jsonl line 1"), HasSubstr("\"input_ids\", \"messages\", \"text\"")));
  // Text that is not a string.
  spec = Spec(Write("num.jsonl", "{\"text\": 5}\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("line 1"), HasSubstr("\"text\" must be a string")));
  // Mixed formats.
  spec = Spec(Write("mixed.jsonl", "{\"text\": \"ab\"}\n\n{\"input_ids\": [1]}\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("mixed.jsonl line 3"), HasSubstr("input_ids sample"),
                    HasSubstr("line 1 is a text sample")));
  // Ids that are not integers or out of range.
  spec = Spec(Write("ids.jsonl", "{\"input_ids\": [1, 2.5]}\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("ids.jsonl line 1"), HasSubstr("input_ids[1] is a number"),
                    HasSubstr("not an integer")));
  spec = Spec(Write("ids2.jsonl", "{\"input_ids\": [1]}\n{\"input_ids\": [1, 99]}\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument, 50),
              AllOf(HasSubstr("ids2.jsonl line 2"), HasSubstr("token id 99 out of range"),
                    HasSubstr("[0, 50)")));
  spec = Spec(Write("neg.jsonl", "{\"input_ids\": [-1]}\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument), HasSubstr("token id -1"));
  // Tokenized text checked against the model vocab too.
  spec = Spec(TextDataset(3));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument, 10),
              AllOf(HasSubstr("line 1"), HasSubstr("tokenized text"), HasSubstr("token id 29")));
  // Text without a tokenizer.
  spec.tokenizer_path = "";
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("data.jsonl line 1"), HasSubstr("spec.tokenizer_path is empty")));
  EXPECT_EQ(CheckCalibrationSource(spec).code(), absl::StatusCode::kInvalidArgument);
  // A tokenizer that does not exist.
  spec.tokenizer_path = (dir_ / "nope.json").string();
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kNotFound), HasSubstr("nope.json"));
  EXPECT_EQ(CheckCalibrationSource(spec).code(), absl::StatusCode::kNotFound);
  // Bad messages.
  spec = Spec(Write("chat.jsonl", "{\"messages\": [{\"role\": \"user\"}]}\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("chat.jsonl line 1"), HasSubstr("messages[0]")));
  // No sample reaches the minimum length.
  spec = Spec(TextDataset(5));
  spec.min_sequence_length = 100;
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kFailedPrecondition),
              AllOf(HasSubstr("data.jsonl"), HasSubstr("no usable sample"),
                    HasSubstr("spec.min_sequence_length = 100")));
  EXPECT_TRUE(CheckCalibrationSource(spec).ok());  // the cheap check does not tokenize all
}

TEST_F(CalibrationTest, SpecValidation) {
  CalibrationSpec spec = Spec(TextDataset(3));
  spec.num_samples = 0;
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              HasSubstr("spec.num_samples = 0: must be > 0"));
  EXPECT_EQ(CheckCalibrationSource(spec).code(), absl::StatusCode::kInvalidArgument);
  spec = Spec(TextDataset(3));
  spec.max_sequence_length = -1;
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              HasSubstr("spec.max_sequence_length = -1"));
  spec = Spec(Write("data.csv", "a,b\n"));
  EXPECT_THAT(LoadError(spec, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("data.csv"), HasSubstr(".jsonl or .safetensors")));
  spec = Spec(TextDataset(3));
  EXPECT_TRUE(CheckCalibrationSource(spec).ok());
}

}  // namespace
}  // namespace mq::data
