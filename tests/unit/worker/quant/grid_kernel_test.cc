// ComputeGrid's MSE search and the grid search kernel library (kernels/grid_search.h): the
// library's CPU reference gives exactly ComputeGrid's ATen result on CPU (so the CUDA kernel,
// tested against that reference, implements ComputeGrid's rule), and on a CUDA tensor
// ComputeGrid takes the kernel and agrees with its CPU run up to rare near-ties (skipped without
// a CUDA device).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/torch/grid_ops.h"
#include "mq/kernels/grid_search.h"
#include "worker/quant/grid.h"

namespace mq::quant {
namespace {

struct Variant {
  int64_t group_size;
  int bits;
  bool symmetric;
  double norm;
};

std::vector<Variant> Variants() {
  std::vector<Variant> out;
  for (int64_t group : {int64_t{128}, int64_t{64}, int64_t{0}}) {
    for (int bits : {4, 8}) {
      for (bool symmetric : {true, false}) {
        for (double norm : {2.0, 2.4}) out.push_back({group, bits, symmetric, norm});
      }
    }
  }
  return out;
}

GridOptions MseOptions(const Variant& v) {
  GridOptions o;
  o.group_size = v.group_size;
  o.bits = v.bits;
  o.symmetric = v.symmetric;
  o.mse_norm = v.norm;
  o.scale_search = ScaleSearch::kMse;
  return o;
}

// Rows of Gaussian weights with row scales spread over e^±2; 1000 columns leave a short last
// group (104 of 128, 40 of 64).
at::Tensor Weights(int64_t rows, uint64_t seed) {
  at::manual_seed(seed);
  return at::randn({rows, 1000}) * at::exp(at::randn({rows, 1}));
}

TEST(GridKernelTest, CpuReferenceEqualsComputeGridOnCpu) {
  int seed = 0;
  for (const Variant& v : Variants()) {
    SCOPED_TRACE(testing::Message() << "group " << v.group_size << " bits " << v.bits << " sym "
                                    << v.symmetric << " norm " << v.norm);
    const at::Tensor w = Weights(64, 100 + seed++);
    const GridOptions o = MseOptions(v);
    const Grid grid = ComputeGrid(w, o);
    const int64_t groups = NumGroups(1000, v.group_size);
    std::vector<float> scales(64 * groups), zeros(v.symmetric ? 0 : 64 * groups);
    kernels::GridSearchArgs a;
    a.w = w.data_ptr<float>();
    a.rows = 64;
    a.cols = 1000;
    a.config.group_size = EffectiveGroupSize(1000, v.group_size);
    a.config.bits = v.bits;
    a.config.symmetric = v.symmetric;
    a.config.norm = v.norm;
    a.scales = scales.data();
    a.zero_points = v.symmetric ? nullptr : zeros.data();
    ASSERT_TRUE(kernels::GridSearchCpu(a).ok());
    EXPECT_TRUE(at::equal(grid.scales, at::tensor(scales).reshape({64, groups})));
    if (!v.symmetric) {
      EXPECT_TRUE(at::equal(grid.zero_points, at::tensor(zeros).reshape({64, groups})));
    }
  }
}

TEST(GridKernelTest, CudaComputeGridTakesTheKernelAndAgreesWithCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const absl::Status supported = kernels::GridSearchTorchSupported(at::Device(at::kCUDA, 0));
  if (!supported.ok()) GTEST_SKIP() << supported;
  int seed = 0;
  for (const Variant& v : Variants()) {
    SCOPED_TRACE(testing::Message() << "group " << v.group_size << " bits " << v.bits << " sym "
                                    << v.symmetric << " norm " << v.norm);
    const at::Tensor w = Weights(512, 200 + seed++);
    const GridOptions o = MseOptions(v);
    const Grid cpu = ComputeGrid(w, o);
    // bf16 input on the device: ComputeGrid converts before calling the kernel.
    const Grid gpu = ComputeGrid(w.cuda(), o);
    const Grid gpu_bf16 = ComputeGrid(w.to(at::kBFloat16).cuda(), o);
    ASSERT_TRUE(gpu.scales.is_cuda());
    ASSERT_EQ(gpu.scales.scalar_type(), at::kFloat);
    ASSERT_EQ(gpu.scales.sizes(), cpu.scales.sizes());
    ASSERT_EQ(gpu.zero_points.defined(), !v.symmetric);
    ASSERT_EQ(gpu_bf16.scales.sizes(), cpu.scales.sizes());
    at::Tensor same = gpu.scales.cpu().eq(cpu.scales);
    if (!v.symmetric) same = same.logical_and(gpu.zero_points.cpu().eq(cpu.zero_points));
    const int64_t sets = same.numel();
    const int64_t differ = sets - same.sum().item<int64_t>();
    std::printf("ComputeGrid CUDA vs CPU, group %lld bits %d %s norm %.1f: %lld of %lld differ\n",
                static_cast<long long>(v.group_size), v.bits, v.symmetric ? "sym" : "asym", v.norm,
                static_cast<long long>(differ), static_cast<long long>(sets));
    EXPECT_LE(differ, std::max<int64_t>(2, sets / 1000));
  }
}

}  // namespace
}  // namespace mq::quant
