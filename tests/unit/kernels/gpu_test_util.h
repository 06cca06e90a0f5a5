// Shared by the GPU kernel tests (label gpu): a CUDA error assertion and a fixture that skips
// without a CUDA device or when the kernels under test do not support device 0.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "absl/status/status.h"
#include "gtest/gtest.h"

#define CUDA_OK(expr)                                                          \
  do {                                                                         \
    const cudaError_t err_ = (expr);                                           \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

namespace mq::kernels::testing_util {

template <absl::Status (*kIsSupported)(int)>
class KernelGpuTest : public testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) GTEST_SKIP() << "no CUDA device";
    const absl::Status supported = kIsSupported(0);
    if (!supported.ok()) GTEST_SKIP() << supported;
  }
};

// Device buffer freed on scope exit.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes == 0 ? 1 : bytes) == cudaSuccess) ptr = static_cast<T*>(p);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace mq::kernels::testing_util
