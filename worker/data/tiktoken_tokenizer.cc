#include "worker/data/tiktoken_tokenizer.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "worker/data/rust_regex.h"
#include "worker/data/text_internal.h"

namespace mq::data {

const char kKimiK2Pattern[] =
    R"([\p{Han}]+)"
    R"(|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    R"(|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    R"(|\p{N}{1,3})"
    R"(| ?[^\s\p{L}\p{N}]+[\r\n]*)"
    R"(|\s*[\r\n]+)"
    R"(|\s+(?!\S))"
    R"(|\s+)";

namespace {

using Json = nlohmann::json;

absl::string_view Absl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr int64_t kMaxRank = std::numeric_limits<int32_t>::max() - 1;
constexpr size_t kMaxRanksFileBytes = size_t{1} << 30;
constexpr size_t kMaxConfigBytes = size_t{64} << 20;

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, size_t limit,
                                          absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, " ", path, ": cannot open for reading"));
  std::string content;
  char buffer[1 << 16];
  while (in.read(buffer, sizeof(buffer)) || in.gcount() > 0) {
    content.append(buffer, static_cast<size_t>(in.gcount()));
    if (content.size() > limit) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " ", path, ": larger than ", limit, " bytes"));
    }
  }
  if (in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": read error"));
  }
  return content;
}

// A short JSON value for an error message (strings over 40 bytes and containers by size only).
std::string Describe(const Json& j) {
  if (j.is_string()) {
    const auto& s = j.get_ref<const std::string&>();
    return s.size() <= 40 ? j.dump() : absl::StrCat("<string of ", s.size(), " bytes>");
  }
  if (j.is_array()) return absl::StrCat("<array of ", j.size(), ">");
  if (j.is_object()) return absl::StrCat("<object of ", j.size(), " keys>");
  return j.dump();
}

}  // namespace

struct TiktokenTokenizer::Impl {
  absl::flat_hash_map<std::string, int32_t> encoder;  // token bytes -> rank
  std::array<int32_t, 256> byte_rank{};
  absl::flat_hash_map<std::string, int32_t> special_by_content;
  internal::LiteralMatcher specials;
  std::shared_ptr<const internal::Regex> regex;
  std::optional<int32_t> bos_id;
  int64_t vocab_size = 0;

  std::optional<int32_t> Rank(std::string_view bytes) const {
    if (bytes.size() == 1) return byte_rank[static_cast<unsigned char>(bytes[0])];
    auto it = encoder.find(Absl(bytes));
    if (it == encoder.end()) return std::nullopt;
    return it->second;
  }
  void BytePairEncode(std::string_view piece, std::vector<int32_t>* out) const;
  absl::Status EncodeOrdinary(std::string_view text, std::vector<int32_t>* out) const;
};

// tiktoken's byte_pair_merge: join the adjacent pair of parts whose concatenated bytes have the
// lowest rank (leftmost on ties) until no pair has a rank. A heap of (rank, start) entries
// checked against the current parts on pop gives the same order in O(n log n).
void TiktokenTokenizer::Impl::BytePairEncode(std::string_view piece,
                                             std::vector<int32_t>* out) const {
  const int n = static_cast<int>(piece.size());
  if (n == 1) {
    out->push_back(byte_rank[static_cast<unsigned char>(piece[0])]);
    return;
  }
  std::vector<int> next(n), prev(n);
  std::vector<char> alive(n, 1);
  for (int i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  auto end_of = [&](int i) { return next[i] < 0 ? n : next[i]; };
  auto pair_rank = [&](int i) -> std::optional<int32_t> {
    if (i < 0 || next[i] < 0) return std::nullopt;
    return Rank(piece.substr(i, end_of(next[i]) - i));
  };
  using Entry = std::pair<int32_t, int>;  // (rank, start of the left part)
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int i = 0; i + 1 < n; ++i) {
    if (auto r = pair_rank(i)) heap.push({*r, i});
  }
  while (!heap.empty()) {
    auto [rank, i] = heap.top();
    heap.pop();
    if (!alive[i]) continue;
    std::optional<int32_t> current = pair_rank(i);
    if (!current || *current != rank) continue;  // stale
    const int j = next[i];
    alive[j] = 0;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    if (auto r = pair_rank(prev[i])) heap.push({*r, prev[i]});
    if (auto r = pair_rank(i)) heap.push({*r, i});
  }
  for (int i = 0; i >= 0; i = next[i]) {
    // Every part is a single byte or a ranked merge, so it has a rank.
    out->push_back(*Rank(piece.substr(i, end_of(i) - i)));
  }
}

