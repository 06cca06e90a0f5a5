#include "worker/data/bpe_tokenizer.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <map>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"
#include "worker/data/text_internal.h"

namespace mq::data {
namespace {

using Json = nlohmann::json;
using internal::AppendUtf8;
using internal::DecodeAt;
using internal::IsWhiteSpace;
using internal::Regex;
using internal::Utf8Len;

// Compiles a tokenizer.json regex (Oniguruma syntax) with PCRE2.
absl::StatusOr<std::shared_ptr<const Regex>> CompileOniguruma(const std::string& pattern,
                                                              const std::string& where) {
  return Regex::Compile(internal::ToPcre2Syntax(pattern), where);
}

// The GPT-2 pre-tokenization regex used by ByteLevel(use_regex=true).
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// Rust regex's Unicode `\w` (used by tokenizers for single_word added tokens).
constexpr char kWordCharPattern[] = R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])";
// Entries kept in the word cache before it is cleared (bounds memory on huge corpora).
constexpr size_t kMaxCacheEntries = 1 << 20;

// GPT-2's bytes_to_unicode(): the printable stand-in (UTF-8) of every byte.
const std::array<std::string, 256>& ByteToUnicode() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
      uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      AppendUtf8(cp, &t[b]);
    }
    return t;
  }();
  return table;
}

// ---- pipeline pieces ----------------------------------------------------------------------

// A piece of the input during pre-tokenization; `id >= 0` marks an extracted added token.
struct Piece {
  std::string text;
  int32_t id = -1;
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizer {
  enum class Kind { kByteLevel, kSplit } kind = Kind::kSplit;
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = false;         // ByteLevel
  std::shared_ptr<const Regex> regex;
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// Added tokens of one kind (normalized or not), matched leftmost-longest.
struct AddedMatcher {
  std::vector<AddedToken> tokens;
  internal::LiteralMatcher literals;  // content -> index in tokens

  void Build() {
    for (int i = 0; i < static_cast<int>(tokens.size()); ++i) literals.Add(tokens[i].content, i);
    literals.Finish();
  }
  bool empty() const { return tokens.empty(); }
};

// One post-processor step for a single sequence: ids before and after (with special tokens).
struct PostStep {
  std::vector<int32_t> prefix, suffix;
};

// A value in an error message. Short strings and scalars (token names, "type" values) are
// quoted; arrays, objects and long strings are described by type and size only, so a file that
// is not a tokenizer (e.g. a symlink to a secret) is not echoed into the job's events.
std::string Quote(const Json& j) {
  constexpr size_t kMaxQuotedString = 40;
  switch (j.type()) {
    case Json::value_t::string: {
      const std::string& s = j.get_ref<const std::string&>();
      if (s.size() <= kMaxQuotedString) return j.dump();
      return absl::StrCat("<string of ", s.size(), " bytes>");
    }
    case Json::value_t::array:
      return absl::StrCat("<array of ", j.size(), ">");
    case Json::value_t::object:
      return absl::StrCat("<object of ", j.size(), " keys>");
    default:
      return j.dump();
  }
}

absl::Status Unsupported(const std::string& path, const Json& value, const std::string& allowed) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, " = ", Quote(value), ": unsupported; supported: ", allowed));
}

absl::StatusOr<bool> GetBool(const Json& obj, const std::string& path, const char* key,
                             bool fallback) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ".", key, " = ", Quote(*it), ": must be true or false"));
  }
  return it->get<bool>();
}

absl::StatusOr<std::string> GetType(const Json& obj, const std::string& path) {
  if (!obj.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " = ", Quote(obj), ": must be an object or null"));
  }
  auto it = obj.find("type");
  if (it == obj.end() || !it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ".type is missing or not a string"));
  }
  return it->get<std::string>();
}

}  // namespace

