#include "worker/data/rust_regex.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mq::data {
namespace {

// Rust regex's Unicode `\w`.
constexpr char kWordItems[] = R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control})";

// Property names that are not scripts: general categories (short and long), Any, and the binary
// properties PCRE2 10.42 knows under the same names. Compared lowercase without '_', '-', ' '.
bool IsNonScriptProperty(std::string_view name) {
  static const absl::flat_hash_set<std::string>* const kNames = [] {
    auto* s = new absl::flat_hash_set<std::string>();
    for (const char* n : {"l",
                          "lu",
                          "ll",
                          "lt",
                          "lm",
                          "lo",
                          "lc",
                          "l&",
                          "m",
                          "mn",
                          "mc",
                          "me",
                          "n",
                          "nd",
                          "nl",
                          "no",
                          "p",
                          "pc",
                          "pd",
                          "ps",
                          "pe",
                          "pi",
                          "pf",
                          "po",
                          "s",
                          "sm",
                          "sc",
                          "sk",
                          "so",
                          "z",
                          "zs",
                          "zl",
                          "zp",
                          "c",
                          "cc",
                          "cf",
                          "cs",
                          "co",
                          "cn",
                          "any",
                          "letter",
                          "casedletter",
                          "uppercaseletter",
                          "lowercaseletter",
                          "titlecaseletter",
                          "modifierletter",
                          "otherletter",
                          "mark",
                          "combiningmark",
                          "nonspacingmark",
                          "spacingmark",
                          "enclosingmark",
                          "number",
                          "decimalnumber",
                          "letternumber",
                          "othernumber",
                          "punctuation",
                          "connectorpunctuation",
                          "dashpunctuation",
                          "openpunctuation",
                          "closepunctuation",
                          "initialpunctuation",
                          "finalpunctuation",
                          "otherpunctuation",
                          "symbol",
                          "mathsymbol",
                          "currencysymbol",
                          "modifiersymbol",
                          "othersymbol",
                          "separator",
                          "spaceseparator",
                          "lineseparator",
                          "paragraphseparator",
                          "other",
                          "control",
                          "format",
                          "surrogate",
                          "privateuse",
                          "unassigned",
                          "alphabetic",
                          "alpha",
                          "whitespace",
                          "wspace",
                          "space",
                          "uppercase",
                          "upper",
                          "lowercase",
                          "lower",
                          "joincontrol",
                          "joinc",
                          "emoji",
                          "emojipresentation",
                          "epres",
                          "extendedpictographic",
                          "extpict",
                          "emojimodifier",
                          "emojimodifierbase",
                          "emojicomponent",
                          "ideographic",
                          "ideo",
                          "math",
                          "dash",
                          "hexdigit",
                          "hex",
                          "ascii",
                          "asciihexdigit",
                          "ahex",
                          "defaultignorablecodepoint",
                          "di",
                          "cased",
                          "caseignorable",
                          "ci",
                          "idstart",
                          "ids",
                          "idcontinue",
                          "idc",
                          "xidstart",
                          "xids",
                          "xidcontinue",
                          "xidc",
                          "noncharactercodepoint",
                          "diacritic",
                          "dia",
                          "extender",
                          "ext",
                          "regionalindicator",
                          "ri",
                          "variationselector",
                          "vs",
                          "quotationmark",
                          "qmark",
                          "terminalpunctuation",
                          "term",
                          "sentenceterminal",
                          "sterm",
                          "patternwhitespace",
                          "patws",
                          "patternsyntax",
                          "patsyn",
                          "unifiedideograph",
                          "uideo"}) {
      s->insert(n);
    }
    return s;
  }();
  std::string key;
  for (char c : name) {
    if (c == '_' || c == '-' || c == ' ') continue;
    key += absl::ascii_tolower(static_cast<unsigned char>(c));
  }
  return kNames->contains(key);
}

class Translator {
 public:
  explicit Translator(std::string_view p) : p_(p) {}

  absl::StatusOr<std::string> Run() {
    std::string out;
    while (i_ < p_.size()) {
      char c = p_[i_];
      if (c == '\\') {
        absl::StatusOr<Item> item = Escape();
        if (!item.ok()) return item.status();
        out += item->outside;
      } else if (c == '[') {
        absl::StatusOr<Set> set = Class();
        if (!set.ok()) return set.status();
        out += set->Expr();
      } else {
        out += c;
        ++i_;
      }
    }
    return out;
  }

 private:
  // One escape: its form outside a class, and inside one (`inside` empty when it can only be
  // expressed as a separate one-character alternative, `alternative`).
  struct Item {
    std::string outside;
    std::string inside;
    std::string alternative;
    bool literal = false;  // a single character (may be a range endpoint)
  };

  // A set of characters: a plain PCRE2 class body, or a compound expression matching one char.
  struct Set {
    std::string body;
    bool negated = false;
    std::string compound;
    std::string Expr() const {
      if (!compound.empty()) return compound;
      return absl::StrCat("[", negated ? "^" : "", body, "]");
    }
  };