absl::Status TiktokenTokenizer::Impl::EncodeOrdinary(std::string_view text,
                                                     std::vector<int32_t>* out) const {
  if (text.empty()) return absl::OkStatus();
  std::vector<std::pair<size_t, size_t>> matches;
  if (absl::Status s = regex->FindAll(text, &matches); !s.ok()) return s;
  for (auto [b, e] : matches) {
    if (e <= b) continue;
    std::string_view piece = text.substr(b, e - b);
    if (auto it = encoder.find(Absl(piece)); it != encoder.end()) {
      out->push_back(it->second);
    } else {
      BytePairEncode(piece, out);
    }
  }
  return absl::OkStatus();
}

TiktokenTokenizer::TiktokenTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TiktokenTokenizer::TiktokenTokenizer(TiktokenTokenizer&&) noexcept = default;
TiktokenTokenizer& TiktokenTokenizer::operator=(TiktokenTokenizer&&) noexcept = default;
TiktokenTokenizer::~TiktokenTokenizer() = default;

absl::StatusOr<TiktokenTokenizer> TiktokenTokenizer::Create(std::string_view ranks,
                                                            TiktokenOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->byte_rank.fill(-1);
  absl::flat_hash_map<int32_t, int64_t> line_of_rank;
  absl::flat_hash_map<std::string, int64_t> line_of_token;
  int64_t line_no = 0, max_id = -1;
  for (absl::string_view line : absl::StrSplit(Absl(ranks), '\n')) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    const std::string where = absl::StrCat("line ", line_no);
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": expected \"<base64 token> <rank>\", found ", fields.size(), " fields"));
    }
    std::string token;
    if (!absl::Base64Unescape(fields[0], &token)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the token (", fields[0].size(), " characters) is not base64"));
    }
    if (token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": the token is empty"));
    }
    int64_t rank = -1;
    if (!absl::SimpleAtoi(fields[1], &rank) || rank < 0 || rank > kMaxRank) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the rank is not an integer in [0, ", kMaxRank, "]"));
    }
    if (auto [it, fresh] = line_of_rank.try_emplace(static_cast<int32_t>(rank), line_no); !fresh) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": rank ", rank, " already given on line ", it->second));
    }
    if (auto [it, fresh] = line_of_token.try_emplace(token, line_no); !fresh) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the same token bytes as line ", it->second));
    }
    if (token.size() == 1) impl->byte_rank[static_cast<unsigned char>(token[0])] = rank;
    max_id = std::max(max_id, rank);
    impl->encoder.emplace(std::move(token), static_cast<int32_t>(rank));
  }
  if (impl->encoder.empty()) return absl::InvalidArgumentError("no ranks (the file is empty)");
  std::vector<std::string> missing;
  for (int b = 0; b < 256; ++b) {
    if (impl->byte_rank[b] < 0)
      missing.push_back(absl::StrCat("0x", absl::Hex(b, absl::kZeroPad2)));
  }
  if (!missing.empty()) {
    const size_t n = missing.size();
    if (n > 8) missing.resize(8);
    return absl::InvalidArgumentError(absl::StrCat(
        n, " of the 256 single-byte tokens are missing (", absl::StrJoin(missing, ", "),
        n > 8 ? ", ..." : "", "); a byte-level BPE needs every byte"));
  }
  for (const auto& [content, id] : options.special_tokens) {
    const std::string what = absl::StrCat("special token ", Describe(Json(content)));
    if (content.empty()) return absl::InvalidArgumentError("a special token is empty");
    if (internal::FindInvalidUtf8(content) != std::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": not valid UTF-8"));
    }
    if (id < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": id ", id, " < 0"));
    if (auto it = line_of_rank.find(id); it != line_of_rank.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": id ", id, " is also the rank on line ", it->second, " of the ranks"));
    }
    if (!impl->special_by_content.emplace(content, id).second) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": given twice"));
    }
    impl->specials.Add(content, id);
    max_id = std::max<int64_t>(max_id, id);
  }
  impl->specials.Finish();
  {
    absl::flat_hash_map<int32_t, std::string> seen;
    for (const auto& [content, id] : options.special_tokens) {
      if (auto [it, fresh] = seen.try_emplace(id, content); !fresh) {
        return absl::InvalidArgumentError(absl::StrCat("special tokens ",
                                                       Describe(Json(it->second)), " and ",
                                                       Describe(Json(content)), " share id ", id));
      }
    }
  }
  if (options.bos_id) {
    bool found = false;
    for (const auto& st : options.special_tokens) found |= st.second == *options.bos_id;
    if (!found) {
      return absl::InvalidArgumentError(
          absl::StrCat("bos id ", *options.bos_id, " is not a special token's id"));
    }
  }
  impl->bos_id = options.bos_id;
  absl::StatusOr<std::string> pcre2 = RustRegexToPcre2(options.pattern);
  if (!pcre2.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("pre-tokenizer pattern: ", pcre2.status().message()));
  }
  absl::StatusOr<std::shared_ptr<const internal::Regex>> regex =
      internal::Regex::Compile(*pcre2, "pre-tokenizer pattern");
  if (!regex.ok()) return regex.status();
  impl->regex = *std::move(regex);
  impl->vocab_size = max_id + 1;
  return TiktokenTokenizer(std::move(impl));
}

