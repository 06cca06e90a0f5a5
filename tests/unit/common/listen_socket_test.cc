// common/listen_socket and common/random_secret: a listener bound to one address only (not
// reachable on another address of the host), names resolved, wildcards and foreign addresses
// refused; secrets of the requested size that differ.
#include "common/listen_socket.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <set>
#include <string>

#include "common/random_secret.h"
#include "tests/unit/common/connects.h"

namespace mq {
namespace {

using mq::testing::Connects;

TEST(ListenOnTest, ListensOnTheGivenAddressOnly) {
  absl::StatusOr<int> fd = ListenOn("127.0.0.1", 0);
  ASSERT_TRUE(fd.ok()) << fd.status();
  absl::StatusOr<int> port = BoundPort(*fd);
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_GT(*port, 0);
  EXPECT_TRUE(Connects("127.0.0.1", *port));
  // 127.0.0.2 is another address of this host (all of 127/8 is local): nothing listens there.
  EXPECT_FALSE(Connects("127.0.0.2", *port));
  ::close(*fd);
}

TEST(ListenOnTest, ReusesAPortRightAfterItsListenerClosed) {
  absl::StatusOr<int> fd = ListenOn("127.0.0.1", 0);
  ASSERT_TRUE(fd.ok()) << fd.status();
  const int port = *BoundPort(*fd);
  EXPECT_TRUE(Connects("127.0.0.1", port));  // leaves a connection in TIME_WAIT
  ::close(*fd);
  absl::StatusOr<int> again = ListenOn("127.0.0.1", port);
  ASSERT_TRUE(again.ok()) << again.status();
  ::close(*again);
}

TEST(ListenOnTest, ResolvesNames) {
  absl::StatusOr<int> fd = ListenOn("localhost", 0);
  ASSERT_TRUE(fd.ok()) << fd.status();
  ::close(*fd);
}

TEST(ListenOnTest, RefusesWildcardsForeignAddressesAndUnknownNames) {
  for (const char* host : {"0.0.0.0", "::"}) {
    absl::StatusOr<int> fd = ListenOn(host, 0);
    EXPECT_EQ(fd.status().code(), absl::StatusCode::kInvalidArgument) << host;
    EXPECT_NE(fd.status().message().find("wildcard"), std::string::npos) << fd.status();
  }
  // TEST-NET-1 (RFC 5737): never an address of this host.
  absl::StatusOr<int> foreign = ListenOn("192.0.2.1", 0);
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kUnavailable) << foreign.status();
  EXPECT_NE(foreign.status().message().find("192.0.2.1:0"), std::string::npos);
  absl::StatusOr<int> unknown = ListenOn("no-such-host.invalid", 0);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument) << unknown.status();
  EXPECT_NE(unknown.status().message().find("does not resolve"), std::string::npos);
  EXPECT_EQ(ListenOn("", 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ListenOn("127.0.0.1", 70000).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RandomHexSecretTest, HexOfTheRequestedSizeAndNeverTheSame) {
  std::set<std::string> seen;
  for (int i = 0; i < 100; ++i) {
    absl::StatusOr<std::string> s = RandomHexSecret(16);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->size(), 32u);
    EXPECT_EQ(s->find_first_not_of("0123456789abcdef"), std::string::npos) << *s;
    seen.insert(*s);
  }
  EXPECT_EQ(seen.size(), 100u);
  EXPECT_EQ(RandomHexSecret(0).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mq
