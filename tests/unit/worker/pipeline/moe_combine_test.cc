// The two ways of combining the routed experts' rows (worker/pipeline/moe_combine.h) give equal
// results bit for bit, on random routing, in bf16 and fp32, onto rows that already hold values,
// whatever the chunk size; and CombineEntries orders each token's rows by ascending expert.
// Built twice: on the CPU (torch), and with MQ_COMBINE_GPU on CUDA (label gpu), where bf16 goes
// through the combine kernel (mq/kernels/moe_combine.h) and is checked against torch's
// expert-by-expert combine on the same device, special values and both of its paths included.
#include "worker/pipeline/moe_combine.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#ifndef MQ_COMBINE_GPU
#define MQ_COMBINE_GPU 0
#endif

namespace mq::pipeline {
namespace {

at::Device Dev() { return MQ_COMBINE_GPU ? at::Device(at::kCUDA) : at::Device(at::kCPU); }

#define MQ_SKIP_WITHOUT_DEVICE()                                      \
  if (MQ_COMBINE_GPU && !torch::cuda::is_available()) {               \
    GTEST_SKIP() << "no CUDA device: the GPU combine tests need one"; \
  }

// T tokens' top-k of E experts, sent as a dispatch sends them.
struct Routed {
  at::Tensor experts;  // int64 [T * k], token-major
  at::Tensor order;    // int64 [T * k]: entries by ascending expert, tokens in order within each
  at::Tensor tokens;   // int64 [T * k]: the token of each sent row
  at::Tensor weights;  // fp32 [T * k]: its routing weight
  std::vector<int64_t> counts;  // [E]
};

Routed Route(int64_t t_count, int64_t k, int64_t e_count, uint32_t seed) {
  std::mt19937 rng(seed);
  Routed r;
  std::vector<int64_t> experts;
  for (int64_t t = 0; t < t_count; ++t) {
    std::vector<int64_t> all(static_cast<size_t>(e_count));
    std::iota(all.begin(), all.end(), int64_t{0});
    std::shuffle(all.begin(), all.end(), rng);
    experts.insert(experts.end(), all.begin(), all.begin() + k);
  }
  std::vector<int64_t> order(experts.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return experts[a] < experts[b]; });
  r.counts.assign(static_cast<size_t>(e_count), 0);
  std::vector<int64_t> tokens;
  for (int64_t i : order) {
    tokens.push_back(i / k);
    ++r.counts[experts[i]];
  }
  r.experts = at::tensor(experts, at::kLong);
  r.order = at::tensor(order, at::kLong);
  r.tokens = at::tensor(tokens, at::kLong);
  r.weights = at::rand({t_count * k}, at::kFloat).to(Dev());
  return r;
}

TEST(MoeCombineTest, EntriesListEachTokensRowsByAscendingExpert) {
  MQ_SKIP_WITHOUT_DEVICE();
  const Routed r = Route(9, 3, 7, 1);
  const at::Tensor entries = CombineEntries(r.experts, r.order, 3);
  ASSERT_EQ(entries.sizes(), (std::vector<int64_t>{3, 9}));
  const at::Tensor sent_expert = r.experts.index_select(0, r.order);
  for (int64_t t = 0; t < 9; ++t) {
    int64_t previous = -1;
    for (int64_t j = 0; j < 3; ++j) {
      const int64_t p = entries[j][t].item<int64_t>();
      EXPECT_EQ(r.tokens[p].item<int64_t>(), t) << "token " << t << " slot " << j;
      const int64_t e = sent_expert[p].item<int64_t>();
      EXPECT_GT(e, previous) << "token " << t << " slot " << j;
      previous = e;
    }
  }
}

TEST(MoeCombineTest, PerTokenEqualsPerExpertBitForBit) {
  MQ_SKIP_WITHOUT_DEVICE();
  constexpr int64_t kTokens = 53, kTopK = 4, kExperts = 16, kHidden = 24;
  for (const at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    const Routed r = Route(kTokens, kTopK, kExperts, 7);
    const at::Tensor rows = at::randn({kTokens * kTopK, kHidden}).to(Dev(), dtype);
    // Only some of out's rows are combined into, and those already hold values (as with
    // dispatch rounds): a few rows of u, listed out of order.
    const at::Tensor u_rows = at::randperm(kTokens + 11, at::kLong).narrow(0, 0, kTokens).to(Dev());
    const at::Tensor start = at::randn({kTokens + 11, kHidden}).to(Dev(), dtype);
    at::Tensor reference = start.clone();
    CombinePerExpert(rows, r.weights, u_rows.index_select(0, r.tokens.to(Dev())), r.counts,
                     reference);
    const at::Tensor entries = CombineEntries(r.experts, r.order, kTopK).to(Dev());
    const int64_t row_bytes = kHidden * at::elementSize(dtype);
    for (const int64_t chunk : {int64_t{1}, row_bytes, 5 * row_bytes, int64_t{1} << 30}) {
      at::Tensor weighted = rows.clone();
      at::Tensor out = start.clone();
      CombinePerToken(weighted, r.weights, u_rows, entries, out, chunk);
      EXPECT_TRUE(at::equal(out, reference)) << dtype << " chunk " << chunk;
    }
    EXPECT_FALSE(at::equal(reference, start));
  }
}

// bf16 bits as int16, so that equal NaNs compare equal.
at::Tensor Bits(const at::Tensor& t) { return t.view(at::kShort).cpu(); }

// Infinities, NaNs, signed zeros, sums that overflow and products that underflow, at the
// experts' width (the kernel's 8-column path) and at an odd one (its one-column path).
TEST(MoeCombineTest, SpecialValuesCombineAlikeBothWays) {
  MQ_SKIP_WITHOUT_DEVICE();
  constexpr int64_t kTokens = 37, kTopK = 8, kExperts = 32;
  for (const int64_t hidden : {int64_t{7168}, int64_t{13}}) {
    const Routed r = Route(kTokens, kTopK, kExperts, 11);
    at::Tensor rows = at::randn({kTokens * kTopK, hidden});
    const float inf = std::numeric_limits<float>::infinity();
    const float special[] = {inf,      -inf,     std::numeric_limits<float>::quiet_NaN(),
                             -0.0f,    0.0f,     3.0e38f,
                             -3.0e38f, 1.0e-38f, 1.0e-45f};
    std::mt19937 rng(5);
    for (int i = 0; i < 400; ++i) {
      const int64_t a = rng() % rows.size(0), b = rng() % hidden;
      rows[a][b] = special[rng() % (sizeof(special) / sizeof(special[0]))];
    }
    rows = rows.to(Dev(), at::kBFloat16);
    at::Tensor weights = r.weights * 3.0;  // up to the routed scaling factor and past 1
    weights[0] = 0.0f;                     // inf * 0 = NaN
    weights[1] = 1.0e-30f;
    const at::Tensor u_rows = at::arange(kTokens, at::kLong).to(Dev());
    at::Tensor start = at::zeros({kTokens, hidden}).to(Dev(), at::kBFloat16);
    start[3] = -0.0;
    at::Tensor reference = start.clone();
    CombinePerExpert(rows, weights, r.tokens.to(Dev()), r.counts, reference);
    const at::Tensor entries = CombineEntries(r.experts, r.order, kTopK).to(Dev());
    at::Tensor weighted = rows.clone();
    at::Tensor out = start.clone();
    CombinePerToken(weighted, weights, u_rows, entries, out, int64_t{1} << 30);
    EXPECT_TRUE(at::equal(Bits(out), Bits(reference))) << "hidden " << hidden;
    EXPECT_TRUE(out.isnan().any().item<bool>());
    EXPECT_TRUE(out.isinf().any().item<bool>());
  }
}

TEST(MoeCombineTest, AnotherAdditionOrderRoundsDifferently) {
  MQ_SKIP_WITHOUT_DEVICE();
  // The order matters in bf16, so the equality above is a real check of the order.
  constexpr int64_t kTokens = 200, kTopK = 8, kExperts = 32, kHidden = 16;
  const Routed r = Route(kTokens, kTopK, kExperts, 3);
  const at::Tensor rows = at::randn({kTokens * kTopK, kHidden}).to(Dev(), at::kBFloat16);
  const at::Tensor u_rows = at::arange(kTokens, at::kLong).to(Dev());
  const at::TensorOptions bf16 = at::TensorOptions().dtype(at::kBFloat16).device(Dev());
  at::Tensor reference = at::zeros({kTokens, kHidden}, bf16);
  CombinePerExpert(rows, r.weights, r.tokens.to(Dev()), r.counts, reference);
  // Entries by routing slot instead of by expert: the same rows, summed in another order.
  const at::Tensor position =
      at::empty_like(r.order).index_put_({r.order}, at::arange(r.order.size(0)));
  const at::Tensor by_slot = position.view({kTokens, kTopK}).t().contiguous().to(Dev());
  at::Tensor weighted = rows.clone();
  at::Tensor out = at::zeros({kTokens, kHidden}, bf16);
  CombinePerToken(weighted, r.weights, u_rows, by_slot, out, int64_t{1} << 30);
  EXPECT_FALSE(at::equal(out, reference));
  EXPECT_TRUE(at::allclose(out.to(at::kFloat), reference.to(at::kFloat), 0.05, 0.05));
}

}  // namespace
}  // namespace mq::pipeline
