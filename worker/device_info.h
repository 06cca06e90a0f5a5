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

}  // namespace mq::worker
