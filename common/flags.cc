#include "common/flags.h"

#include <charconv>

#include "absl/strings/str_cat.h"

namespace mq {

void Flags::String(const std::string& name, std::string* target, const std::string& help) {
  flags_[name] = {Kind::kString, target, help};
}
void Flags::Int(const std::string& name, int64_t* target, const std::string& help) {
  flags_[name] = {Kind::kInt, target, help};
}
void Flags::Bool(const std::string& name, bool* target, const std::string& help) {
  flags_[name] = {Kind::kBool, target, help};
}
void Flags::Repeated(const std::string& name, std::vector<std::string>* target,
                     const std::string& help) {
  flags_[name] = {Kind::kRepeated, target, help};
}

absl::Status Flags::Set(const std::string& name, Flag& flag, const std::string& value) {
  given_[name] = true;
  switch (flag.kind) {
    case Kind::kString:
      *static_cast<std::string*>(flag.target) = value;
      return absl::OkStatus();
    case Kind::kRepeated:
      static_cast<std::vector<std::string>*>(flag.target)->push_back(value);
      return absl::OkStatus();
    case Kind::kInt: {
      int64_t v = 0;
      auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
      if (ec != std::errc() || ptr != value.data() + value.size() || value.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " = \"", value, "\": must be an integer"));
      }
      *static_cast<int64_t*>(flag.target) = v;
      return absl::OkStatus();
    }
    case Kind::kBool:
      if (value == "true" || value == "1") {
        *static_cast<bool*>(flag.target) = true;
      } else if (value == "false" || value == "0") {
        *static_cast<bool*>(flag.target) = false;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " = \"", value, "\": must be true or false"));
      }
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

absl::Status Flags::Parse(int argc, char** argv, int first) {
  bool only_positional = false;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (only_positional || arg.size() < 2 || arg.rfind("--", 0) != 0) {
      if (!only_positional && arg.size() > 1 && arg[0] == '-' && arg != "-") {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown option ", arg, "; options are spelled --name (see --help)"));
      }
      positional_.push_back(arg);
      continue;
    }
    if (arg == "--") {
      only_positional = true;
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    auto it = flags_.find(name);
    if (it == flags_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown option --", name, " (see --help)"));
    }
    if (!has_value) {
      if (it->second.kind == Kind::kBool) {
        value = "true";
      } else {
        if (i + 1 >= argc) {
          return absl::InvalidArgumentError(absl::StrCat("option --", name, " needs a value"));
        }
        value = argv[++i];
      }
    }
    if (absl::Status s = Set(name, it->second, value); !s.ok()) return s;
  }
  return absl::OkStatus();
}

std::string Flags::Usage() const {
  std::string out;
  for (const auto& [name, flag] : flags_) {
    std::string left = "  --" + name;
    if (flag.kind != Kind::kBool) left += " VALUE";
    if (left.size() < 32) left.resize(32, ' ');
    out += left + " " + flag.help + "\n";
  }
  return out;
}

}  // namespace mq
