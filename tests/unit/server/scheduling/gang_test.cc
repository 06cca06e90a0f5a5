#include "server/scheduling/gang.h"

#include <gtest/gtest.h>

namespace mq::server {
namespace {

WorkerView W(std::string id, bool alive, bool idle, int64_t t, std::vector<std::string> caps) {
  return {std::move(id), alive, idle, std::move(caps), t};
}

TEST(PickGang, OldestIdleAliveCapableFirst) {
  std::vector<WorkerView> ws = {
      W("w-c", true, true, 30, {"plan"}), W("w-a", true, true, 10, {"plan"}),
      W("w-b", true, false, 5, {"plan"}),   // busy
      W("w-d", false, true, 1, {"plan"}),   // dead
      W("w-e", true, true, 2, {"other"}),   // lacks the capability
      W("w-f", true, true, 10, {"plan"}),   // ties on time: by id
  };
  auto one = PickGang(ws, "plan", 1);
  ASSERT_TRUE(one);
  EXPECT_EQ(*one, std::vector<std::string>({"w-a"}));
  auto three = PickGang(ws, "plan", 3);
  ASSERT_TRUE(three);
  EXPECT_EQ(*three, std::vector<std::string>({"w-a", "w-f", "w-c"}));
  EXPECT_FALSE(PickGang(ws, "plan", 4));
  EXPECT_FALSE(PickGang(ws, "plan", 0));
  EXPECT_FALSE(PickGang({}, "plan", 1));
  EXPECT_FALSE(PickGang(ws, "quantize:gptq", 1));
}

TEST(AnyWorkerOffers, CountsBusyButNotDead) {
  std::vector<WorkerView> ws = {W("a", true, false, 0, {"x"}), W("b", false, true, 0, {"y"})};
  EXPECT_TRUE(AnyWorkerOffers(ws, "x"));
  EXPECT_FALSE(AnyWorkerOffers(ws, "y"));
  EXPECT_FALSE(AnyWorkerOffers(ws, "z"));
}

}  // namespace
}  // namespace mq::server
