// A small command-line parser shared by mq's binaries: `--name value`, `--name=value`,
// boolean `--name`, positional arguments. Errors name the flag and what is allowed.
// Not thread-safe; use from main().
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace mq {

class Flags {
 public:
  // Declares flags before Parse. `help` is shown by Usage().
  void String(const std::string& name, std::string* target, const std::string& help);
  void Int(const std::string& name, int64_t* target, const std::string& help);
  void Bool(const std::string& name, bool* target, const std::string& help);
  void Repeated(const std::string& name, std::vector<std::string>* target,
                const std::string& help);

  // Parses argv[first..argc). Positional arguments go to positional().
  absl::Status Parse(int argc, char** argv, int first = 1);
  const std::vector<std::string>& positional() const { return positional_; }
  // True if the flag appeared on the command line.
  bool Given(const std::string& name) const { return given_.count(name) > 0; }
  // One line per flag.
  std::string Usage() const;

 private:
  enum class Kind { kString, kInt, kBool, kRepeated };
  struct Flag {
    Kind kind;
    void* target;
    std::string help;
  };
  absl::Status Set(const std::string& name, Flag& flag, const std::string& value);

  std::map<std::string, Flag> flags_;
  std::vector<std::string> positional_;
  std::map<std::string, bool> given_;
};

}  // namespace mq
