#include "common/s3/s3_config.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace mq::s3 {
namespace {

constexpr absl::string_view kScheme = "s3://";
constexpr size_t kMaxKeyBytes = 1024;
constexpr size_t kMaxSecretFileBytes = 64 << 10;

bool ValidBucket(absl::string_view b) {
  if (b.size() < 3 || b.size() > 63) return false;
  for (char c : b) {
    if (!(absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '.' || c == '-')) return false;
  }
  auto alnum = [](char c) { return absl::ascii_islower(c) || absl::ascii_isdigit(c); };
  return alnum(b.front()) && alnum(b.back()) && !absl::StrContains(b, "..");
}

std::optional<std::string> NonEmpty(const Env& env, const char* name) {
  std::optional<std::string> v = env(name);
  if (v && v->empty()) return std::nullopt;
  return v;
}

// The whole (small) file, or nullopt when it does not exist; errors for other failures.
absl::StatusOr<std::optional<std::string>> ReadSmallFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::optional<std::string>();
  std::string data;
  data.resize(kMaxSecretFileBytes + 1);
  in.read(data.data(), static_cast<std::streamsize>(data.size()));
  data.resize(static_cast<size_t>(in.gcount()));
  if (data.size() > kMaxSecretFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": larger than ", kMaxSecretFileBytes,
                                                   " bytes; not a credentials file"));
  }
  return std::optional<std::string>(std::move(data));
}

absl::StatusOr<std::optional<Credentials>> FromSecretDir(const std::string& dir) {
  Credentials c;
  struct Field {
    const char* file;
    std::string* value;
    bool required;
  };
  for (Field f : {Field{"access_key_id", &c.access_key_id, true},
                  Field{"secret_access_key", &c.secret_access_key, true},
                  Field{"session_token", &c.session_token, false}}) {
    const std::string path = absl::StrCat(dir, "/", f.file);
    absl::StatusOr<std::optional<std::string>> data = ReadSmallFile(path);
    if (!data.ok()) return data.status();
    if (!data->has_value()) {
      if (!f.required) continue;
      return absl::UnauthenticatedError(
          absl::StrCat("MQ_S3_CREDENTIALS_DIR=", dir, ": no file ", f.file,
                       " (the directory must hold access_key_id and secret_access_key, optionally "
                       "session_token)"));
    }
    *f.value = std::string(absl::StripAsciiWhitespace(**data));
  }
  c.source = absl::StrCat(dir, " (MQ_S3_CREDENTIALS_DIR)");
  return std::optional<Credentials>(std::move(c));
}

// Parses the INI-style shared credentials file and returns profile `profile`'s keys.
absl::StatusOr<std::optional<Credentials>> FromSharedFile(const std::string& path,
                                                          const std::string& profile,
                                                          bool profile_named) {
  absl::StatusOr<std::optional<std::string>> data = ReadSmallFile(path);
  if (!data.ok()) return data.status();
  if (!data->has_value()) return std::optional<Credentials>();
  Credentials c;
  bool in_profile = false;
  bool seen_profile = false;
  for (absl::string_view line : absl::StrSplit(**data, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#' || line.front() == ';') continue;
    if (line.front() == '[' && line.back() == ']') {
      absl::string_view name = absl::StripAsciiWhitespace(line.substr(1, line.size() - 2));
      in_profile = name == profile;
      seen_profile |= in_profile;
      continue;
    }
    if (!in_profile) continue;
    const size_t eq = line.find('=');
    if (eq == absl::string_view::npos) continue;
    absl::string_view k = absl::StripAsciiWhitespace(line.substr(0, eq));
    std::string v(absl::StripAsciiWhitespace(line.substr(eq + 1)));
    if (k == "aws_access_key_id") c.access_key_id = v;
    if (k == "aws_secret_access_key") c.secret_access_key = v;
    if (k == "aws_session_token") c.session_token = v;
  }
  if (!seen_profile) {
    if (profile_named) {
      return absl::UnauthenticatedError(absl::StrCat(
          path, ": AWS_PROFILE=", profile, " but the file has no [", profile, "] section"));
    }
    return std::optional<Credentials>();
  }
  if (c.access_key_id.empty() || c.secret_access_key.empty()) {
    return absl::UnauthenticatedError(absl::StrCat(
        path, " [", profile, "]: needs both aws_access_key_id and aws_secret_access_key"));
  }
  c.source = absl::StrCat(path, " [", profile, "]");
  return std::optional<Credentials>(std::move(c));
}

}  // namespace

std::string S3Uri::ToString() const {
  return key.empty() ? absl::StrCat(kScheme, bucket) : absl::StrCat(kScheme, bucket, "/", key);
}

S3Uri S3Uri::Child(absl::string_view name) const {
  S3Uri child = *this;
  child.key = key.empty() ? std::string(name) : absl::StrCat(key, "/", name);
  return child;
}

bool IsS3Uri(absl::string_view location) { return absl::StartsWith(location, kScheme); }

absl::StatusOr<S3Uri> ParseS3Uri(absl::string_view field, absl::string_view uri) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(field, " = \"", uri, "\": ", why));
  };
  if (!IsS3Uri(uri)) return bad("must start with s3://");
  absl::string_view rest = uri.substr(kScheme.size());
  const size_t slash = rest.find('/');
  S3Uri out;
  out.bucket = std::string(rest.substr(0, slash));
  absl::string_view key = slash == absl::string_view::npos ? "" : rest.substr(slash + 1);
  if (!ValidBucket(out.bucket)) {
    return bad(absl::StrCat("bucket \"", out.bucket,
                            "\" is not a valid S3 bucket name (3-63 characters of a-z, 0-9, '.' "
                            "and '-', starting and ending with a letter or digit)"));
  }
  if (absl::EndsWith(key, "/")) key.remove_suffix(1);
  if (key.size() > kMaxKeyBytes) {
    return bad(absl::StrCat("key is ", key.size(), " bytes; S3 allows at most ", kMaxKeyBytes));
  }
  for (char c : key) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return bad("key contains a control character");
    }
  }
  if (!key.empty()) {
    for (absl::string_view part : absl::StrSplit(key, '/')) {
      if (part.empty()) return bad("key has an empty path component (\"//\")");
      if (part == "." || part == "..") return bad("key has a \".\" or \"..\" component");
    }
  }
  out.key = std::string(key);
  return out;
}