absl::StatusOr<TiktokenTokenizer> TiktokenTokenizer::FromFile(const std::string& ranks_path,
                                                              TiktokenOptions options) {
  absl::StatusOr<std::string> ranks =
      ReadSmallFile(ranks_path, kMaxRanksFileBytes, "tiktoken ranks file");
  if (!ranks.ok()) return ranks.status();
  absl::StatusOr<TiktokenTokenizer> t = Create(*ranks, std::move(options));
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat("tiktoken ranks file ", ranks_path, ": ",
                                                        t.status().message()));
  }
  return t;
}

absl::StatusOr<TiktokenTokenizer> TiktokenTokenizer::FromModelFiles(
    const std::string& ranks_path, const std::string& config_path) {
  absl::StatusOr<std::string> text =
      ReadSmallFile(config_path, kMaxConfigBytes, "tokenizer config");
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      return absl::NotFoundError(absl::StrCat(
          text.status().message(),
          " (a tiktoken.model needs the tokenizer_config.json beside it for its special tokens)"));
    }
    return text.status();
  }
  const std::string where = absl::StrCat("tokenizer config ", config_path, ": ");
  Json config = Json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "not a JSON object"));
  }
  absl::StatusOr<std::string> ranks =
      ReadSmallFile(ranks_path, kMaxRanksFileBytes, "tiktoken ranks file");
  if (!ranks.ok()) return ranks.status();
  // The number of ranks decides where the special tokens start: count the non-blank lines
  // (Create checks each of them).
  int64_t num_base = 0;
  for (absl::string_view line : absl::StrSplit(*ranks, '\n')) {
    if (!absl::StripAsciiWhitespace(line).empty()) ++num_base;
  }
  const int64_t first = num_base, last = num_base + kKimiReservedSpecialTokens;

  TiktokenOptions options;
  absl::flat_hash_map<int64_t, std::string> named;
  if (auto it = config.find("added_tokens_decoder"); it != config.end() && !it->is_null()) {
    if (!it->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "added_tokens_decoder = ", Describe(*it), ": must be an object"));
    }
    for (const auto& [key, value] : it->items()) {
      const std::string at = absl::StrCat(where, "added_tokens_decoder[", Describe(Json(key)), "]");
      int64_t id = -1;
      if (!absl::SimpleAtoi(key, &id)) {
        return absl::InvalidArgumentError(absl::StrCat(at, ": the key must be an integer id"));
      }
      if (id < first || id >= last) {
        return absl::InvalidArgumentError(absl::StrCat(at, ": id outside the special-token range [",
                                                       first, ", ", last, ") that follows the ",
                                                       num_base, " ranks of ", ranks_path));
      }
      const Json* content =
          value.is_object() && value.contains("content") ? &value["content"] : nullptr;
      if (content == nullptr || !content->is_string() ||
          content->get_ref<const std::string&>().empty()) {
        return absl::InvalidArgumentError(absl::StrCat(at, ".content must be a non-empty string"));
      }
      named[id] = content->get<std::string>();
    }
  }
  for (int64_t id = first; id < last; ++id) {
    auto it = named.find(id);
    options.special_tokens.emplace_back(
        it != named.end() ? it->second : absl::StrCat("<|reserved_token_", id, "|>"),
        static_cast<int32_t>(id));
  }
  bool add_bos = true;
  if (auto it = config.find("add_bos_token"); it != config.end() && !it->is_null()) {
    if (!it->is_boolean()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "add_bos_token = ", Describe(*it), ": must be true or false"));
    }
    add_bos = it->get<bool>();
  }
  if (auto it = config.find("bos_token"); add_bos && it != config.end() && !it->is_null()) {
    const Json* content = it->is_object() && it->contains("content") ? &(*it)["content"] : &*it;
    if (!content->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "bos_token = ", Describe(*it), ": must be a string or {\"content\": string}"));
    }
    std::optional<int32_t> id;
    for (const auto& [c, i] : options.special_tokens) {
      if (c == content->get_ref<const std::string&>()) id = i;
    }
    if (!id) {
      return absl::InvalidArgumentError(absl::StrCat(where, "bos_token = ", Describe(*content),
                                                     ": not one of the special tokens"));
    }
    options.bos_id = id;
  }
  if (auto it = config.find("pat_str"); it != config.end() && !it->is_null()) {
    if (!it->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "pat_str = ", Describe(*it), ": must be a string (a Rust regex)"));
    }
    options.pattern = it->get<std::string>();
  }
  absl::StatusOr<TiktokenTokenizer> t = Create(*ranks, std::move(options));
  if (!t.ok()) {
    // Pattern problems come from the config; everything else from the ranks file.
    const bool pattern = absl::StartsWith(t.status().message(), "pre-tokenizer pattern");
    return absl::Status(
        t.status().code(),
        absl::StrCat(pattern ? where : absl::StrCat("tiktoken ranks file ", ranks_path, ": "),
                     t.status().message()));
  }
  return t;
}

