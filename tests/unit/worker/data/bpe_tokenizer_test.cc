#include "worker/data/bpe_tokenizer.h"

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace mq::data {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using Json = nlohmann::json;

// A character-level BPE tokenizer.json (no pre-tokenizer) over a..e and space, with `merges`.
Json TinyTokenizer(Json merges) {
  Json vocab = {{"a", 0},  {"b", 1},  {"c", 2},   {"d", 3},  {"e", 4},  {" ", 5},
                {"ab", 6}, {"bc", 7}, {"abc", 8}, {"aa", 9}, {"cd", 10}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", Json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", nullptr},
          {"post_processor", nullptr},
          {"decoder", nullptr},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", false},
            {"vocab", vocab},
            {"merges", merges}}}};
}

std::vector<int32_t> Encode(const Json& j, std::string_view text, bool special = true) {
  auto tok = BpeTokenizer::FromJson(j.dump());
  EXPECT_TRUE(tok.ok()) << tok.status();
  if (!tok.ok()) return {};
  auto ids = tok->Encode(text, special);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

// The message of a failed FromJson (checks the code is INVALID_ARGUMENT).
std::string LoadError(const Json& j) {
  auto tok = BpeTokenizer::FromJson(j.dump());
  if (tok.ok()) return "(loaded fine)";
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
  return std::string(tok.status().message());
}

TEST(BpeTokenizerTest, LowestRankMergeFirst) {
  // "b c" outranks "a b": abc -> a + bc, and "a bc" is not a merge.
  EXPECT_THAT(Encode(TinyTokenizer({"b c", "a b", "ab c"}), "abc"), ElementsAre(0, 7));
  // "a b" first: ab + c -> abc.
  EXPECT_THAT(Encode(TinyTokenizer({"a b", "b c", "ab c"}), "abc"), ElementsAre(8));
}

TEST(BpeTokenizerTest, LeftmostAmongEqualRanks) {
  EXPECT_THAT(Encode(TinyTokenizer({"a a"}), "aaa"), ElementsAre(9, 0));
  EXPECT_THAT(Encode(TinyTokenizer({"a a"}), "aaaa"), ElementsAre(9, 9));
}

TEST(BpeTokenizerTest, ListFormMergesEqualStringForm) {
  Json list = TinyTokenizer(Json::array({Json::array({"a", "b"}), Json::array({"ab", "c"})}));
  EXPECT_THAT(Encode(list, "abcab"), ElementsAre(8, 6));
  EXPECT_THAT(Encode(TinyTokenizer({"a b", "ab c"}), "abcab"), ElementsAre(8, 6));
}

TEST(BpeTokenizerTest, IgnoreMergesUsesWholeWordFromVocab) {
  Json j = TinyTokenizer({"c d"});  // "abc" is in the vocab but unreachable through merges
  EXPECT_THAT(Encode(j, "abc"), ElementsAre(0, 1, 2));
  j["model"]["ignore_merges"] = true;
  EXPECT_THAT(Encode(j, "abc"), ElementsAre(8));
}

TEST(BpeTokenizerTest, UnknownCharactersDroppedWithoutUnk) {
  EXPECT_THAT(Encode(TinyTokenizer({"a b"}), "axxb"), ElementsAre(6));  // a, b then merged
  Json j = TinyTokenizer({"a b"});
  j["model"]["unk_token"] = "e";
  EXPECT_THAT(Encode(j, "axxb"), ElementsAre(0, 4, 4, 1));
  j["model"]["fuse_unk"] = true;
  EXPECT_THAT(Encode(j, "axxb"), ElementsAre(0, 4, 1));
}

TEST(BpeTokenizerTest, AddedTokensSplitLongestFirst) {
  Json j = TinyTokenizer({"a b"});
  j["added_tokens"] = {{{"id", 20}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
                       {{"id", 21}, {"content", "<s>x"}, {"special", true}, {"normalized", false}},
                       {{"id", 22}, {"content", "cd"}, {"special", false}, {"normalized", true}}};
  EXPECT_THAT(Encode(j, "ab<s>ab"), ElementsAre(6, 20, 6));
  EXPECT_THAT(Encode(j, "<s>x<s>"), ElementsAre(21, 20));
  EXPECT_THAT(Encode(j, "acde"), ElementsAre(0, 22, 4));
  EXPECT_THAT(Encode(j, "<s"), ElementsAre());  // '<' and 's' are not in the vocab
  auto tok = BpeTokenizer::FromJson(j.dump());
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(tok->vocab_size(), 23);
  EXPECT_EQ(tok->TokenToId("<s>x"), 21);
  EXPECT_EQ(tok->TokenToId("abc"), 8);
  EXPECT_EQ(tok->TokenToId("zzz"), std::nullopt);
}

TEST(BpeTokenizerTest, AddedTokenStripAndSingleWord) {
  Json j = TinyTokenizer({"a b"});
  j["added_tokens"] = {
      {{"id", 30}, {"content", "d"}, {"lstrip", true}, {"rstrip", true}, {"normalized", false}},
      {{"id", 31}, {"content", "e"}, {"single_word", true}, {"normalized", false}}};
  EXPECT_THAT(Encode(j, "a  d  b"), ElementsAre(0, 30, 1));  // spaces absorbed by "d"
  EXPECT_THAT(Encode(j, "a e b"), ElementsAre(0, 5, 31, 5, 1));
  EXPECT_THAT(Encode(j, "aeb"), ElementsAre(0, 4, 1));  // not a single word: plain BPE
}

TEST(BpeTokenizerTest, TemplatePostProcessorOnlyWithSpecialTokens) {
  Json j = TinyTokenizer({"a b"});
  j["added_tokens"] = {{{"id", 40}, {"content", "<bos>"}, {"special", true}}};
  j["post_processor"] = Json::parse(R"({"type": "Sequence", "processors": [
      {"type": "ByteLevel", "trim_offsets": false},
      {"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                  {"Sequence": {"id": "A", "type_id": 0}}],
       "pair": [],
       "special_tokens": {"<bos>": {"id": "<bos>", "ids": [40], "tokens": ["<bos>"]}}}]})");
  EXPECT_THAT(Encode(j, "ab", true), ElementsAre(40, 6));
  EXPECT_THAT(Encode(j, "ab", false), ElementsAre(6));
  EXPECT_THAT(Encode(j, "", true), ElementsAre(40));
}

