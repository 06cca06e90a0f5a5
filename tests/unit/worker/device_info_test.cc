#include "worker/device_info.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

namespace mq::worker {
namespace {

// POSIX only: the worker library links libtorch, whose own std::filesystem symbols crash here.
class HostMemoryLimitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = ::testing::TempDir() + "cgroup-XXXXXX";
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    root_ = templ;
  }
  // Writes `text` to root_/rel, creating its folders.
  void Write(const std::string& rel, const std::string& text) {
    for (size_t at = rel.find('/'); at != std::string::npos; at = rel.find('/', at + 1)) {
      ::mkdir((root_ + "/" + rel.substr(0, at)).c_str(), 0755);
    }
    std::ofstream(root_ + "/" + rel) << text;
  }
  int64_t Limit(int64_t physical) {
    return HostMemoryLimit(physical, root_, root_ + "/proc-cgroup");
  }
  std::string root_;
};

constexpr int64_t kGiB = int64_t{1} << 30;

TEST_F(HostMemoryLimitTest, PhysicalWhenNoGroupLimitsIt) {
  EXPECT_EQ(Limit(128 * kGiB), 128 * kGiB);                        // nothing to read
  Write("memory.max", "max\n");                                    // v2 without a limit
  Write("memory/memory.limit_in_bytes", "9223372036854771712\n");  // v1 without a limit
  EXPECT_EQ(Limit(128 * kGiB), 128 * kGiB);
}

TEST_F(HostMemoryLimitTest, AContainersV2LimitOfItsOwnGroup) {
  Write("proc-cgroup", "0::/kubepods/pod1/worker\n");
  Write("kubepods/pod1/worker/memory.max", std::to_string(96 * kGiB) + "\n");
  Write("memory.max", "max\n");
  EXPECT_EQ(Limit(2048 * kGiB), 96 * kGiB);
  // A limit above the machine's memory changes nothing.
  Write("kubepods/pod1/worker/memory.max", std::to_string(4096 * kGiB) + "\n");
  EXPECT_EQ(Limit(2048 * kGiB), 2048 * kGiB);
}

TEST_F(HostMemoryLimitTest, TheMountedRootsLimitWithACgroupNamespace) {
  Write("proc-cgroup", "0::/\n");
  Write("memory.max", std::to_string(64 * kGiB) + "\n");
  EXPECT_EQ(Limit(128 * kGiB), 64 * kGiB);
}

TEST_F(HostMemoryLimitTest, V1Limit) {
  Write("proc-cgroup", "9:memory:/\n8:pids:/\n");
  Write("memory/memory.limit_in_bytes", std::to_string(32 * kGiB) + "\n");
  EXPECT_EQ(Limit(128 * kGiB), 32 * kGiB);
}

TEST_F(HostMemoryLimitTest, GarbageIsIgnored) {
  Write("proc-cgroup", "0::/g\n");
  Write("g/memory.max", "lots\n");
  Write("memory.max", "-5\n");
  Write("memory/memory.limit_in_bytes", "\n");
  EXPECT_EQ(Limit(128 * kGiB), 128 * kGiB);
}

TEST(ProbeDevice, ReportsTheHostMemoryLimitOnThisMachine) {
  absl::StatusOr<DeviceInfo> info = ProbeDevice("cpu", "");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_GT(info->host_memory_bytes, 0);
  EXPECT_EQ(info->host_memory_bytes,
            HostMemoryLimit(static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE)));
}

// The worker's allocator default applies only where the environment sets neither variable.
TEST(DefaultCudaAllocatorConfig, SetsExpandableSegmentsOnlyWhereNothingIsSet) {
  ::unsetenv("PYTORCH_CUDA_ALLOC_CONF");
  ::unsetenv("PYTORCH_ALLOC_CONF");
  DefaultCudaAllocatorConfig();
  ASSERT_NE(std::getenv("PYTORCH_CUDA_ALLOC_CONF"), nullptr);
  EXPECT_STREQ(std::getenv("PYTORCH_CUDA_ALLOC_CONF"),
               "expandable_segments:True,pinned_use_cuda_host_register:True,"
               "pinned_num_register_threads:16");

  ::setenv("PYTORCH_CUDA_ALLOC_CONF", "", 1);  // set, even empty: the user's choice
  DefaultCudaAllocatorConfig();
  EXPECT_STREQ(std::getenv("PYTORCH_CUDA_ALLOC_CONF"), "");

  ::unsetenv("PYTORCH_CUDA_ALLOC_CONF");
  ::setenv("PYTORCH_ALLOC_CONF", "pinned_use_cuda_host_register:True", 1);
  DefaultCudaAllocatorConfig();
  EXPECT_EQ(std::getenv("PYTORCH_CUDA_ALLOC_CONF"), nullptr);
  EXPECT_STREQ(std::getenv("PYTORCH_ALLOC_CONF"), "pinned_use_cuda_host_register:True");
  ::unsetenv("PYTORCH_ALLOC_CONF");
}

}  // namespace
}  // namespace mq::worker
