#include "server/scheduling/retry.h"

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace mq::server {
namespace {

TEST(InfrastructureRetryDelay, DoublesFromOneSecondUpToAMinute) {
  EXPECT_EQ(InfrastructureRetryDelayMs(1), 1000);
  EXPECT_EQ(InfrastructureRetryDelayMs(2), 2000);
  EXPECT_EQ(InfrastructureRetryDelayMs(3), 4000);
  EXPECT_EQ(InfrastructureRetryDelayMs(6), 32000);
  EXPECT_EQ(InfrastructureRetryDelayMs(7), 60000);
  EXPECT_EQ(InfrastructureRetryDelayMs(1000), 60000);
  EXPECT_EQ(InfrastructureRetryDelayMs(0), 1000);
}

constexpr char kJoin[] =
    "cannot join gang at 10.1.2.3:29500 (rank 0's --gang-host/--gang-port) within 120000 ms: The "
    "client socket has timed out after 120013ms while trying to connect to (10.1.2.3, 29500).";

TEST(FailureSignature, TimingsAttemptsAndReportingRankDoNotMatter) {
  const std::string a = FailureSignature(absl::StrCat("rank 1 (w2) failed: ", kJoin), {"w1", "w2"});
  std::string other_timing = kJoin;
  other_timing.replace(other_timing.find("120013ms"), 8, "120002ms");
  EXPECT_EQ(a, FailureSignature(absl::StrCat("rank 0 (w1) failed: ", other_timing), {"w2", "w1"}));
  // The address is kept.
  EXPECT_NE(a.find("10.1.2.3:29500"), std::string::npos) << a;
  EXPECT_EQ(a.find("120013"), std::string::npos) << a;
}

TEST(FailureSignature, AddressesAndWorkersMatter) {
  const std::string a = FailureSignature(kJoin, {"w1", "w2"});
  std::string other_host = kJoin;
  other_host.replace(other_host.find("10.1.2.3:"), 9, "10.1.2.4:");
  EXPECT_NE(a, FailureSignature(other_host, {"w1", "w2"}));
  std::string other_port = kJoin;
  other_port.replace(other_port.find(":29500"), 6, ":29501");
  EXPECT_NE(a, FailureSignature(other_port, {"w1", "w2"}));
  EXPECT_NE(a, FailureSignature(kJoin, {"w1", "w3"}));
  EXPECT_NE(FailureSignature("peer w1 lost", {}), FailureSignature("peer w2 lost", {}));
  EXPECT_EQ(FailureSignature("gang all-to-all failed at host-a:4000", {}),
            FailureSignature("gang all-to-all failed at host-a:4000", {}));
  EXPECT_NE(FailureSignature("gang all-to-all failed at host-a:4000", {}),
            FailureSignature("gang all-to-all failed at host-b:4000", {}));
}

TEST(FailureSignature, IdsAreNormalised) {
  EXPECT_EQ(FailureSignature("assignment a-01JEQZ8N3D2V5W7X9Y0Z1A2B3C ended", {}),
            FailureSignature("assignment a-01JEQZ8N3D2V5W7X9Y0Z1A2B3D ended", {}));
  EXPECT_EQ(FailureSignature("gang key j-01JEQZ8N3D2V5W7X9Y0Z1A2B3C/3", {}),
            FailureSignature("gang key j-01JEQZ8N3D2V5W7X9Y0Z1A2B3C/4", {}));
}

}  // namespace
}  // namespace mq::server
