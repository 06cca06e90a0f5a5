#include "worker/data/tokenizer.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "worker/data/bpe_tokenizer.h"
#include "worker/data/tiktoken_tokenizer.h"

namespace mq::data {
namespace {

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string Dirname(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadBpe(const std::string& path) {
  absl::StatusOr<BpeTokenizer> t = BpeTokenizer::FromFile(path);
  if (!t.ok()) return t.status();
  return std::unique_ptr<Tokenizer>(std::make_unique<BpeTokenizer>(*std::move(t)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTiktoken(const std::string& ranks,
                                                        const std::string& config) {
  absl::StatusOr<TiktokenTokenizer> t = TiktokenTokenizer::FromModelFiles(ranks, config);
  if (!t.ok()) return t.status();
  return std::unique_ptr<Tokenizer>(std::make_unique<TiktokenTokenizer>(*std::move(t)));
}

}  // namespace

absl::StatusOr<std::vector<std::string>> TokenizerFiles(const std::string& path) {
  struct stat st;
  if (path.empty()) return absl::InvalidArgumentError("tokenizer path is empty");
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    return absl::NotFoundError(absl::StrCat("tokenizer ", path, ": ", std::strerror(err)));
  }
  if (S_ISDIR(st.st_mode)) {
    const std::string dir = path.back() == '/' ? path.substr(0, path.size() - 1) : path;
    if (Exists(dir + "/tokenizer.json")) return std::vector<std::string>{dir + "/tokenizer.json"};
    if (Exists(dir + "/tiktoken.model")) {
      return std::vector<std::string>{dir + "/tiktoken.model", dir + "/tokenizer_config.json"};
    }
    return absl::NotFoundError(absl::StrCat(
        "tokenizer ", path, ": a directory with neither tokenizer.json nor tiktoken.model"));
  }
  // A file: a *.json file or one holding a JSON object is a tokenizer.json; anything else is
  // read as tiktoken ranks.
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("tokenizer ", path, ": cannot open for reading"));
  }
  char c = 0;
  while (in.get(c) && (c == ' ' || c == '\t' || c == '\n' || c == '\r')) {
  }
  const bool json = path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0;
  if (json || (in && c == '{')) return std::vector<std::string>{path};
  return std::vector<std::string>{path, Dirname(path) + "/tokenizer_config.json"};
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path) {
  absl::StatusOr<std::vector<std::string>> files = TokenizerFiles(path);
  if (!files.ok()) return files.status();
  if (files->size() == 1) return LoadBpe(files->front());
  return LoadTiktoken((*files)[0], (*files)[1]);
}

}  // namespace mq::data