struct BpeTokenizer::Impl {
  absl::flat_hash_map<std::string, int32_t> vocab;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a,b) -> (rank, new id)
  bool ignore_merges = false;
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  AddedMatcher raw_added;         // normalized = false: matched on the input text
  AddedMatcher normalized_added;  // normalized = true: matched after the (identity) normalizer
  absl::flat_hash_map<std::string, int32_t> added_by_content;
  std::vector<PreTokenizer> pre_tokenizers;  // Sequence flattened
  std::vector<PostStep> post_steps;
  std::shared_ptr<const Regex> word_char;  // Rust `\w`
  int64_t vocab_size = 0;

  mutable absl::Mutex cache_mu;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache ABSL_GUARDED_BY(cache_mu);

  absl::Status ParseAddedTokens(const Json& root);
  absl::Status ParseNormalizer(const Json& j, const std::string& path);
  absl::Status ParsePreTokenizer(const Json& j, const std::string& path);
  absl::Status ParseModel(const Json& j);
  absl::Status ParsePostProcessor(const Json& j, const std::string& path);
  absl::StatusOr<int32_t> SpecialId(const Json& token, const std::string& path) const;

  void SplitAdded(const AddedMatcher& m, std::vector<Piece>* pieces) const;
  absl::Status ApplyPreTokenizer(const PreTokenizer& p, std::vector<Piece>* pieces) const;
  void BpeWord(const std::string& word, std::vector<int32_t>* out) const;
};

// ---- JSON parsing -------------------------------------------------------------------------

absl::Status BpeTokenizer::Impl::ParseAddedTokens(const Json& root) {
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("added_tokens = ", Quote(*it), ": must be an array"));
  }
  for (size_t i = 0; i < it->size(); ++i) {
    const Json& t = (*it)[i];
    std::string path = absl::StrCat("added_tokens[", i, "]");
    if (!t.is_object() || !t.contains("content") || !t["content"].is_string() ||
        !t.contains("id") || !t["id"].is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, " = ", Quote(t), ": must be an object with string content and integer id"));
    }
    AddedToken token;
    token.content = t["content"].get<std::string>();
    int64_t id = t["id"].get<int64_t>();
    if (id < 0 || id > INT32_MAX) {
      return absl::InvalidArgumentError(absl::StrCat(path, ".id = ", id, ": must be in [0, 2^31)"));
    }
    if (internal::FindInvalidUtf8(token.content) != std::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat(path, ".content is not valid UTF-8"));
    }
    token.id = static_cast<int32_t>(id);
    auto b = GetBool(t, path, "lstrip", false);
    if (!b.ok()) return b.status();
    token.lstrip = *b;
    if (b = GetBool(t, path, "rstrip", false); !b.ok()) return b.status();
    token.rstrip = *b;
    if (b = GetBool(t, path, "single_word", false); !b.ok()) return b.status();
    token.single_word = *b;
    bool special = false;
    if (b = GetBool(t, path, "special", false); !b.ok()) return b.status();
    special = *b;
    // tokenizers' AddedToken default: normalized = !special.
    if (b = GetBool(t, path, "normalized", !special); !b.ok()) return b.status();
    token.normalized = *b;
    added_by_content[token.content] = token.id;
    vocab_size = std::max<int64_t>(vocab_size, token.id + 1);
    (token.normalized ? normalized_added : raw_added).tokens.push_back(std::move(token));
  }
  raw_added.Build();
  normalized_added.Build();
  return absl::OkStatus();
}

absl::Status BpeTokenizer::Impl::ParseNormalizer(const Json& j, const std::string& path) {
  if (j.is_null()) return absl::OkStatus();
  auto type = GetType(j, path);
  if (!type.ok()) return type.status();
  if (*type == "Sequence") {
    const Json& list = j.value("normalizers", Json::array());
    if (!list.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ".normalizers = ", Quote(list), ": must be an array"));
    }
    for (size_t i = 0; i < list.size(); ++i) {
      if (auto s = ParseNormalizer(list[i], absl::StrCat(path, ".normalizers[", i, "]")); !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }
  return Unsupported(absl::StrCat(path, ".type"), *type,
                     "null or an empty Sequence (no normalization; NFC and other normalizers "
                     "are not implemented)");
}

