// worker/pipeline/gang: two ranks in one process (Gloo over loopback). Rank 0's rendezvous
// store listens on its gang host only; ranks join only with the same secret, and a rank with
// another secret (or none) fails with UNAVAILABLE before any collective.
#include "worker/pipeline/gang.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <thread>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "absl/strings/str_cat.h"
#include "common/listen_socket.h"
#include "tests/unit/common/connects.h"

namespace mq::pipeline {
namespace {

int FreePort() {
  absl::StatusOr<int> fd = ListenOn("127.0.0.1", 0);
  EXPECT_TRUE(fd.ok()) << fd.status();
  const int port = *BoundPort(*fd);
  ::close(*fd);
  return port;
}

using mq::testing::Connects;

GangOptions Options(int rank, int port, const std::string& secret) {
  GangOptions o;
  o.rank = rank;
  o.world_size = 2;
  o.rendezvous = absl::StrCat("127.0.0.1:", port);
  o.key = "job/1";
  o.secret = secret;
  o.local_host = "127.0.0.1";
  o.join_timeout = std::chrono::milliseconds(3000);
  o.timeout = std::chrono::milliseconds(10000);
  return o;
}

TEST(GangTest, JoinsWithTheSameSecretAndListensOnTheGangHostOnly) {
  const int port = FreePort();
  absl::StatusOr<std::unique_ptr<Gang>> g0, g1;
  std::thread t0([&] { g0 = Gang::Join(Options(0, port, "s3cret")); });
  std::thread t1([&] { g1 = Gang::Join(Options(1, port, "s3cret")); });
  t0.join();
  t1.join();
  ASSERT_TRUE(g0.ok()) << g0.status();
  ASSERT_TRUE(g1.ok()) << g1.status();
  // The store serves 127.0.0.1 only: another address of this host finds nothing listening.
  EXPECT_TRUE(Connects("127.0.0.1", port));
  EXPECT_FALSE(Connects("127.0.0.2", port));
  at::Tensor a = at::ones({3}, at::kFloat), b = at::full({3}, 2.0, at::kFloat);
  std::thread r0([&] { EXPECT_TRUE((*g0)->AllReduceSum(a).ok()); });
  std::thread r1([&] { EXPECT_TRUE((*g1)->AllReduceSum(b).ok()); });
  r0.join();
  r1.join();
  EXPECT_TRUE(at::equal(a, at::full({3}, 3.0, at::kFloat)));
  EXPECT_TRUE(at::equal(b, a));
}

TEST(GangTest, ARankWithAnotherSecretIsRefused) {
  const int port = FreePort();
  absl::StatusOr<std::unique_ptr<Gang>> g0, g1;
  std::thread t0([&] { g0 = Gang::Join(Options(0, port, "secret-a")); });
  std::thread t1([&] { g1 = Gang::Join(Options(1, port, "secret-b")); });
  t0.join();
  t1.join();
  ASSERT_FALSE(g1.ok());
  EXPECT_EQ(g1.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(g1.status().message().find("derived from another secret"), std::string::npos)
      << g1.status();
  for (const char* secret : {"secret-a", "secret-b"}) {
    EXPECT_EQ(g1.status().message().find(secret), std::string::npos) << g1.status();
  }
  // Rank 0 waits for a rank 1 that never joins its keys and gives up at the join timeout.
  ASSERT_FALSE(g0.ok());
  EXPECT_EQ(g0.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(g0.status().message().find("secret-a"), std::string::npos) << g0.status();
}

TEST(GangTest, ARankFindsNoCheckWhenTheStoreIsNotItsRankZeros) {
  // A store with this gang's key but no secret check (e.g. a stale or foreign server).
  const int port = FreePort();
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(port);
  so.isServer = true;
  so.waitWorkers = false;
  auto foreign = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", so);
  GangOptions o = Options(1, port, "s3cret");
  o.join_timeout = std::chrono::milliseconds(1000);
  absl::StatusOr<std::unique_ptr<Gang>> g1 = Gang::Join(o);
  ASSERT_FALSE(g1.ok());
  EXPECT_EQ(g1.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(g1.status().message().find("absent after 1000 ms"), std::string::npos) << g1.status();
}

TEST(GangTest, NoSecretOrAForeignGangHostIsRefused) {
  absl::StatusOr<std::unique_ptr<Gang>> g = Gang::Join(Options(1, FreePort(), ""));
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(g.status().message().find("no rendezvous secret"), std::string::npos) << g.status();
  GangOptions o = Options(0, FreePort(), "s3cret");
  o.local_host = "192.0.2.1";  // TEST-NET-1: not an address of this host
  g = Gang::Join(o);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(g.status().message().find("cannot serve gang rendezvous store"), std::string::npos)
      << g.status();
  // A gang of one needs neither.
  o.world_size = 1;
  o.rank = 0;
  o.secret.clear();
  EXPECT_TRUE(Gang::Join(o).ok());
}

}  // namespace
}  // namespace mq::pipeline
