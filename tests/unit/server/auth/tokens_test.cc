#include "server/auth/tokens.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "common/sha256.h"
#include "server/auth/authenticator.h"

namespace mq::server {
namespace {

class TokensTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("mq-tokens-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string Write(const std::string& text) {
    const std::string path = (dir_ / "tokens").string();
    std::ofstream(path) << text;
    return path;
  }

  std::filesystem::path dir_;
};

TEST_F(TokensTest, AddTokenAppendsAHashThatFindsThePrincipal) {
  const std::string path = (dir_ / "tokens").string();
  auto alice = AddToken(path, "alice", Role::kSubmitter);
  ASSERT_TRUE(alice.ok()) << alice.status();
  auto workers = AddToken(path, "workers", Role::kWorker);
  ASSERT_TRUE(workers.ok()) << workers.status();
  EXPECT_NE(*alice, *workers);
  EXPECT_EQ(alice->size(), 4 + 64);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600);
  std::ifstream in(path);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text.find(*alice), std::string::npos);  // the file holds hashes only
  EXPECT_NE(text.find("alice submitter sha256:" + Sha256Hex(*alice)), std::string::npos);

  auto table = TokenTable::Load(path);
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->size(), 2u);
  const TokenTable::Entry* e = table->Find(*alice);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->principal, "alice");
  EXPECT_EQ(e->role, Role::kSubmitter);
  EXPECT_EQ(table->Find(alice->substr(0, 20)), nullptr);
  EXPECT_EQ(table->Find(""), nullptr);
}

TEST_F(TokensTest, MalformedLinesAreNamedWithoutTheirContent) {
  const std::string hash = "sha256:" + std::string(64, 'a');
  struct Case {
    std::string text;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"# c\n\nalice submitter\n", "line 3: expected 3 fields"},
      {"alice boss " + hash + "\n", "line 1: role \"boss\": must be viewer, submitter, admin"},
      {"al ice submitter " + hash + "\n", "line 1: expected 3 fields"},
      {"al/ice submitter " + hash + "\n", "line 1: principal: must be 1..64 characters"},
      {"anonymous admin " + hash + "\n", "line 1: principal \"anonymous\": reserved"},
      {"alice admin mqt_SECRETSECRET\n", "line 1: third field must be sha256:"},
      {"alice admin sha256:" + std::string(64, 'A') + "\n", "line 1: third field must be"},
      {"a admin " + hash + "\nb viewer " + hash + "\n", "line 2: the same token hash"},
  };
  for (const Case& c : cases) {
    auto table = TokenTable::Load(Write(c.text));
    ASSERT_FALSE(table.ok()) << c.text;
    const std::string message(table.status().message());
    EXPECT_NE(message.find(c.expect), std::string::npos) << message;
    EXPECT_EQ(message.find("SECRET"), std::string::npos) << message;
  }
  EXPECT_EQ(TokenTable::Load((dir_ / "absent").string()).status().code(),
            absl::StatusCode::kNotFound);
  // add-token refuses to append to a malformed file.
  const std::string bad = Write("alice admin mqt_SECRET\n");
  EXPECT_FALSE(AddToken(bad, "bob", Role::kViewer).ok());
  EXPECT_FALSE(AddToken((dir_ / "t2").string(), "x509:evil", Role::kWorker).ok());
}

TEST(AuthorizeTest, RolesAndOwners) {
  const Caller viewer{"vera", Role::kViewer, false, ""};
  const Caller submitter{"alice", Role::kSubmitter, false, ""};
  const Caller admin{"root", Role::kAdmin, false, ""};
  const Caller worker{"workers", Role::kWorker, false, ""};
  EXPECT_TRUE(Authorize(viewer, Need::kView, "GetJob").ok());
  EXPECT_EQ(Authorize(viewer, Need::kSubmit, "SubmitJob").message(),
            "principal \"vera\" (role viewer) may not call SubmitJob: it needs role submitter or "
            "admin");
  EXPECT_TRUE(Authorize(submitter, Need::kSubmit, "SubmitJob").ok());
  EXPECT_TRUE(Authorize(admin, Need::kSubmit, "CancelJob").ok());
  EXPECT_FALSE(Authorize(admin, Need::kWork, "Heartbeat").ok());
  EXPECT_FALSE(Authorize(worker, Need::kView, "ListJobs").ok());
  EXPECT_TRUE(Authorize(worker, Need::kWork, "Heartbeat").ok());
  EXPECT_TRUE(Authorize(Caller::Anonymous(), Need::kWork, "Heartbeat").ok());
  EXPECT_TRUE(AuthorizeOwner(submitter, "alice", "j-1", "cancel").ok());
  EXPECT_TRUE(AuthorizeOwner(admin, "alice", "j-1", "cancel").ok());
  EXPECT_EQ(
      AuthorizeOwner(Caller{"bob", Role::kSubmitter, false, ""}, "alice", "j-1", "cancel").code(),
      absl::StatusCode::kPermissionDenied);
}

}  // namespace
}  // namespace mq::server
