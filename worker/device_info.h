// What this machine offers a worker: device, memory, cores, scratch space.
// Pure queries; safe from any thread.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace mq::worker {

struct DeviceInfo {
  std::string device;       // "cpu" or "cuda:N"
  std::string device_name;  // GPU model, empty on CPU
  int64_t device_memory_bytes = 0;
  int64_t host_memory_bytes = 0;
  int cpu_cores = 0;
  std::string hostname;
  int64_t scratch_free_bytes = 0;
};

// Checks `device` ("cpu" or "cuda:N") and reads its properties. For CUDA the driver library is
// loaded at run time, so the worker binary runs on machines without one (device "cpu").
absl::StatusOr<DeviceInfo> ProbeDevice(const std::string& device, const std::string& scratch_dir);

// The host memory this process may use: `physical`, or less where its control group limits it
// (a container's memory limit: cgroup v2 memory.max of the process's own group or of the root
// mounted at `cgroup_root`, else cgroup v1 memory/memory.limit_in_bytes). `proc_cgroup` is the
// /proc/self/cgroup to read the process's group from.
int64_t HostMemoryLimit(int64_t physical, const std::string& cgroup_root = "/sys/fs/cgroup",
                        const std::string& proc_cgroup = "/proc/self/cgroup");

// torch's CUDA caching allocators read PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF) at their
// first use. Unless the environment sets one of them, sets PYTORCH_CUDA_ALLOC_CONF to
// kDefaultCudaAllocConf:
// - expandable segments, with which the plan's device-memory estimates were fitted (fixed-size
//   segments fragment under a layer's changing tensor sizes);
// - page-locked host blocks made by registering ordinary pages on 16 threads instead of one
//   cudaHostAlloc: the first layer's tens of GiB of page-locked hidden-state copies are made
//   ~4.5x faster (an H100 host: 8 GiB in 0.57 s instead of 2.61 s; bench/RESULTS.md).
// Call before anything uses CUDA; not thread-safe (setenv).
inline constexpr char kDefaultCudaAllocConf[] =
    "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:16";
void DefaultCudaAllocatorConfig();

}  // namespace mq::worker
