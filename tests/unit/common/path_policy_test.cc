#include "common/path_policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace mq {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

PathPolicy Policy(std::vector<std::string> read, std::vector<std::string> write) {
  PathPolicy p;
  p.read_roots = std::move(read);
  p.write_roots = std::move(write);
  p.enforced = true;
  return p;
}

// ---- lexical ----

TEST(PathPolicyLexical, NormalForm) {
  EXPECT_EQ(LexicalNormal("/x//a/./b/../c/"), "/x/a/c");
  EXPECT_EQ(LexicalNormal("/../.."), "/");
  EXPECT_EQ(LexicalNormal("/"), "/");
  EXPECT_EQ(LexicalNormal("/data/out/../../etc"), "/etc");
  EXPECT_EQ(StripFileScheme("file:///a/b"), "/a/b");
  EXPECT_EQ(StripFileScheme("/a/b"), "/a/b");
}

TEST(PathPolicyLexical, WithinIsComponentWise) {
  EXPECT_TRUE(PathWithin("/data/out", "/data/out"));
  EXPECT_TRUE(PathWithin("/data/out/j1", "/data/out"));
  EXPECT_FALSE(PathWithin("/data/out2", "/data/out"));
  EXPECT_FALSE(PathWithin("/data/ou", "/data/out"));
  EXPECT_FALSE(PathWithin("/data", "/data/out"));
  EXPECT_TRUE(PathWithin("/anything", "/"));
}

TEST(PathPolicyLexical, NormalizeRootRefusesRelativeAndEmpty) {
  EXPECT_EQ(*NormalizeRoot("--allow-read", "/data//models/./"), "/data/models");
  EXPECT_EQ(*NormalizeRoot("--allow-read", "file:///data/x/../y"), "/data/y");
  absl::StatusOr<std::string> empty = NormalizeRoot("--allow-write", "");
  ASSERT_FALSE(empty.ok());
  EXPECT_THAT(empty.status().message(), HasSubstr("--allow-write"));
  absl::StatusOr<std::string> relative = NormalizeRoot("--allow-read", "data/models");
  ASSERT_FALSE(relative.ok());
  EXPECT_EQ(relative.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(relative.status().message(), HasSubstr("absolute"));
  EXPECT_THAT(relative.status().message(), HasSubstr("data/models"));
}

TEST(PathPolicyLexical, NotEnforcedAllowsEverything) {
  PathPolicy open;
  EXPECT_TRUE(CheckPathLexical(open, PathAccess::kWrite, "spec.output_uri", "/etc/x").ok());
}

TEST(PathPolicyLexical, PrefixTrickeryAndDotDot) {
  const PathPolicy p = Policy({"/data/models"}, {"/data/out"});
  EXPECT_TRUE(CheckPathLexical(p, PathAccess::kWrite, "spec.output_uri", "/data/out/j1").ok());
  EXPECT_TRUE(
      CheckPathLexical(p, PathAccess::kWrite, "spec.output_uri", "file:///data/out/j1").ok());
  EXPECT_TRUE(CheckPathLexical(p, PathAccess::kRead, "spec.model_uri", "/data/models/m/./").ok());
  for (const char* bad :
       {"/data/out2/j1", "/data/out/../etc", "/data/out/j/../../../etc/x", "/etc/x", "/data"}) {
    absl::Status s = CheckPathLexical(p, PathAccess::kWrite, "spec.output_uri", bad);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
    EXPECT_THAT(s.message(), HasSubstr("spec.output_uri"));
    EXPECT_THAT(s.message(), HasSubstr(bad));
    EXPECT_THAT(s.message(), HasSubstr("outside the allowed write roots (/data/out)"));
    EXPECT_THAT(s.message(), HasSubstr("--allow-write"));
  }
  // A write root does not allow reading, nor a read root writing.
  EXPECT_FALSE(CheckPathLexical(p, PathAccess::kRead, "spec.model_uri", "/data/out/m").ok());
  EXPECT_FALSE(CheckPathLexical(p, PathAccess::kWrite, "spec.output_uri", "/data/models/o").ok());
  // Optional fields left empty are not checked.
  EXPECT_TRUE(CheckPathLexical(p, PathAccess::kRead, "spec.calibration.tokenizer_uri", "").ok());
}

TEST(PathPolicyLexical, S3RootsAndLocations) {
  absl::StatusOr<std::string> root = NormalizeRoot("--allow-read", "s3://models/team/");
  ASSERT_TRUE(root.ok()) << root.status();
  EXPECT_EQ(*root, "s3://models/team");
  for (const char* bad : {"s3://", "s3://b/../x", "s3://b//x"}) {
    EXPECT_EQ(NormalizeRoot("--allow-read", bad).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
  const PathPolicy p = Policy({"/data/models", "s3://models/team"}, {"/data/out"});
  for (auto check : {CheckPathLexical, CheckPathResolved}) {
    EXPECT_TRUE(check(p, PathAccess::kRead, "spec.model_uri", "s3://models/team/ds3").ok());
    EXPECT_TRUE(check(p, PathAccess::kRead, "spec.model_uri", "s3://models/team").ok());
    for (const char* bad : {"s3://models/team2/x", "s3://models/other", "s3://other/team/x"}) {
      absl::Status s = check(p, PathAccess::kRead, "spec.model_uri", bad);
      ASSERT_FALSE(s.ok()) << bad;
      EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
      EXPECT_THAT(s.message(), HasSubstr(bad));
    }
    // An s3:// read root allows no s3:// writes, and no local path looking like it.
    EXPECT_FALSE(check(p, PathAccess::kWrite, "spec.output_uri", "s3://models/team/o").ok());
    EXPECT_FALSE(check(p, PathAccess::kRead, "spec.model_uri", "/s3:/models/team/x").ok());
  }
}

TEST(PathPolicyLexical, EmptyListAllowsNothingAndSaysSo) {
  const PathPolicy p = Policy({"/data"}, {});
  absl::Status s = CheckPathLexical(p, PathAccess::kWrite, "spec.output_uri", "/data/out");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("no write roots are allowed"));
  EXPECT_THAT(s.message(), HasSubstr("--allow-write"));
}

// ---- resolving ----

class PathPolicyResolved : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/mq_path_policy_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    base_ = fs::path(tmpl);
    fs::create_directories(base_ / "roots" / "out");
    fs::create_directories(base_ / "roots" / "in");
    fs::create_directories(base_ / "outside");
    std::ofstream(base_ / "outside" / "secret") << "top secret\n";
    std::ofstream(base_ / "roots" / "in" / "data.jsonl") << "{}\n";
    policy_ = Policy({Str("roots/in")}, {Str("roots/out")});
  }
  void TearDown() override { fs::remove_all(base_); }
  std::string Str(const std::string& rel) const { return (base_ / rel).string(); }

  fs::path base_;
  PathPolicy policy_;
};

