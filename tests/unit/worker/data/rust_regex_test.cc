#include "worker/data/rust_regex.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/data/text_internal.h"
#include "worker/data/tiktoken_tokenizer.h"

namespace mq::data {
namespace {

using ::testing::HasSubstr;

std::string Translate(const std::string& p) {
  absl::StatusOr<std::string> t = RustRegexToPcre2(p);
  EXPECT_TRUE(t.ok()) << p << ": " << t.status();
  return t.ok() ? *t : "";
}

// The pieces `pattern` (Rust syntax) cuts `text` into.
std::vector<std::string> Pieces(const std::string& pattern, const std::string& text) {
  absl::StatusOr<std::string> pcre2 = RustRegexToPcre2(pattern);
  EXPECT_TRUE(pcre2.ok()) << pcre2.status();
  auto regex = internal::Regex::Compile(*pcre2, "test");
  EXPECT_TRUE(regex.ok()) << regex.status();
  std::vector<std::pair<size_t, size_t>> found;
  EXPECT_TRUE((*regex)->FindAll(text, &found).ok());
  std::vector<std::string> out;
  for (auto [b, e] : found) out.push_back(text.substr(b, e - b));
  return out;
}

TEST(RustRegexTest, IntersectionBecomesALookahead) {
  EXPECT_EQ(Translate(R"([\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*)"),
            R"((?:(?=[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])[^\p{sc:Han}])*)");
  EXPECT_EQ(Translate(R"([a-z&&[^aeiou]])"), R"((?:(?=[a-z])[^aeiou]))");
  // Left-associative chains, and an operand of plain items on the right.
  EXPECT_EQ(Translate(R"([a-z&&[^x]&&b-y])"), R"((?:(?=(?:(?=[a-z])[^x]))[b-y]))");
}

TEST(RustRegexTest, DifferenceUnionAndNegation) {
  EXPECT_EQ(Translate(R"([a-z--[aeiou]])"), R"((?:(?![aeiou])[a-z]))");
  EXPECT_EQ(Translate(R"([a[bc]d])"), "[abcd]");
  EXPECT_EQ(Translate(R"([a[^bc]])"), "(?:[a]|[^bc])");
  EXPECT_EQ(Translate(R"([^a-z&&[^x]])"), R"((?:(?!(?:(?=[a-z])[^x]))(?s:.)))");
  EXPECT_EQ(Translate(R"([^[ab]])"), "[^ab]");
  EXPECT_EQ(Translate(R"([]a])"), R"([\]a])");
  EXPECT_EQ(Translate(R"([-a-])"), R"([\-a\-])");
  EXPECT_EQ(Translate(R"([a&b])"), "[a&b]");
}

TEST(RustRegexTest, PropertiesAndEscapes) {
  EXPECT_EQ(Translate(R"(\p{Han}\p{L}\pN\P{Greek}\p{White_Space}\p{Alphabetic})"),
            R"(\p{sc:Han}\p{L}\p{N}\P{sc:Greek}\p{White_Space}\p{Alphabetic})");
  EXPECT_EQ(Translate(R"(\p{Script=Latin}\p{scx:Hira}\p{gc=Lu})"),
            R"(\p{sc:Latin}\p{scx:Hira}\p{Lu})");
  EXPECT_EQ(Translate(R"(\s\S\d[\s\d])"),
            R"(\p{White_Space}\P{White_Space}\p{Nd}[\p{White_Space}\p{Nd}])");
  EXPECT_EQ(Translate(R"(\u{4E00}\x41\u00e9\v)"), R"(\x{4e00}\x{41}\x{e9}\x{b})");
  EXPECT_EQ(Translate(R"((?i:'s|'t)\s+(?!\S))"),
            R"((?i:'s|'t)\p{White_Space}+(?!\P{White_Space}))");
}

TEST(RustRegexTest, RefusesWhatItCannotTranslate) {
  for (const auto& [pattern, message] : std::vector<std::pair<std::string, std::string>>{
           {"[a~~b]", "symmetric difference"},
           {"[[:alpha:]]", "POSIX classes"},
           {"[ab", "unclosed character class"},
           {R"(\q)", "unsupported escape \\q"},
           {"[&&a]", "empty operand"},
           {"[a&&]", "empty operand"},
           {R"(\p{Foo=Bar})", "unsupported property key"},
           {R"(\x{110000})", "hexadecimal"},
           {R"(x\)", "lone backslash"}}) {
    absl::StatusOr<std::string> t = RustRegexToPcre2(pattern);
    ASSERT_FALSE(t.ok()) << pattern;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(t.status().message(), HasSubstr(message)) << pattern;
    EXPECT_THAT(t.status().message(), HasSubstr("pattern offset")) << pattern;
  }
}

TEST(RustRegexTest, KimiPatternSplitsLikeTiktoken) {
  // Han runs are their own pieces; CJK punctuation (Script=Common, though its
  // Script_Extensions include Han) is not Han; kana are letters of the other alternatives.
  EXPECT_EQ(Pieces(kKimiK2Pattern, "Hello中文"), (std::vector<std::string>{"Hello", "中文"}));
  EXPECT_EQ(Pieces(kKimiK2Pattern, "中文、测试。"),
            (std::vector<std::string>{"中文", "、", "测试", "。"}));
  EXPECT_EQ(Pieces(kKimiK2Pattern, "東京タワー"), (std::vector<std::string>{"東京", "タワー"}));
  EXPECT_EQ(Pieces(kKimiK2Pattern, "HTTPServer I'M x123456"),
            (std::vector<std::string>{"HTTPServer", " I'M", " x", "123", "456"}));
  EXPECT_EQ(Pieces(kKimiK2Pattern, "a  \n\n b"), (std::vector<std::string>{"a", "  \n\n", " b"}));
}

}  // namespace
}  // namespace mq::data
