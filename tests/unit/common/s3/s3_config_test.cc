#include "common/s3/s3_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

namespace mq::s3 {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

Env MapEnv(std::map<std::string, std::string> vars) {
  return [vars](const char* name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

std::filesystem::path TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("mq-s3cfg-" + std::to_string(::getpid()) + "-" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void Write(const std::filesystem::path& p, const std::string& text) { std::ofstream(p) << text; }

TEST(ParseS3Uri, Good) {
  absl::StatusOr<S3Uri> u = ParseS3Uri("spec.model_uri", "s3://my-bucket/models/ds3/");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->bucket, "my-bucket");
  EXPECT_EQ(u->key, "models/ds3");
  EXPECT_EQ(u->ToString(), "s3://my-bucket/models/ds3");
  EXPECT_EQ(u->Child("config.json").key, "models/ds3/config.json");
  u = ParseS3Uri("f", "s3://b.c-1");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->key, "");
  EXPECT_EQ(u->Child("x").key, "x");
}

TEST(ParseS3Uri, BadNamesFieldAndRule) {
  struct Case {
    const char* uri;
    const char* why;
  } cases[] = {
      {"/local/path", "must start with s3://"},
      {"s3://", "not a valid S3 bucket name"},
      {"s3://ab/x", "not a valid S3 bucket name"},
      {"s3://Upper/x", "not a valid S3 bucket name"},
      {"s3://-bucket/x", "not a valid S3 bucket name"},
      {"s3://bucket//x", "empty path component"},
      {"s3://bucket/a/../b", "\"..\""},
      {"s3://bucket/a/\x01", "control character"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<S3Uri> u = ParseS3Uri("spec.output_uri", c.uri);
    ASSERT_FALSE(u.ok()) << c.uri;
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(u.status().message()), HasSubstr("spec.output_uri"));
    EXPECT_THAT(std::string(u.status().message()), HasSubstr(c.why)) << c.uri;
  }
  EXPECT_FALSE(ParseS3Uri("f", "s3://bucket/" + std::string(1100, 'k')).ok());
}

TEST(ResolveCredentials, EnvironmentFirst) {
  absl::StatusOr<Credentials> c = ResolveCredentials(MapEnv(
      {{"AWS_ACCESS_KEY_ID", "AK"}, {"AWS_SECRET_ACCESS_KEY", "SK"}, {"AWS_SESSION_TOKEN", "T"}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->access_key_id, "AK");
  EXPECT_EQ(c->secret_access_key, "SK");
  EXPECT_EQ(c->session_token, "T");
}

TEST(ResolveCredentials, HalfSetEnvironmentIsAnErrorWithoutTheSecret) {
  absl::StatusOr<Credentials> c =
      ResolveCredentials(MapEnv({{"AWS_SECRET_ACCESS_KEY", "TOPSECRET"}}));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("AWS_ACCESS_KEY_ID is not"));
  EXPECT_THAT(std::string(c.status().message()), Not(HasSubstr("TOPSECRET")));
}

TEST(ResolveCredentials, MountedSecretDirectory) {
  auto dir = TempDir("secret");
  Write(dir / "access_key_id", "AKDIR\n");
  Write(dir / "secret_access_key", "  SKDIR\n");
  absl::StatusOr<Credentials> c = ResolveCredentials(MapEnv({{"MQ_S3_CREDENTIALS_DIR", dir}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->access_key_id, "AKDIR");
  EXPECT_EQ(c->secret_access_key, "SKDIR");
  EXPECT_THAT(c->source, HasSubstr(dir.string()));
  std::filesystem::remove(dir / "secret_access_key");
  c = ResolveCredentials(MapEnv({{"MQ_S3_CREDENTIALS_DIR", dir}}));
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("no file secret_access_key"));
}

TEST(ResolveCredentials, SharedFileAndProfile) {
  auto dir = TempDir("shared");
  Write(dir / "credentials",
        "# comment\n[default]\naws_access_key_id = AKDEF\naws_secret_access_key=SKDEF\n\n"
        "[prod]\naws_access_key_id=AKPROD\naws_secret_access_key = SKPROD\n"
        "aws_session_token = TOK\n");
  const std::string file = (dir / "credentials").string();
  absl::StatusOr<Credentials> c =
      ResolveCredentials(MapEnv({{"AWS_SHARED_CREDENTIALS_FILE", file}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->access_key_id, "AKDEF");
  c = ResolveCredentials(MapEnv({{"AWS_SHARED_CREDENTIALS_FILE", file}, {"AWS_PROFILE", "prod"}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->secret_access_key, "SKPROD");
  EXPECT_EQ(c->session_token, "TOK");
  c = ResolveCredentials(MapEnv({{"AWS_SHARED_CREDENTIALS_FILE", file}, {"AWS_PROFILE", "nope"}}));
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("no [nope] section"));
  // HOME/.aws/credentials when no file is named.
  std::filesystem::create_directories(dir / "home/.aws");
  std::filesystem::copy_file(file, dir / "home/.aws/credentials");
  c = ResolveCredentials(MapEnv({{"HOME", (dir / "home").string()}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->access_key_id, "AKDEF");
}

TEST(ResolveCredentials, NoneSaysWhereItLooked) {
  absl::StatusOr<Credentials> c = ResolveCredentials(MapEnv({{"HOME", "/nonexistent-home"}}));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("AWS_ACCESS_KEY_ID"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("MQ_S3_CREDENTIALS_DIR"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("/nonexistent-home/.aws/credentials"));
}

TEST(S3ConfigFromEnv, EndpointRegionAndLimits) {
  const std::map<std::string, std::string> creds = {{"AWS_ACCESS_KEY_ID", "A"},
                                                    {"AWS_SECRET_ACCESS_KEY", "S"}};
  auto with = [&](std::map<std::string, std::string> extra) {
    extra.insert(creds.begin(), creds.end());
    return S3ConfigFromEnv(MapEnv(extra));
  };
  absl::StatusOr<S3Config> c = with({{"AWS_DEFAULT_REGION", "eu-west-1"}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->region, "eu-west-1");
  EXPECT_EQ(c->endpoint, "https://s3.eu-west-1.amazonaws.com");
  c = with({{"AWS_REGION", "us-west-2"},
            {"AWS_DEFAULT_REGION", "eu-west-1"},
            {"MQ_S3_ENDPOINT", "http://127.0.0.1:9000/"}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->region, "us-west-2");
  EXPECT_EQ(c->endpoint, "http://127.0.0.1:9000");
  for (const char* bad : {"127.0.0.1:9000", "ftp://x", "http://h/path", "http://u:p@h"}) {
    c = with({{"MQ_S3_ENDPOINT", bad}});
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr("MQ_S3_ENDPOINT"));
  }
  c = with({{"AWS_REGION", "US EAST"}});
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("AWS_REGION"));
  c = with({{"MQ_S3_MAX_ATTEMPTS", "0"}});
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("from 1 to 20"));
  EXPECT_FALSE(S3ConfigFromEnv(MapEnv({{"HOME", "/nonexistent"}})).ok());
}

}  // namespace
}  // namespace mq::s3