TEST_F(PathPolicyResolved, PlainPathsInsideTheRootsPass) {
  EXPECT_TRUE(CheckPathResolved(policy_, PathAccess::kRead, "spec.calibration.dataset_uri",
                                Str("roots/in/data.jsonl"))
                  .ok());
  // Not there yet: the nearest existing ancestor is resolved, the rest appended.
  EXPECT_TRUE(
      CheckPathResolved(policy_, PathAccess::kWrite, "spec.output_uri", Str("roots/out/a/b/c"))
          .ok());
  EXPECT_EQ(*ResolvePath(Str("roots/out/a/b/../c")), Str("roots/out/a/c"));
}

TEST_F(PathPolicyResolved, SymlinkEscapesAreRefusedNamingBothPaths) {
  fs::create_directory_symlink(base_ / "outside", base_ / "roots" / "out" / "link");
  const std::string through = Str("roots/out/link/new/dir");
  absl::Status s = CheckPathResolved(policy_, PathAccess::kWrite, "spec.output_uri", through);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.message(), HasSubstr(through));
  EXPECT_THAT(s.message(), HasSubstr("resolves to \"" + Str("outside/new/dir") + "\""));
  EXPECT_THAT(s.message(), HasSubstr("--allow-write"));
  // The lexical check alone cannot see it.
  EXPECT_TRUE(CheckPathLexical(policy_, PathAccess::kWrite, "spec.output_uri", through).ok());
  // Nothing was created.
  EXPECT_FALSE(fs::exists(base_ / "outside" / "new"));

  fs::create_symlink(base_ / "outside" / "secret", base_ / "roots" / "in" / "d.jsonl");
  EXPECT_FALSE(CheckPathResolved(policy_, PathAccess::kRead, "spec.calibration.dataset_uri",
                                 Str("roots/in/d.jsonl"))
                   .ok());
}