TEST(BpeTokenizerTest, ByteLevelMapsBytesAndPrefixesSpace) {
  Json j = TinyTokenizer({"Ġ a"});
  j["model"]["vocab"]["Ġ"] = 50;
  j["model"]["vocab"]["Ġa"] = 51;
  j["model"]["vocab"]["Ã"] = 52;  // byte 0xc3
  j["model"]["vocab"]["©"] = 53;  // byte 0xa9 (maps to itself)
  j["model"]["merges"] = {"Ġ a"};
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  EXPECT_THAT(Encode(j, "a a"), ElementsAre(51, 51));
  EXPECT_THAT(Encode(j, "é"), ElementsAre(50, 52, 53));  // " é" = 20 c3 a9
}

TEST(BpeTokenizerTest, SplitBehaviors) {
  Json j = TinyTokenizer({"a b", "b c"});
  auto with_split = [&](const char* behavior, bool invert) {
    Json k = j;
    k["pre_tokenizer"] = {{"type", "Split"},
                          {"pattern", {{"String", "b"}}},
                          {"behavior", behavior},
                          {"invert", invert}};
    return Encode(k, "abca");
  };
  EXPECT_THAT(with_split("Isolated", false), ElementsAre(0, 1, 2, 0));
  EXPECT_THAT(with_split("Removed", false), ElementsAre(0, 2, 0));
  EXPECT_THAT(with_split("MergedWithPrevious", false), ElementsAre(6, 2, 0));
  EXPECT_THAT(with_split("MergedWithNext", false), ElementsAre(0, 7, 0));
  EXPECT_THAT(with_split("Removed", true), ElementsAre(1));
}

TEST(BpeTokenizerTest, DigitsIndividual) {
  Json j = TinyTokenizer({"a b"});
  j["model"]["vocab"]["1"] = 60;
  j["model"]["vocab"]["11"] = 61;
  j["model"]["merges"] = {"1 1"};
  j["pre_tokenizer"] = {{"type", "Digits"}, {"individual_digits", true}};
  EXPECT_THAT(Encode(j, "111"), ElementsAre(60, 60, 60));
  j["pre_tokenizer"]["individual_digits"] = false;
  EXPECT_THAT(Encode(j, "111"), ElementsAre(61, 60));
}

TEST(BpeTokenizerTest, InvalidUtf8IsAnError) {
  auto tok = BpeTokenizer::FromJson(TinyTokenizer({"a b"}).dump());
  ASSERT_TRUE(tok.ok());
  auto ids = tok->Encode("ab\xff", true);
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ids.status().message(), AllOf(HasSubstr("not valid UTF-8"), HasSubstr("offset 2")));
  EXPECT_FALSE(tok->Encode("\xed\xa0\x80", true).ok());  // a surrogate
  EXPECT_FALSE(tok->Encode("\xc0\xaf", true).ok());      // overlong
}