absl::StatusOr<std::vector<int32_t>> TiktokenTokenizer::Encode(std::string_view text,
                                                               bool add_special_tokens) const {
  if (absl::Status s = internal::CheckUtf8(text); !s.ok()) return s;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens && impl_->bos_id) ids.push_back(*impl_->bos_id);
  size_t start = 0;
  if (!impl_->specials.empty()) {
    for (size_t pos = 0; pos < text.size();) {
      std::optional<std::pair<int32_t, size_t>> hit = impl_->specials.LongestAt(text, pos);
      if (!hit) {
        ++pos;
        continue;
      }
      if (absl::Status s = impl_->EncodeOrdinary(text.substr(start, pos - start), &ids); !s.ok()) {
        return s;
      }
      ids.push_back(hit->first);
      pos += hit->second;
      start = pos;
    }
  }
  if (absl::Status s = impl_->EncodeOrdinary(text.substr(start), &ids); !s.ok()) return s;
  return ids;
}

int64_t TiktokenTokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> TiktokenTokenizer::TokenToId(std::string_view token) const {
  if (auto it = impl_->special_by_content.find(Absl(token));
      it != impl_->special_by_content.end()) {
    return it->second;
  }
  if (token.empty()) return std::nullopt;
  return impl_->Rank(token);
}

std::optional<int32_t> TiktokenTokenizer::bos_id() const { return impl_->bos_id; }

}  // namespace mq::data