absl::Status BpeTokenizer::Impl::ParsePreTokenizer(const Json& j, const std::string& path) {
  if (j.is_null()) return absl::OkStatus();
  auto type = GetType(j, path);
  if (!type.ok()) return type.status();
  if (*type == "Sequence") {
    const Json& list = j.value("pretokenizers", Json::array());
    if (!list.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ".pretokenizers = ", Quote(list), ": must be an array"));
    }
    for (size_t i = 0; i < list.size(); ++i) {
      if (auto s = ParsePreTokenizer(list[i], absl::StrCat(path, ".pretokenizers[", i, "]"));
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }
  PreTokenizer p;
  if (*type == "ByteLevel") {
    p.kind = PreTokenizer::Kind::kByteLevel;
    auto b = GetBool(j, path, "add_prefix_space", true);
    if (!b.ok()) return b.status();
    p.add_prefix_space = *b;
    if (b = GetBool(j, path, "use_regex", true); !b.ok()) return b.status();
    p.use_regex = *b;
    if (p.use_regex) {
      auto re = CompileOniguruma(kGpt2Pattern, "ByteLevel regex");
      if (!re.ok()) return re.status();
      p.regex = *re;
      p.behavior = Behavior::kIsolated;
    }
  } else if (*type == "Split") {
    const Json& pattern = j.value("pattern", Json());
    std::string regex;
    if (pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string()) {
      regex = pattern["Regex"].get<std::string>();
    } else if (pattern.is_object() && pattern.contains("String") && pattern["String"].is_string()) {
      std::string literal = pattern["String"].get<std::string>();
      // An empty String pattern never matches (tokenizers); \Q..\E quotes the rest.
      regex = literal.empty() ? "(?!)" : absl::StrCat("\\Q", literal, "\\E");
      if (literal.find("\\E") != std::string::npos) {
        return Unsupported(path + ".pattern.String", pattern["String"],
                           "literal patterns without the two characters \\E");
      }
    } else {
      return Unsupported(path + ".pattern", pattern, "{\"Regex\": string} or {\"String\": string}");
    }
    auto re = CompileOniguruma(regex, path + ".pattern");
    if (!re.ok()) return re.status();
    p.regex = *re;
    const Json& behavior = j.value("behavior", Json());
    static const std::map<std::string, Behavior> kBehaviors = {
        {"Removed", Behavior::kRemoved},
        {"Isolated", Behavior::kIsolated},
        {"MergedWithPrevious", Behavior::kMergedWithPrevious},
        {"MergedWithNext", Behavior::kMergedWithNext},
        {"Contiguous", Behavior::kContiguous}};
    auto bit =
        behavior.is_string() ? kBehaviors.find(behavior.get<std::string>()) : kBehaviors.end();
    if (bit == kBehaviors.end()) {
      return Unsupported(path + ".behavior", behavior,
                         "Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
    }
    p.behavior = bit->second;
    auto b = GetBool(j, path, "invert", false);
    if (!b.ok()) return b.status();
    p.invert = *b;
  } else if (*type == "Digits") {
    auto b = GetBool(j, path, "individual_digits", false);
    if (!b.ok()) return b.status();
    auto re = CompileOniguruma("\\p{N}", "Digits regex");
    if (!re.ok()) return re.status();
    p.regex = *re;
    p.behavior = *b ? Behavior::kIsolated : Behavior::kContiguous;
  } else {
    return Unsupported(path + ".type", *type, "ByteLevel, Split, Digits, Sequence (or null)");
  }
  pre_tokenizers.push_back(std::move(p));
  return absl::OkStatus();
}

absl::Status BpeTokenizer::Impl::ParseModel(const Json& m) {
  if (!m.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("model = ", Quote(m), ": must be an object"));
  }
  std::string type = m.value("type", std::string(m.contains("merges") ? "BPE" : ""));
  if (type != "BPE") return Unsupported("model.type", type, "BPE");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix", "dropout"}) {
    auto it = m.find(key);
    if (it != m.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
      return Unsupported(absl::StrCat("model.", key), *it, "null");
    }
  }
  auto b = GetBool(m, "model", "byte_fallback", false);
  if (!b.ok()) return b.status();
  if (*b) return Unsupported("model.byte_fallback", true, "false");
  if (b = GetBool(m, "model", "ignore_merges", false); !b.ok()) return b.status();
  ignore_merges = *b;
  if (b = GetBool(m, "model", "fuse_unk", false); !b.ok()) return b.status();
  fuse_unk = *b;

  const Json& v = m.value("vocab", Json());
  if (!v.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.vocab = ", Quote(v), ": must be an object {token: id}"));
  }
  vocab.reserve(v.size());
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > INT32_MAX) {
      return absl::InvalidArgumentError(absl::StrCat("model.vocab[", Quote(it.key()),
                                                     "] = ", Quote(it.value()),
                                                     ": must be an integer in [0, 2^31)"));
    }
    int32_t id = it.value().get<int32_t>();
    vocab[it.key()] = id;
    vocab_size = std::max<int64_t>(vocab_size, id + 1);
  }
  const Json& unk = m.value("unk_token", Json());
  if (unk.is_string()) {
    auto it = vocab.find(unk.get<std::string>());
    if (it == vocab.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.unk_token = ", Quote(unk), ": not in model.vocab"));
    }
    unk_id = it->second;
  } else if (!unk.is_null()) {
    return Unsupported("model.unk_token", unk, "a string or null");
  }

  const Json& merge_list = m.value("merges", Json::array());
  if (!merge_list.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.merges = ", Quote(merge_list), ": must be an array"));
  }
  merges.reserve(merge_list.size());
  for (size_t i = 0; i < merge_list.size(); ++i) {
    const Json& e = merge_list[i];
    std::string a, bb;
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      size_t space = s.find(' ');
      if (space == std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(
            "model.merges[", i, "] = ", Quote(e), ": must be \"a b\" (two tokens, one space)"));
      }
      a = s.substr(0, space);
      bb = s.substr(space + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      bb = e[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("model.merges[", i, "] = ", Quote(e),
                                                     ": must be \"a b\" or [\"a\", \"b\"]"));
    }
    auto ia = vocab.find(a), ib = vocab.find(bb), inew = vocab.find(a + bb);
    for (const std::string& token : {a, bb, a + bb}) {
      if (!vocab.contains(token)) {
        return absl::InvalidArgumentError(absl::StrCat("model.merges[", i, "] = ", Quote(e),
                                                       ": token ", Quote(token),
                                                       " is not in model.vocab"));
      }
    }
    uint64_t key = (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint32_t>(ib->second);
    merges[key] = {static_cast<int32_t>(i), inew->second};  // a later duplicate wins
  }
  return absl::OkStatus();
}

