#include "server/scheduling/gang.h"

#include <gtest/gtest.h>

namespace mq::server {
namespace {

WorkerView W(std::string id, bool alive, bool idle, int64_t t, std::vector<std::string> caps) {
  return {std::move(id), alive, idle, std::move(caps), t, ""};
}

TEST(PickGang, OldestIdleAliveCapableFirst) {
  std::vector<WorkerView> ws = {
      W("w-c", true, true, 30, {"plan"}), W("w-a", true, true, 10, {"plan"}),
      W("w-b", true, false, 5, {"plan"}),  // busy
      W("w-d", false, true, 1, {"plan"}),  // dead
      W("w-e", true, true, 2, {"other"}),  // lacks the capability
      W("w-f", true, true, 10, {"plan"}),  // ties on time: by id
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

TEST(LargestDeviceMemory, OnlyWhenEveryCapableWorkerReportsOne) {
  auto gpu = [](std::string id, bool alive, int64_t bytes, std::string cap = "q") {
    WorkerView v = W(std::move(id), alive, true, 0, {cap});
    v.device_memory_bytes = bytes;
    return v;
  };
  EXPECT_FALSE(LargestDeviceMemory({}, "q"));
  EXPECT_EQ(LargestDeviceMemory({gpu("a", true, 80), gpu("b", true, 140)}, "q"), 140);
  // A dead worker and one without the capability do not count.
  EXPECT_EQ(LargestDeviceMemory(
                {gpu("a", true, 80), gpu("b", false, 140), gpu("c", true, 200, "x")}, "q"),
            80);
  // A CPU worker (no device memory) offering it: no device limit to judge.
  EXPECT_FALSE(LargestDeviceMemory({gpu("a", true, 80), gpu("b", true, 0)}, "q"));
}

TEST(LargestHostMemory, OnlyWhenEveryCapableWorkerIsAGpuWorkerThatReportsIt) {
  auto worker = [](std::string id, bool alive, int64_t device, int64_t host,
                   std::string cap = "q") {
    WorkerView v = W(std::move(id), alive, true, 0, {cap});
    v.device_memory_bytes = device;
    v.host_memory_bytes = host;
    return v;
  };
  EXPECT_FALSE(LargestHostMemory({}, "q"));
  EXPECT_EQ(LargestHostMemory({worker("a", true, 80, 256), worker("b", true, 140, 128)}, "q"), 256);
  // Dead workers and workers without the capability do not count.
  EXPECT_EQ(LargestHostMemory({worker("a", false, 80, 512), worker("b", true, 140, 128),
                               worker("c", true, 0, 0, "other")},
                              "q"),
            128);
  // A CPU worker, or one that did not report its host memory: nothing to judge.
  EXPECT_FALSE(LargestHostMemory({worker("a", true, 80, 256), worker("b", true, 0, 64)}, "q"));
  EXPECT_FALSE(LargestHostMemory({worker("a", true, 80, 256), worker("b", true, 80, 0)}, "q"));
}

WorkerView Q(std::string id, bool alive, bool idle, int64_t t, bool address = true) {
  WorkerView v = W(id, alive, idle, t, {"plan", "quantize:gptq"});
  if (address) v.gang_address = id + ":29500";
  return v;
}

GangRequest Want(int k, int64_t waited_ms = 0, int64_t gang_wait_ms = 30000) {
  GangRequest r;
  r.capability = "quantize:gptq";
  r.gang_size = k;
  r.waited_ms = waited_ms;
  r.gang_wait_ms = gang_wait_ms;
  return r;
}

TEST(DecideGang, FullGangInPickGangOrder) {
  std::vector<WorkerView> ws = {Q("w-c", true, true, 30), Q("w-a", true, true, 10),
                                Q("w-b", true, true, 10), Q("w-d", true, true, 40)};
  auto d = DecideGang(ws, Want(3));
  EXPECT_EQ(d.workers, std::vector<std::string>({"w-a", "w-b", "w-c"}));
  EXPECT_FALSE(d.shrunk);
  EXPECT_EQ(d.available, 4);
  EXPECT_EQ(d.capable, 4);
  EXPECT_TRUE(d.waiting.empty());
  EXPECT_EQ(DecideGang(ws, Want(1)).workers, std::vector<std::string>({"w-a"}));
  EXPECT_EQ(DecideGang(ws, Want(4)).workers.size(), 4u);
}

TEST(DecideGang, OnlyAliveIdleCapableWithAddressAreCandidates) {
  std::vector<WorkerView> ws = {
      Q("dead", false, true, 1),
      Q("busy", true, false, 2),
      Q("noaddr", true, true, 3, /*address=*/false),
      W("other", true, true, 4, {"quantize:rtn"}),
      Q("ok", true, true, 5),
  };
  auto d = DecideGang(ws, Want(1));
  EXPECT_EQ(d.workers, std::vector<std::string>({"ok"}));
  auto two = DecideGang(ws, Want(2, /*waited_ms=*/1000000));
  // busy, noaddr and ok are capable and alive: 3 >= 2, so no shrinking, just waiting.
  EXPECT_TRUE(two.workers.empty());
  EXPECT_EQ(two.available, 1);
  EXPECT_EQ(two.capable, 3);
  EXPECT_EQ(two.without_address, 1);
  EXPECT_NE(two.waiting.find("1 of 2 workers available"), std::string::npos) << two.waiting;
  EXPECT_NE(two.waiting.find("without a gang address"), std::string::npos) << two.waiting;
}

TEST(DecideGang, ShrinksOnlyAfterTheWaitAndWhenTooFewAreAlive) {
  std::vector<WorkerView> ws = {Q("a", true, true, 1), Q("b", true, true, 2)};
  // Fewer than K alive: wait until gang_wait_ms, then take every candidate.
  for (int64_t waited : {int64_t{0}, int64_t{29999}}) {
    auto d = DecideGang(ws, Want(3, waited));
    EXPECT_TRUE(d.workers.empty()) << waited;
    EXPECT_NE(d.waiting.find("2 of 3"), std::string::npos);
    EXPECT_NE(d.waiting.find("smaller gang"), std::string::npos);
  }
  for (int64_t waited : {int64_t{30000}, int64_t{99999}}) {
    auto d = DecideGang(ws, Want(3, waited));
    EXPECT_EQ(d.workers, std::vector<std::string>({"a", "b"})) << waited;
    EXPECT_TRUE(d.shrunk);
  }
  // gang_wait_ms = 0 shrinks at once.
  EXPECT_TRUE(DecideGang(ws, Want(3, 0, 0)).shrunk);
  // Enough alive but one busy: wait however long.
  ws.push_back(Q("c", true, false, 3));
  EXPECT_TRUE(DecideGang(ws, Want(3, 1 << 30)).workers.empty());
  // A dead third does not count as alive: shrink.
  ws.back().alive = false;
  EXPECT_EQ(DecideGang(ws, Want(3, 30000)).workers.size(), 2u);
  // No candidate at all: nothing to shrink to.
  std::vector<WorkerView> none = {Q("x", true, false, 1)};
  EXPECT_TRUE(DecideGang(none, Want(2, 1 << 30)).workers.empty());
  EXPECT_TRUE(DecideGang({}, Want(1, 1 << 30)).workers.empty());
}

TEST(DecideGang, NonPositiveGangSizeMeansOne) {
  std::vector<WorkerView> ws = {Q("a", true, true, 1), Q("b", true, true, 2)};
  EXPECT_EQ(DecideGang(ws, Want(0)).workers, std::vector<std::string>({"a"}));
}

}  // namespace
}  // namespace mq::server
