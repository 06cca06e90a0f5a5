#include "worker/data/tiktoken_tokenizer.h"

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/data/calibration.h"
#include "worker/data/tokenizer.h"

namespace mq::data {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using Json = nlohmann::json;

// A ranks file: the 256 bytes ranked by value, then `merges` ranked 256, 257, ...
std::string Ranks(const std::vector<std::string>& merges) {
  std::string out;
  for (int b = 0; b < 256; ++b) {
    absl::StrAppend(&out, absl::Base64Escape(std::string(1, static_cast<char>(b))), " ", b, "\n");
  }
  int rank = 256;
  for (const std::string& m : merges) {
    absl::StrAppend(&out, absl::Base64Escape(m), " ", rank++, "\n");
  }
  return out;
}

TiktokenTokenizer Make(const std::vector<std::string>& merges, TiktokenOptions options = {}) {
  absl::StatusOr<TiktokenTokenizer> t = TiktokenTokenizer::Create(Ranks(merges), options);
  EXPECT_TRUE(t.ok()) << t.status();
  return *std::move(t);
}

std::vector<int32_t> Ids(const Tokenizer& t, const std::string& text, bool special = false) {
  absl::StatusOr<std::vector<int32_t>> ids = t.Encode(text, special);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

TEST(TiktokenTokenizerTest, MergesByLowestRank) {
  TiktokenTokenizer t = Make({"ab", "cd", "abcd", " a", "aa"});
  EXPECT_EQ(t.vocab_size(), 261);
  EXPECT_THAT(Ids(t, "abcd"), ElementsAre(258));  // the whole piece is a token
  // ab (256) first, then cd (257), then ab+cd (258); x stays a byte.
  EXPECT_THAT(Ids(t, "abcdx"), ElementsAre(258, 'x'));
  EXPECT_THAT(Ids(t, "aaa"), ElementsAre(260, 'a'));        // leftmost on a tie
  EXPECT_THAT(Ids(t, "bab"), ElementsAre('b', 256));        // "ba" has no rank
  EXPECT_THAT(Ids(t, " abz"), ElementsAre(' ', 256, 'z'));  // ab (256) before " a" (259)
  EXPECT_THAT(Ids(t, "x y"), ElementsAre('x', ' ', 'y'));
  EXPECT_THAT(Ids(t, ""), ElementsAre());
  EXPECT_EQ(t.TokenToId("abcd"), 258);
  EXPECT_EQ(t.TokenToId("zz"), std::nullopt);
}

TEST(TiktokenTokenizerTest, SpecialTokensAndBos) {
  TiktokenOptions o;
  o.special_tokens = {{"[BOS]", 300}, {"<|im_end|>", 301}, {"<|im_end|>x", 302}};
  o.bos_id = 300;
  TiktokenTokenizer t = Make({"ab"}, o);
  EXPECT_EQ(t.vocab_size(), 303);
  EXPECT_THAT(Ids(t, "ab<|im_end|>ab", true), ElementsAre(300, 256, 301, 256));
  EXPECT_THAT(Ids(t, "ab<|im_end|>ab", false), ElementsAre(256, 301, 256));
  EXPECT_THAT(Ids(t, "<|im_end|>x[BOS]"), ElementsAre(302, 300));  // longest at a position
  EXPECT_THAT(Ids(t, "<|im_end"), ElementsAre('<', '|', 'i', 'm', '_', 'e', 'n', 'd'));
  EXPECT_EQ(t.TokenToId("[BOS]"), 300);
  EXPECT_EQ(t.bos_id(), 300);
  absl::StatusOr<std::vector<int32_t>> bad = t.Encode("ok\xff", false);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("not valid UTF-8: bad byte 0xff at offset 2"));
}

TEST(TiktokenTokenizerTest, BadRanksNameTheLineNotTheContent) {
  const std::string good = Ranks({"ab"});
  struct Case {
    std::string ranks;
    std::string message;
  };
  const std::string secret = absl::Base64Escape("SECRET");
  std::vector<Case> cases = {
      {good + secret + "!! 900\n", "line 258: the token (10 characters) is not base64"},
      {good + secret + " 12\n", "line 258: rank 12 already given on line 13"},
      {good + "YWI= 900\n", "line 258: the same token bytes as line 257"},
      {good + secret + " -3\n", "line 258: the rank is not an integer"},
      {good + secret + " x\n", "line 258: the rank is not an integer"},
      {good + secret + "\n", "line 258: expected \"<base64 token> <rank>\", found 1 fields"},
      {good.substr(good.find('\n') + 1), "1 of the 256 single-byte tokens are missing (0x00)"},
      {"", "no ranks"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<TiktokenTokenizer> t = TiktokenTokenizer::Create(c.ranks, {});
    ASSERT_FALSE(t.ok()) << c.message;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(t.status().message(), HasSubstr(c.message));
    EXPECT_THAT(t.status().message(), Not(HasSubstr(secret)));
  }
  TiktokenOptions o;
  o.special_tokens = {{"[X]", 5}};
  EXPECT_THAT(TiktokenTokenizer::Create(good, o).status().message(),
              HasSubstr("special token \"[X]\": id 5 is also the rank on line 6"));
  o.special_tokens = {{"[X]", 300}, {"[Y]", 300}};
  EXPECT_THAT(TiktokenTokenizer::Create(good, o).status().message(), HasSubstr("share id 300"));
  o.special_tokens = {{"[X]", 300}};
  o.bos_id = 301;
  EXPECT_THAT(TiktokenTokenizer::Create(good, o).status().message(),
              HasSubstr("bos id 301 is not a special token's id"));
  o.bos_id.reset();
  o.pattern = "[a~~b]";
  EXPECT_THAT(TiktokenTokenizer::Create(good, o).status().message(),
              HasSubstr("pre-tokenizer pattern: pattern offset 2: symmetric difference"));
}

class TiktokenDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  std::string Write(const std::string& name, const std::string& contents) {
    std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }
  std::filesystem::path dir_;
};

TEST_F(TiktokenDirTest, KimiLayout) {
  Write("tiktoken.model", Ranks({"ab", "cd"}));  // 258 ranks: specials are [258, 514)
  Write("tokenizer_config.json", Json({{"added_tokens_decoder",
                                        {{"258", {{"content", "[BOS]"}, {"special", true}}},
                                         {"260", {{"content", "<|im_end|>"}}}}},
                                       {"bos_token", {{"content", "[BOS]"}}}})
                                     .dump());
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = LoadTokenizer(dir_.string());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->vocab_size(), 514);
  EXPECT_EQ((*t)->TokenToId("<|reserved_token_259|>"), 259);
  EXPECT_EQ((*t)->TokenToId("<|reserved_token_513|>"), 513);
  EXPECT_THAT(Ids(**t, "ab<|im_end|><|reserved_token_300|>cd", true),
              ElementsAre(258, 256, 260, 300, 257));
  // The ranks file itself, and a tokenizer_config.json without add_bos_token.
  Write("tokenizer_config.json", Json({{"bos_token", "[BOS]"}, {"add_bos_token", false}}).dump());
  t = LoadTokenizer((dir_ / "tiktoken.model").string());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(Ids(**t, "ab", true), ElementsAre(256));
}