absl::StatusOr<int32_t> BpeTokenizer::Impl::SpecialId(const Json& token,
                                                      const std::string& path) const {
  // Roberta/Bert processors store [content, id].
  if (!token.is_array() || token.size() != 2 || !token[1].is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " = ", Quote(token), ": must be [token, id]"));
  }
  return token[1].get<int32_t>();
}

absl::Status BpeTokenizer::Impl::ParsePostProcessor(const Json& j, const std::string& path) {
  if (j.is_null()) return absl::OkStatus();
  auto type = GetType(j, path);
  if (!type.ok()) return type.status();
  if (*type == "Sequence") {
    const Json& list = j.value("processors", Json::array());
    if (!list.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ".processors = ", Quote(list), ": must be an array"));
    }
    for (size_t i = 0; i < list.size(); ++i) {
      if (auto s = ParsePostProcessor(list[i], absl::StrCat(path, ".processors[", i, "]"));
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }
  if (*type == "ByteLevel") return absl::OkStatus();  // only offsets change
  if (*type == "RobertaProcessing" || *type == "BertProcessing") {
    auto cls = SpecialId(j.value("cls", Json()), path + ".cls");
    if (!cls.ok()) return cls.status();
    auto sep = SpecialId(j.value("sep", Json()), path + ".sep");
    if (!sep.ok()) return sep.status();
    post_steps.push_back(PostStep{{*cls}, {*sep}});
    return absl::OkStatus();
  }
  if (*type == "TemplateProcessing") {
    const Json& single = j.value("single", Json());
    const Json& specials = j.value("special_tokens", Json::object());
    if (!single.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ".single = ", Quote(single), ": must be an array"));
    }
    PostStep step;
    bool seen_a = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const Json& item = single[i];
      std::string ipath = absl::StrCat(path, ".single[", i, "]");
      if (item.is_object() && item.contains("Sequence")) {
        const Json& id = item["Sequence"].value("id", Json());
        if (id != "A" || seen_a) {
          return Unsupported(ipath + ".Sequence.id", id, "one \"A\" in the single template");
        }
        seen_a = true;
      } else if (item.is_object() && item.contains("SpecialToken")) {
        const Json& name = item["SpecialToken"].value("id", Json());
        if (!name.is_string() || !specials.is_object() ||
            !specials.contains(name.get<std::string>())) {
          return absl::InvalidArgumentError(absl::StrCat(ipath, ".SpecialToken.id = ", Quote(name),
                                                         ": not in ", path, ".special_tokens"));
        }
        const Json& ids = specials[name.get<std::string>()].value("ids", Json());
        if (!ids.is_array()) {
          return absl::InvalidArgumentError(absl::StrCat(
              path, ".special_tokens[", Quote(name), "].ids = ", Quote(ids), ": must be an array"));
        }
        for (const Json& id : ids) {
          if (!id.is_number_integer()) {
            return absl::InvalidArgumentError(absl::StrCat(
                path, ".special_tokens[", Quote(name), "].ids: ", Quote(id), " is not an integer"));
          }
          (seen_a ? step.suffix : step.prefix).push_back(id.get<int32_t>());
        }
      } else {
        return Unsupported(ipath, item, "{\"Sequence\": ...} or {\"SpecialToken\": ...}");
      }
    }
    if (!seen_a) {
      return absl::InvalidArgumentError(absl::StrCat(path, ".single = ", Quote(single),
                                                     ": has no {\"Sequence\": {\"id\": \"A\"}}"));
    }
    post_steps.push_back(std::move(step));
    return absl::OkStatus();
  }
  return Unsupported(path + ".type", *type,
                     "ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing, Sequence "
                     "(or null)");
}