TEST_F(PathPolicyResolved, DotDotAfterASymlinkFollowsTheKernel) {
  // roots/out/link -> outside/sub; "link/.." is "outside", not "roots/out".
  fs::create_directories(base_ / "outside" / "sub");
  fs::create_directory_symlink(base_ / "outside" / "sub", base_ / "roots" / "out" / "link");
  EXPECT_EQ(*ResolvePath(Str("roots/out/link/../x")), Str("outside/x"));
  EXPECT_FALSE(
      CheckPathResolved(policy_, PathAccess::kWrite, "spec.output_uri", Str("roots/out/link/../x"))
          .ok());
  // Lexical ".." out of a root is refused too.
  EXPECT_FALSE(
      CheckPathResolved(policy_, PathAccess::kWrite, "spec.output_uri", Str("roots/out/../../x"))
          .ok());
}

TEST_F(PathPolicyResolved, DanglingSymlinkIsRefused) {
  fs::create_symlink(base_ / "outside" / "not-yet", base_ / "roots" / "out" / "dangling");
  absl::Status s =
      CheckPathResolved(policy_, PathAccess::kWrite, "spec.output_uri", Str("roots/out/dangling"));
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("dangling"));
}

TEST_F(PathPolicyResolved, RootThatIsItselfASymlink) {
  // The root named on the command line is a symlink to the real directory: paths through
  // either name pass, paths elsewhere do not.
  fs::create_directories(base_ / "real-out");
  fs::create_directory_symlink(base_ / "real-out", base_ / "link-out");
  const PathPolicy p = Policy({}, {Str("link-out")});
  EXPECT_TRUE(CheckPathResolved(p, PathAccess::kWrite, "spec.output_uri", Str("link-out/j1")).ok());
  EXPECT_TRUE(CheckPathResolved(p, PathAccess::kWrite, "spec.output_uri", Str("real-out/j1")).ok());
  EXPECT_FALSE(CheckPathResolved(p, PathAccess::kWrite, "spec.output_uri", Str("outside/j1")).ok());
  // Prefix trickery after resolution: "real-out2" is not inside "real-out".
  fs::create_directories(base_ / "real-out2");
  EXPECT_FALSE(
      CheckPathResolved(p, PathAccess::kWrite, "spec.output_uri", Str("real-out2/j1")).ok());
}

TEST_F(PathPolicyResolved, NotEnforcedChecksNothing) {
  EXPECT_TRUE(
      CheckPathResolved(PathPolicy{}, PathAccess::kWrite, "spec.output_uri", "/etc/x").ok());
}

// ---- model directory files ----

TEST_F(PathPolicyResolved, ModelDirFileRefusesSymlinksLeadingOut) {
  const fs::path model = base_ / "roots" / "in" / "model";
  fs::create_directories(model / "sub");
  std::ofstream(model / "config.json") << "{}";
  std::ofstream(model / "sub" / "real.safetensors") << "x";
  fs::create_symlink(base_ / "outside" / "secret", model / "tokenizer.json");
  fs::create_symlink(model / "sub" / "real.safetensors", model / "inside.safetensors");
  fs::create_directory_symlink(base_ / "outside", model / "dirlink");

  EXPECT_EQ(*ModelDirFile(model.string(), "config.json"), (model / "config.json").string());
  // A symlink that stays inside the model directory is allowed.
  EXPECT_EQ(*ModelDirFile(model.string(), "inside.safetensors"),
            (model / "inside.safetensors").string());
  // Missing files are left to the caller.
  EXPECT_EQ(*ModelDirFile(model.string(), "missing.json"), (model / "missing.json").string());

  absl::StatusOr<std::string> out = ModelDirFile(model.string(), "tokenizer.json");
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(out.status().message(), HasSubstr("\"tokenizer.json\""));
  EXPECT_THAT(out.status().message(), HasSubstr("a symlink leading out of the model directory"));
  EXPECT_THAT(out.status().message(), Not(HasSubstr("top secret")));
  EXPECT_FALSE(ModelDirFile(model.string(), "dirlink/secret").ok());

  // The model directory itself may be reached through a symlink.
  fs::create_directory_symlink(model, base_ / "model-link");
  EXPECT_TRUE(ModelDirFile((base_ / "model-link").string(), "inside.safetensors").ok());
  EXPECT_FALSE(ModelDirFile((base_ / "model-link").string(), "tokenizer.json").ok());
}

}  // namespace
}  // namespace mq