TEST_F(TiktokenDirTest, KimiLayoutErrors) {
  const std::string ranks = Write("tiktoken.model", Ranks({"ab"}));
  const std::string config = (dir_ / "tokenizer_config.json").string();
  auto error = [&](const Json& j) {
    Write("tokenizer_config.json", j.dump());
    absl::StatusOr<TiktokenTokenizer> t = TiktokenTokenizer::FromModelFiles(ranks, config);
    EXPECT_FALSE(t.ok());
    return t.ok() ? std::string() : std::string(t.status().message());
  };
  EXPECT_THAT(error({{"added_tokens_decoder", {{"12", {{"content", "x"}}}}}}),
              AllOf(HasSubstr(config), HasSubstr("added_tokens_decoder[\"12\"]: id outside the "
                                                 "special-token range [257, 513)")));
  EXPECT_THAT(error({{"added_tokens_decoder", {{"257", {{"content", ""}}}}}}),
              HasSubstr("added_tokens_decoder[\"257\"].content must be a non-empty string"));
  EXPECT_THAT(error({{"bos_token", "<s>"}}),
              HasSubstr("bos_token = \"<s>\": not one of the special tokens"));
  EXPECT_THAT(error({{"pat_str", "[a"}}),
              AllOf(HasSubstr(config), HasSubstr("unclosed character class")));
  EXPECT_THAT(error(Json::array()), HasSubstr("not a JSON object"));
  std::filesystem::remove(config);
  absl::StatusOr<TiktokenTokenizer> t = TiktokenTokenizer::FromModelFiles(ranks, config);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(t.status().message(), HasSubstr("needs the tokenizer_config.json beside it"));
}

TEST_F(TiktokenDirTest, LoaderPicksByContent) {
  EXPECT_EQ(LoadTokenizer(dir_.string()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(LoadTokenizer(dir_.string()).status().message(),
              HasSubstr("neither tokenizer.json nor tiktoken.model"));
  EXPECT_EQ(LoadTokenizer((dir_ / "nope").string()).status().code(), absl::StatusCode::kNotFound);
  // tokenizer.json wins over tiktoken.model in a directory; a JSON file is a tokenizer.json.
  Write("tiktoken.model", Ranks({}));
  Write("tokenizer_config.json", "{}");
  Write("tokenizer.json", R"({"model": {"type": "WordPiece"}})");
  EXPECT_THAT(LoadTokenizer(dir_.string()).status().message(), HasSubstr("model.type"));
  std::filesystem::remove(dir_ / "tokenizer.json");
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = LoadTokenizer(dir_.string());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->vocab_size(), 256 + kKimiReservedSpecialTokens);
}

TEST_F(TiktokenDirTest, CalibrationTokenizesTextWithATiktokenDirectory) {
  Write("tiktoken.model", Ranks({"ab"}));  // 257 ranks: [BOS] is 257
  Write("tokenizer_config.json",
        Json({{"added_tokens_decoder", {{"257", {{"content", "[BOS]"}}}}}, {"bos_token", "[BOS]"}})
            .dump());
  CalibrationSpec spec;
  spec.dataset_path = Write("data.jsonl", "{\"text\": \"abab\"}\n{\"text\": \"ab[BOS]\"}\n");
  spec.tokenizer_path = dir_.string();
  spec.num_samples = 2;
  absl::StatusOr<CalibrationSet> set = LoadCalibration(spec, 514);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_THAT(set->samples, ::testing::UnorderedElementsAre(ElementsAre(257, 256, 256),
                                                            ElementsAre(257, 256, 257)));
  EXPECT_TRUE(CheckCalibrationSource(spec).ok());
  spec.tokenizer_path = (dir_ / "tiktoken.model").string();
  EXPECT_TRUE(LoadCalibration(spec, 514).ok());
}

}  // namespace
}  // namespace mq::data