// ---- encoding -----------------------------------------------------------------------------

// tokenizers' AddedVocabulary::find_matches + split_with_indices, on each untokenized piece.
void BpeTokenizer::Impl::SplitAdded(const AddedMatcher& m, std::vector<Piece>* pieces) const {
  if (m.empty()) return;
  std::vector<Piece> out;
  out.reserve(pieces->size());
  for (Piece& piece : *pieces) {
    if (piece.id >= 0) {
      out.push_back(std::move(piece));
      continue;
    }
    const std::string& s = piece.text;
    size_t start_offset = 0;
    auto emit = [&](size_t b, size_t e, int32_t id) {
      if (e > b) out.push_back(Piece{s.substr(b, e - b), id});
    };
    size_t pos = 0;
    while (pos < s.size()) {
      std::optional<std::pair<int32_t, size_t>> hit = m.literals.LongestAt(s, pos);
      const AddedToken* found = hit ? &m.tokens[hit->first] : nullptr;
      if (found == nullptr) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = pos + found->content.size();
      pos = stop;  // non-overlapping, like aho-corasick's find_iter
      if (start < start_offset) continue;
      if (found->single_word) {
        bool start_space = start == 0;
        if (!start_space) {
          size_t prev = start - 1;
          while ((static_cast<unsigned char>(s[prev]) & 0xc0) == 0x80) --prev;
          start_space = !word_char->MatchesAt(s, prev);
        }
        bool stop_space = stop == s.size() || !word_char->MatchesAt(s, stop);
        if (!start_space || !stop_space) continue;
      }
      if (found->lstrip) {
        size_t new_start = start;
        while (new_start > 0) {
          size_t prev = new_start - 1;
          while ((static_cast<unsigned char>(s[prev]) & 0xc0) == 0x80) --prev;
          if (!IsWhiteSpace(DecodeAt(s, prev))) break;
          new_start = prev;
        }
        start = std::max(new_start, start_offset);
      }
      if (found->rstrip) {
        while (stop < s.size() && IsWhiteSpace(DecodeAt(s, stop))) {
          stop += Utf8Len(static_cast<unsigned char>(s[stop]));
        }
        pos = std::max(pos, stop);
      }
      emit(start_offset, start, -1);
      emit(start, stop, found->id);
      start_offset = stop;
    }
    emit(start_offset, s.size(), -1);
  }
  *pieces = std::move(out);
}

