// Private to kernels/: the one implementation of the launchers' IsSupported checks (a visible
// device, the architecture gate, code for the device in this binary), and the error text for a
// build without CUDA. Built with or without CUDA (MQ_WITH_CUDA).
#pragma once

#include <string>

#include "absl/status/status.h"

#if MQ_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace mq::kernels::detail {

// Unimplemented: "mq was built without CUDA ...".
absl::Status NoCudaError();

#if MQ_WITH_CUDA
// "cudaErrorX: text".
std::string CudaErrorText(cudaError_t err);

// What a kernel family needs of a device.
struct DeviceRequirement {
  const char* kernel;                // "the GPTQ kernels", named in messages
  int min_major;                     // minimum compute capability major (0 = any)
  const char* cpu_hint;              // what to use instead on an older device, named in the message
  cudaError_t (*image)(int device);  // cudaSuccess when this binary has code for `device`
};

// OK, or FailedPrecondition naming the device, its compute capability and what is missing.
absl::Status CheckDevice(int device, const DeviceRequirement& req);
#endif

}  // namespace mq::kernels::detail