Env ProcessEnv() {
  return [](const char* name) -> std::optional<std::string> {
    const char* v = std::getenv(name);
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

absl::StatusOr<Credentials> ResolveCredentials(const Env& env) {
  std::optional<std::string> id = NonEmpty(env, "AWS_ACCESS_KEY_ID");
  std::optional<std::string> secret = NonEmpty(env, "AWS_SECRET_ACCESS_KEY");
  if (id || secret) {
    if (!id || !secret) {
      return absl::UnauthenticatedError(absl::StrCat(
          id ? "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"
             : "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not",
          "; set both, or neither to use MQ_S3_CREDENTIALS_DIR or the AWS credentials file"));
    }
    Credentials c;
    c.access_key_id = *id;
    c.secret_access_key = *secret;
    c.session_token = NonEmpty(env, "AWS_SESSION_TOKEN").value_or("");
    c.source = "environment (AWS_ACCESS_KEY_ID)";
    return c;
  }
  if (std::optional<std::string> dir = NonEmpty(env, "MQ_S3_CREDENTIALS_DIR")) {
    absl::StatusOr<std::optional<Credentials>> c = FromSecretDir(*dir);
    if (!c.ok()) return c.status();
    if (c->has_value()) return **c;
  }
  std::string file;
  if (std::optional<std::string> f = NonEmpty(env, "AWS_SHARED_CREDENTIALS_FILE")) {
    file = *f;
  } else if (std::optional<std::string> home = NonEmpty(env, "HOME")) {
    file = absl::StrCat(*home, "/.aws/credentials");
  }
  std::optional<std::string> profile = NonEmpty(env, "AWS_PROFILE");
  if (!file.empty()) {
    absl::StatusOr<std::optional<Credentials>> c =
        FromSharedFile(file, profile.value_or("default"), profile.has_value());
    if (!c.ok()) return c.status();
    if (c->has_value()) return **c;
  }
  return absl::UnauthenticatedError(absl::StrCat(
      "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
      "MQ_S3_CREDENTIALS_DIR (a directory with access_key_id and secret_access_key files), or "
      "provide profile [",
      profile.value_or("default"), "] in ",
      file.empty() ? "the AWS shared credentials file (AWS_SHARED_CREDENTIALS_FILE)" : file));
}

absl::StatusOr<S3Config> S3ConfigFromEnv(const Env& env) {
  S3Config config;
  if (std::optional<std::string> r = NonEmpty(env, "AWS_REGION")) {
    config.region = *r;
  } else if (std::optional<std::string> r = NonEmpty(env, "AWS_DEFAULT_REGION")) {
    config.region = *r;
  }
  for (char c : config.region) {
    if (!(absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '-')) {
      return absl::InvalidArgumentError(
          absl::StrCat("AWS_REGION = \"", config.region,
                       "\": a region is lowercase letters, digits and '-' (e.g. us-east-1)"));
    }
  }
  if (std::optional<std::string> e = NonEmpty(env, "MQ_S3_ENDPOINT")) {
    std::string endpoint = *e;
    while (absl::EndsWith(endpoint, "/")) endpoint.pop_back();
    absl::string_view rest = endpoint;
    if (!absl::ConsumePrefix(&rest, "http://") && !absl::ConsumePrefix(&rest, "https://")) {
      return absl::InvalidArgumentError(
          absl::StrCat("MQ_S3_ENDPOINT = \"", *e,
                       "\": must be an http:// or https:// URL such as http://127.0.0.1:9000"));
    }
    if (rest.empty() || absl::StrContains(rest, "/") || absl::StrContains(rest, "?") ||
        absl::StrContains(rest, "@") || absl::StrContains(rest, "#")) {
      return absl::InvalidArgumentError(
          absl::StrCat("MQ_S3_ENDPOINT = \"", *e,
                       "\": must be scheme://host[:port] with no path, query or user info "
                       "(buckets are addressed path-style)"));
    }
    config.endpoint = endpoint;
  } else {
    config.endpoint = absl::StrCat("https://s3.", config.region, ".amazonaws.com");
  }
  if (std::optional<std::string> v = NonEmpty(env, "MQ_S3_MAX_ATTEMPTS")) {
    int n = 0;
    if (!absl::SimpleAtoi(*v, &n) || n < 1 || n > 20) {
      return absl::InvalidArgumentError(
          absl::StrCat("MQ_S3_MAX_ATTEMPTS = \"", *v, "\": must be an integer from 1 to 20"));
    }
    config.max_attempts = n;
  }
  if (std::optional<std::string> v = NonEmpty(env, "MQ_S3_STALL_TIMEOUT_MS")) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(*v, &n) || n < 1000 || n > 3600000) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MQ_S3_STALL_TIMEOUT_MS = \"", *v, "\": must be an integer from 1000 to 3600000"));
    }
    config.stall_timeout_ms = n;
  }
  absl::StatusOr<Credentials> credentials = ResolveCredentials(env);
  if (!credentials.ok()) return credentials.status();
  config.credentials = *std::move(credentials);
  return config;
}

}  // namespace mq::s3