absl::Status BpeTokenizer::Impl::ApplyPreTokenizer(const PreTokenizer& p,
                                                   std::vector<Piece>* pieces) const {
  std::vector<Piece> out;
  out.reserve(pieces->size());
  std::vector<std::pair<size_t, size_t>> found;
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> matches;  // (offsets, is_match)
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> splits;   // (offsets, remove)
  for (Piece& piece : *pieces) {
    if (piece.id >= 0) {
      out.push_back(std::move(piece));
      continue;
    }
    std::string s = std::move(piece.text);
    if (p.kind == PreTokenizer::Kind::kByteLevel && p.add_prefix_space && !s.empty() &&
        s[0] != ' ') {
      s.insert(s.begin(), ' ');
    }
    if (p.regex == nullptr) {  // ByteLevel without regex: the piece stays whole
      if (!s.empty()) out.push_back(Piece{std::move(s), -1});
      continue;
    }
    // Pattern::find_matches: the whole string as alternating (offsets, is_match) ranges.
    matches.clear();
    if (s.empty()) {
      matches.push_back({{0, 0}, false});
    } else {
      if (auto st = p.regex->FindAll(s, &found); !st.ok()) return st;
      size_t prev = 0;
      for (auto [b, e] : found) {
        if (prev != b) matches.push_back({{prev, b}, false});
        matches.push_back({{b, e}, true});
        prev = e;
      }
      if (prev != s.size()) matches.push_back({{prev, s.size()}, false});
    }
    if (p.invert) {
      for (auto& m : matches) m.second = !m.second;
    }
    // NormalizedString::split with the delimiter behavior.
    splits.clear();
    switch (p.behavior) {
      case Behavior::kIsolated:
        for (auto& m : matches) splits.push_back({m.first, false});
        break;
      case Behavior::kRemoved:
        splits = matches;
        break;
      case Behavior::kContiguous: {
        std::optional<bool> previous;
        for (auto& m : matches) {
          if (previous == m.second && !splits.empty()) {
            splits.back().first.second = m.first.second;
          } else {
            splits.push_back({m.first, false});
          }
          previous = m.second;
        }
        break;
      }
      case Behavior::kMergedWithPrevious: {
        bool previous = false;
        for (auto& m : matches) {
          if (m.second && !previous && !splits.empty()) {
            splits.back().first.second = m.first.second;
          } else {
            splits.push_back({m.first, false});
          }
          previous = m.second;
        }
        break;
      }
      case Behavior::kMergedWithNext: {
        bool previous = false;
        for (auto it = matches.rbegin(); it != matches.rend(); ++it) {
          if (it->second && !previous && !splits.empty()) {
            splits.back().first.first = it->first.first;
          } else {
            splits.push_back({it->first, false});
          }
          previous = it->second;
        }
        std::reverse(splits.begin(), splits.end());
        break;
      }
    }
    for (auto& [range, remove] : splits) {
      if (remove || range.second <= range.first) continue;
      out.push_back(Piece{s.substr(range.first, range.second - range.first), -1});
    }
  }
  if (p.kind == PreTokenizer::Kind::kByteLevel) {
    const auto& table = ByteToUnicode();
    for (Piece& piece : out) {
      if (piece.id >= 0) continue;
      std::string mapped;
      mapped.reserve(piece.text.size() * 2);
      for (char c : piece.text) mapped += table[static_cast<unsigned char>(c)];
      piece.text = std::move(mapped);
    }
  }
  *pieces = std::move(out);
  return absl::OkStatus();
}

// tokenizers' BPE::merge_word + Word::merge_all (no dropout).
void BpeTokenizer::Impl::BpeWord(const std::string& w, std::vector<int32_t>* out) const {
  if (w.empty()) return;
  if (ignore_merges) {
    if (auto it = vocab.find(w); it != vocab.end()) {
      out->push_back(it->second);
      return;
    }
  }
  {
    absl::MutexLock lock(&cache_mu);
    if (auto it = cache.find(w); it != cache.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  struct Symbol {
    int32_t c;
    int prev, next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(w.size());
  auto add = [&](int32_t id) {
    int n = static_cast<int>(symbols.size());
    if (n > 0) symbols[n - 1].next = n;
    symbols.push_back(Symbol{id, n - 1, -1, true});
  };
  int32_t pending_unk = -1;  // an unknown character not yet emitted (fused when fuse_unk)
  for (size_t i = 0; i < w.size();) {
    size_t len = Utf8Len(static_cast<unsigned char>(w[i]));
    auto it = vocab.find(w.substr(i, len));
    if (it != vocab.end()) {
      if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
      add(it->second);
    } else if (unk_id) {
      if (pending_unk >= 0 && !fuse_unk) add(pending_unk);
      pending_unk = *unk_id;
    }
    i += len;
  }
  if (pending_unk >= 0) add(pending_unk);

  struct Merge {
    int pos;
    int32_t rank, new_id;
    bool operator<(const Merge& o) const {  // max-heap: lowest rank, then lowest pos on top
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  auto lookup = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges.find((static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b));
    return it == merges.end() ? nullptr : &it->second;
  };
  std::priority_queue<Merge> queue;
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) {
    if (auto* m = lookup(symbols[i].c, symbols[i + 1].c)) queue.push({i, m->first, m->second});
  }
  while (!queue.empty()) {
    Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (!cur.alive || cur.next == -1) continue;
    int next_pos = cur.next;
    Symbol right = symbols[next_pos];
    auto* m = lookup(cur.c, right.c);
    if (m == nullptr || m->second != top.new_id) continue;  // stale entry
    cur.c = top.new_id;
    cur.next = right.next;
    symbols[next_pos].alive = false;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (auto* pm = lookup(symbols[cur.prev].c, cur.c)) {
        queue.push({cur.prev, pm->first, pm->second});
      }
    }
    if (cur.next >= 0) {
      if (auto* nm = lookup(cur.c, symbols[cur.next].c)) {
        queue.push({top.pos, nm->first, nm->second});
      }
    }
  }
  std::vector<int32_t> ids;
  for (const Symbol& s : symbols) {
    if (s.alive) ids.push_back(s.c);
  }
  out->insert(out->end(), ids.begin(), ids.end());
  absl::MutexLock lock(&cache_mu);
  if (cache.size() >= kMaxCacheEntries) cache.clear();
  cache.emplace(w, std::move(ids));
}

// ---- public API ---------------------------------------------------------------------------

BpeTokenizer::BpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BpeTokenizer::BpeTokenizer(BpeTokenizer&&) noexcept = default;
BpeTokenizer& BpeTokenizer::operator=(BpeTokenizer&&) noexcept = default;
BpeTokenizer::~BpeTokenizer() = default;

absl::StatusOr<BpeTokenizer> BpeTokenizer::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("tokenizer ", path, ": cannot open for reading"));
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  auto tok = FromJson(buffer.str());
  if (!tok.ok()) {
    return absl::Status(tok.status().code(),
                        absl::StrCat("tokenizer ", path, ": ", tok.status().message()));
  }
  return tok;
}