  absl::Status Error(size_t at, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("pattern offset ", at, ": ", what));
  }

  // Reads hex digits [i_, end) into a code point.
  absl::StatusOr<std::string> Hex(size_t start, std::string_view digits) {
    uint32_t cp = 0;
    if (digits.empty() || digits.size() > 8 ||
        !absl::SimpleHexAtoi(absl::string_view(digits.data(), digits.size()), &cp) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
      return Error(start, "bad hexadecimal escape (need a Unicode scalar value)");
    }
    return absl::StrCat("\\x{", absl::Hex(cp), "}");
  }

  absl::StatusOr<Item> Escape() {
    const size_t start = i_;
    if (i_ + 1 >= p_.size()) return Error(start, "pattern ends with a lone backslash");
    const char e = p_[i_ + 1];
    i_ += 2;
    Item item;
    switch (e) {
      case 'p':
      case 'P': {
        std::string name;
        if (i_ < p_.size() && p_[i_] == '{') {
          size_t close = p_.find('}', i_);
          if (close == std::string_view::npos) return Error(start, "\\p{ without a closing }");
          name = std::string(p_.substr(i_ + 1, close - i_ - 1));
          i_ = close + 1;
        } else if (i_ < p_.size()) {
          name = std::string(1, p_[i_++]);
        } else {
          return Error(start, "\\p without a property name");
        }
        absl::StatusOr<std::string> prop = Property(start, name);
        if (!prop.ok()) return prop.status();
        item.outside = item.inside = absl::StrCat("\\", std::string(1, e), "{", *prop, "}");
        return item;
      }
      case 's':
        item.outside = item.inside = R"(\p{White_Space})";
        return item;
      case 'S':
        item.outside = item.inside = R"(\P{White_Space})";
        return item;
      case 'd':
        item.outside = item.inside = R"(\p{Nd})";
        return item;
      case 'D':
        item.outside = item.inside = R"(\P{Nd})";
        return item;
      case 'w':
        item.inside = kWordItems;
        item.outside = absl::StrCat("[", kWordItems, "]");
        return item;
      case 'W':
        item.outside = item.alternative = absl::StrCat("[^", kWordItems, "]");
        return item;
      case 'x':
      case 'u':
      case 'U': {
        std::string_view digits;
        if (i_ < p_.size() && p_[i_] == '{' && e != 'U') {
          size_t close = p_.find('}', i_);
          if (close == std::string_view::npos) return Error(start, "\\x{ without a closing }");
          digits = p_.substr(i_ + 1, close - i_ - 1);
          i_ = close + 1;
        } else {
          size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          if (i_ + n > p_.size()) return Error(start, "truncated hexadecimal escape");
          digits = p_.substr(i_, n);
          i_ += n;
        }
        absl::StatusOr<std::string> hex = Hex(start, digits);
        if (!hex.ok()) return hex.status();
        item.outside = item.inside = *hex;
        item.literal = true;
        return item;
      }
      case 'v':
        item.outside = item.inside = R"(\x{b})";
        item.literal = true;
        return item;
      case 'n':
      case 'r':
      case 't':
      case 'f':
      case 'a':
        item.outside = item.inside = absl::StrCat("\\", std::string(1, e));
        item.literal = true;
        return item;
      case 'b':
      case 'B':
      case 'A':
      case 'z':
        item.outside = absl::StrCat("\\", std::string(1, e));
        item.alternative = "";  // not a character: invalid inside a class (checked there)
        return item;
      default:
        break;
    }
    if (e >= '1' && e <= '9') {  // fancy-regex backreference
      item.outside = absl::StrCat("\\", std::string(1, e));
      return item;
    }
    if (absl::ascii_isalnum(static_cast<unsigned char>(e))) {
      return Error(start, absl::StrCat("unsupported escape \\", std::string(1, e)));
    }
    if (static_cast<unsigned char>(e) >= 0x80) {
      return Error(start, "a backslash before a non-ASCII character");
    }
    item.outside = item.inside = absl::StrCat("\\", std::string(1, e));
    item.literal = true;
    return item;
  }

  absl::StatusOr<std::string> Property(size_t start, const std::string& raw) {
    std::string name(absl::StripAsciiWhitespace(raw));
    if (name.empty()) return Error(start, "empty \\p{} property name");
    size_t sep = name.find_first_of("=:");
    if (sep != std::string::npos) {
      std::string key = absl::AsciiStrToLower(absl::StripAsciiWhitespace(name.substr(0, sep)));
      std::string value(absl::StripAsciiWhitespace(name.substr(sep + 1)));
      key.erase(std::remove_if(key.begin(), key.end(),
                               [](char c) { return c == '_' || c == '-' || c == ' '; }),
                key.end());
      if (key == "sc" || key == "script") return absl::StrCat("sc:", value);
      if (key == "scx" || key == "scriptextensions") return absl::StrCat("scx:", value);
      if (key == "gc" || key == "generalcategory") return value;
      return Error(start, absl::StrCat("unsupported property key in \\p{", name, "}"));
    }
    if (IsNonScriptProperty(name)) return name;
    return absl::StrCat("sc:", name);
  }

  // A literal character inside a class, escaped for a PCRE2 class body.
  std::string ClassLiteral() {
    size_t len = 1;
    unsigned char lead = static_cast<unsigned char>(p_[i_]);
    if (lead >= 0xf0) {
      len = 4;
    } else if (lead >= 0xe0) {
      len = 3;
    } else if (lead >= 0xc0) {
      len = 2;
    }
    len = std::min(len, p_.size() - i_);
    std::string out(p_.substr(i_, len));
    i_ += len;
    if (out == "\\" || out == "]" || out == "[" || out == "^" || out == "-") out = "\\" + out;
    return out;
  }

  bool At(std::string_view s) const { return p_.substr(i_, s.size()) == s; }

  // A class starting at p_[i_] == '['.
  absl::StatusOr<Set> Class() {
    const size_t open = i_;
    ++i_;
    bool negated = false;
    if (i_ < p_.size() && p_[i_] == '^') {
      negated = true;
      ++i_;
    }
    if (At(":")) {
      return Error(open, "POSIX classes such as [[:alpha:]] are not supported");
    }
    absl::StatusOr<Set> left = Union(open, /*first=*/true);
    if (!left.ok()) return left.status();
    Set acc = *std::move(left);
    while (true) {
      if (i_ >= p_.size()) return Error(open, "unclosed character class");
      if (p_[i_] == ']') {
        ++i_;
        break;
      }
      const size_t op_at = i_;
      std::string op(p_.substr(i_, 2));
      if (op == "~~") return Error(op_at, "symmetric difference ~~ in a class is not supported");
      i_ += 2;  // "&&" or "--" (Union stops only at those, ']' or the end)
      absl::StatusOr<Set> right = Union(op_at, /*first=*/false);
      if (!right.ok()) return right.status();
      Set combined;
      if (op == "&&") {
        combined.compound = absl::StrCat("(?:(?=", acc.Expr(), ")", right->Expr(), ")");
      } else {
        combined.compound = absl::StrCat("(?:(?!", right->Expr(), ")", acc.Expr(), ")");
      }
      acc = std::move(combined);
    }
    if (negated) {
      if (acc.compound.empty() && !acc.negated) {
        acc.negated = true;
      } else {
        acc.compound = absl::StrCat("(?:(?!", acc.Expr(), ")(?s:.))");
      }
    }
    return acc;
  }

  // Juxtaposed items up to ']', "&&", "--", "~~" or the end.
  absl::StatusOr<Set> Union(size_t where, bool first) {
    std::string body;
    std::vector<std::string> alternatives;
    bool any = false;
    bool at_start = first;
    while (i_ < p_.size()) {
      char c = p_[i_];
      if (c == ']' && !at_start) break;
      if (At("&&") || At("--") || At("~~")) break;
      at_start = false;
      any = true;
      if (c == '[') {
        absl::StatusOr<Set> nested = Class();
        if (!nested.ok()) return nested.status();
        if (nested->compound.empty() && !nested->negated) {
          body += nested->body;
        } else {
          alternatives.push_back(nested->Expr());
        }
        continue;
      }
      std::string lo;
      bool literal = true;
      if (c == '\\') {
        const size_t esc_at = i_;
        absl::StatusOr<Item> item = Escape();
        if (!item.ok()) return item.status();
        if (!item->alternative.empty()) {
          alternatives.push_back(item->alternative);
          continue;
        }
        if (item->inside.empty()) return Error(esc_at, "this escape is not allowed in a class");
        lo = item->inside;
        literal = item->literal;
      } else {
        lo = ClassLiteral();
      }
      // A range "a-b" (a '-' before ']' or "--" is a literal or the operator).
      if (literal && At("-") && !At("--") && i_ + 1 < p_.size() && p_[i_ + 1] != ']') {
        const size_t range_at = i_;
        ++i_;
        std::string hi;
        if (p_[i_] == '\\') {
          absl::StatusOr<Item> item = Escape();
          if (!item.ok()) return item.status();
          if (!item->literal) return Error(range_at, "a range must end in a single character");
          hi = item->inside;
        } else if (p_[i_] == '[') {
          return Error(range_at, "a range must end in a single character");
        } else {
          hi = ClassLiteral();
        }
        body += absl::StrCat(lo, "-", hi);
        continue;
      }
      body += lo;
    }
    if (!any) return Error(where, "empty operand in a character class");
    Set set;
    if (alternatives.empty()) {
      set.body = std::move(body);
    } else {
      if (!body.empty()) alternatives.insert(alternatives.begin(), absl::StrCat("[", body, "]"));
      set.compound = alternatives.size() == 1
                         ? alternatives[0]
                         : absl::StrCat("(?:", absl::StrJoin(alternatives, "|"), ")");
    }
    return set;
  }

  std::string_view p_;
  size_t i_ = 0;
};

}  // namespace

absl::StatusOr<std::string> RustRegexToPcre2(std::string_view pattern) {
  return Translator(pattern).Run();
}

}  // namespace mq::data