TEST(BpeTokenizerTest, LoadErrorsNameThePathAndValue) {
  EXPECT_THAT(LoadError(Json::array()), HasSubstr("must be a JSON object"));
  auto not_json = BpeTokenizer::FromJson("{not json");
  EXPECT_THAT(not_json.status().message(), HasSubstr("not valid JSON"));
  // A JSON file that is not a tokenizer (e.g. a symlink to a secret) is described, not echoed.
  const std::string secret = "s3cr3t-" + std::string(60, 'x');
  EXPECT_THAT(LoadError(Json::array({secret, secret})),
              AllOf(HasSubstr("<array of 2>"), Not(HasSubstr("s3cr3t"))));
  EXPECT_THAT(LoadError(Json{{"model", secret}}),
              AllOf(HasSubstr("<string of 67 bytes>"), Not(HasSubstr("s3cr3t"))));

  Json j = TinyTokenizer({"a b"});
  j["normalizer"] = {{"type", "NFC"}};
  EXPECT_THAT(LoadError(j),
              AllOf(HasSubstr("normalizer.type"), HasSubstr("\"NFC\""), HasSubstr("supported")));

  j = TinyTokenizer({"a b"});
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {{{"type", "ByteLevel"}}, {{"type", "Metaspace"}}}}};
  EXPECT_THAT(LoadError(j), AllOf(HasSubstr("pre_tokenizer.pretokenizers[1].type"),
                                  HasSubstr("Metaspace"), HasSubstr("ByteLevel, Split")));

  j = TinyTokenizer({"a b"});
  j["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(a"}}}, {"behavior", "Isolated"}};
  EXPECT_THAT(LoadError(j),
              AllOf(HasSubstr("pre_tokenizer.pattern"), HasSubstr("not a valid regex")));

  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Sideways"}};
  EXPECT_THAT(LoadError(j), AllOf(HasSubstr("pre_tokenizer.behavior"), HasSubstr("Sideways"),
                                  HasSubstr("Isolated")));

  j = TinyTokenizer({"a z"});
  EXPECT_THAT(LoadError(j), AllOf(HasSubstr("model.merges[0]"), HasSubstr("\"z\""),
                                  HasSubstr("not in model.vocab")));
  j = TinyTokenizer({"ab"});
  EXPECT_THAT(LoadError(j), AllOf(HasSubstr("model.merges[0]"), HasSubstr("\"a b\"")));
  j = TinyTokenizer({"a b"});
  j["model"]["byte_fallback"] = true;
  EXPECT_THAT(LoadError(j), HasSubstr("model.byte_fallback"));
  j = TinyTokenizer({"a b"});
  j["model"]["type"] = "WordPiece";
  EXPECT_THAT(LoadError(j),
              AllOf(HasSubstr("model.type"), HasSubstr("WordPiece"), HasSubstr("BPE")));
  j = TinyTokenizer({"a b"});
  j["model"]["vocab"]["q"] = -1;
  EXPECT_THAT(LoadError(j), HasSubstr("model.vocab[\"q\"]"));
  j = TinyTokenizer({"a b"});
  j["post_processor"] = {{"type", "ChatTemplate"}};
  EXPECT_THAT(LoadError(j), AllOf(HasSubstr("post_processor.type"), HasSubstr("ChatTemplate"),
                                  HasSubstr("TemplateProcessing")));
  j = TinyTokenizer({"a b"});
  j["truncation"] = {{"max_length", 8}};
  EXPECT_THAT(LoadError(j), HasSubstr("truncation"));
  j = TinyTokenizer({"a b"});
  j["added_tokens"] = {{{"content", "<s>"}}};
  EXPECT_THAT(LoadError(j), HasSubstr("added_tokens[0]"));
  j = TinyTokenizer({"a b"});
  j.erase("model");
  EXPECT_THAT(LoadError(j), HasSubstr("model is missing"));
}

TEST(BpeTokenizerTest, FromFileMissingIsNotFoundAndNamesPath) {
  auto tok = BpeTokenizer::FromFile("/nonexistent/tokenizer.json");
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(tok.status().message(), HasSubstr("/nonexistent/tokenizer.json"));

  std::string path = ::testing::TempDir() + "/bad_tokenizer.json";
  std::ofstream(path) << TinyTokenizer({"a q"}).dump();
  tok = BpeTokenizer::FromFile(path);
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tok.status().message(), AllOf(HasSubstr(path), HasSubstr("model.merges[0]")));
}

}  // namespace
}  // namespace mq::data
