// AWQ's scale-search primitives on the GPU against the CPU (the reference): statistics, the
// candidate scale and Q(W·s)/s, on full-width expert shapes. Skips without a CUDA device.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>

#include "worker/quant/awq.h"

namespace mq::quant {
namespace {

TEST(AwqGpuTest, SearchPrimitivesMatchTheCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(11);
  const at::Tensor x = at::randn({1024, 2048}).to(at::kBFloat16) * 3;  // down_proj inputs
  const at::Tensor w = (at::randn({7168, 2048}) * 0.02).to(at::kBFloat16);  // a down_proj
  const at::Tensor xg = x.cuda(), wg = w.cuda();

  const at::Tensor xs = AbsColumnSum(x), xsg = AbsColumnSum(xg).cpu();
  EXPECT_TRUE(at::allclose(xs, xsg, 1e-12, 0));
  const at::Tensor ws = NormalizedWeightColumnSum(w, 128),
                   wsg = NormalizedWeightColumnSum(wg, 128).cpu();
  EXPECT_TRUE(at::allclose(ws, wsg, 1e-12, 0));

  // The same statistics give the same scale on either device.
  const at::Tensor s = AwqScale(xs / 1024, ws / 7168, 0.5);
  EXPECT_TRUE(s.equal(AwqScale((xs / 1024).cuda(), (ws / 7168).cuda(), 0.5).cpu()));

  for (ScaleSearch search : {ScaleSearch::kMinMax, ScaleSearch::kMse}) {
    GridOptions g;
    g.group_size = 128;
    g.scale_search = search;
    absl::StatusOr<at::Tensor> cpu = FakeQuantizeScaled(w, s, g);
    absl::StatusOr<at::Tensor> gpu = FakeQuantizeScaled(wg, s.cuda(), g);
    ASSERT_TRUE(cpu.ok() && gpu.ok());
    const at::Tensor differ = (*cpu != gpu->cpu());
    const int64_t n = differ.sum().item<int64_t>();
    const int64_t groups = w.numel() / 128;
    const int64_t n_groups = differ.view({w.size(0), -1, 128}).any(-1).sum().item<int64_t>();
    std::printf("%s: %lld of %lld elements (%lld of %lld groups) differ between CPU and GPU\n",
                ScaleSearchName(search).c_str(), static_cast<long long>(n),
                static_cast<long long>(w.numel()), static_cast<long long>(n_groups),
                static_cast<long long>(groups));
    if (search == ScaleSearch::kMinMax) {
      // Min-max grids (ATen ops on both devices) come out different for about 1% of the
      // elements (measured on an H200: 158,704 of 14,680,064, more than one per group, so whole
      // groups' scales differ; cause not found yet).
      EXPECT_LT(n, w.numel() / 50);
    } else {
      // The mse grid kernel sums its losses in another order and with approximate exp/log
      // (mq/kernels/grid_search.h): a group whose best candidates are a near-tie may get the
      // other one; the kernel allows 1 in 1000 such groups (grid_search_gpu_test checks that
      // each is a near-tie). Measured on an H100: 2,449 of the 14,680,064 elements differ.
      EXPECT_LE(n_groups, groups / 1000);
      const double e_cpu = SquaredError(*cpu, w), e_gpu = SquaredError(gpu->cpu(), w);
      EXPECT_NEAR(e_gpu, e_cpu, 1e-4 * e_cpu) << "near-ties change the total error little";
    }
  }
}

}  // namespace
}  // namespace mq::quant
