// The two ways of combining the routed experts' rows (worker/pipeline/moe_combine.h) give equal
// results bit for bit, on random routing, in bf16 and fp32, onto rows that already hold values,
// whatever the chunk size; and CombineEntries orders each token's rows by ascending expert.
#include "worker/pipeline/moe_combine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace mq::pipeline {
namespace {

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
  r.weights = at::rand({t_count * k}, at::kFloat);
  return r;
}

TEST(MoeCombineTest, EntriesListEachTokensRowsByAscendingExpert) {
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
  constexpr int64_t kTokens = 53, kTopK = 4, kExperts = 16, kHidden = 24;
  for (const at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    const Routed r = Route(kTokens, kTopK, kExperts, 7);
    const at::Tensor rows = at::randn({kTokens * kTopK, kHidden}).to(dtype);
    // Only some of out's rows are combined into, and those already hold values (as with
    // dispatch rounds): a few rows of u, listed out of order.
    const at::Tensor u_rows = at::randperm(kTokens + 11, at::kLong).narrow(0, 0, kTokens);
    const at::Tensor start = at::randn({kTokens + 11, kHidden}).to(dtype);
    at::Tensor reference = start.clone();
    CombinePerExpert(rows, r.weights, u_rows.index_select(0, r.tokens), r.counts, reference);
    const at::Tensor entries = CombineEntries(r.experts, r.order, kTopK);
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

TEST(MoeCombineTest, AnotherAdditionOrderRoundsDifferently) {
  // The order matters in bf16, so the equality above is a real check of the order.
  constexpr int64_t kTokens = 200, kTopK = 8, kExperts = 32, kHidden = 16;
  const Routed r = Route(kTokens, kTopK, kExperts, 3);
  const at::Tensor rows = at::randn({kTokens * kTopK, kHidden}).to(at::kBFloat16);
  const at::Tensor u_rows = at::arange(kTokens, at::kLong);
  at::Tensor reference = at::zeros({kTokens, kHidden}, at::kBFloat16);
  CombinePerExpert(rows, r.weights, r.tokens, r.counts, reference);
  // Entries by routing slot instead of by expert: the same rows, summed in another order.
  const at::Tensor position =
      at::empty_like(r.order).index_put_({r.order}, at::arange(r.order.size(0)));
  const at::Tensor by_slot = position.view({kTokens, kTopK}).t().contiguous();
  at::Tensor weighted = rows.clone();
  at::Tensor out = at::zeros({kTokens, kHidden}, at::kBFloat16);
  CombinePerToken(weighted, r.weights, u_rows, by_slot, out, int64_t{1} << 30);
  EXPECT_FALSE(at::equal(out, reference));
  EXPECT_TRUE(at::allclose(out.to(at::kFloat), reference.to(at::kFloat), 0.05, 0.05));
}

}  // namespace
}  // namespace mq::pipeline