absl::StatusOr<BpeTokenizer> BpeTokenizer::FromJson(std::string_view json) {
  Json root = Json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError("not valid JSON (expected a tokenizer.json object)");
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("top level = ", Quote(root), ": must be a JSON object"));
  }
  auto impl = std::make_unique<Impl>();
  auto word = CompileOniguruma(kWordCharPattern, "word-character regex");
  if (!word.ok()) return word.status();
  impl->word_char = *word;
  for (const char* key : {"truncation", "padding"}) {
    if (auto it = root.find(key); it != root.end() && !it->is_null()) {
      return Unsupported(key, *it, "null (truncation and padding are applied by the caller)");
    }
  }
  if (!root.contains("model")) return absl::InvalidArgumentError("model is missing");
  if (auto s = impl->ParseModel(root["model"]); !s.ok()) return s;
  if (auto s = impl->ParseAddedTokens(root); !s.ok()) return s;
  if (auto s = impl->ParseNormalizer(root.value("normalizer", Json()), "normalizer"); !s.ok()) {
    return s;
  }
  if (auto s = impl->ParsePreTokenizer(root.value("pre_tokenizer", Json()), "pre_tokenizer");
      !s.ok()) {
    return s;
  }
  if (auto s = impl->ParsePostProcessor(root.value("post_processor", Json()), "post_processor");
      !s.ok()) {
    return s;
  }
  return BpeTokenizer(std::move(impl));
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(std::string_view text,
                                                          bool add_special_tokens) const {
  if (absl::Status s = internal::CheckUtf8(text); !s.ok()) return s;
  std::vector<Piece> pieces;
  if (!text.empty()) pieces.push_back(Piece{std::string(text), -1});
  impl_->SplitAdded(impl_->raw_added, &pieces);
  impl_->SplitAdded(impl_->normalized_added, &pieces);  // the normalizer is the identity
  for (const PreTokenizer& p : impl_->pre_tokenizers) {
    if (auto s = impl_->ApplyPreTokenizer(p, &pieces); !s.ok()) return s;
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (const Piece& piece : pieces) {
    if (piece.id >= 0) {
      ids.push_back(piece.id);
    } else {
      impl_->BpeWord(piece.text, &ids);
    }
  }
  if (add_special_tokens) {
    for (const PostStep& step : impl_->post_steps) {
      ids.insert(ids.begin(), step.prefix.begin(), step.prefix.end());
      ids.insert(ids.end(), step.suffix.begin(), step.suffix.end());
    }
  }
  return ids;
}

int64_t BpeTokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> BpeTokenizer::TokenToId(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(std::string(token));
      it != impl_->added_by_content.end()) {
    return it->second;
  }
  if (auto it = impl_->vocab.find(std::string(token)); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

}  // namespace mq::data
