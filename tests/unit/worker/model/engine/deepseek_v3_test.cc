// CPU tests of the DeepSeek-V3 engine: RoPE/YaRN constants, the router's masking, hooks, weight
// overrides, layer-at-a-time equivalence and input validation. Agreement with transformers is
// tested in tests/interop/test_forward.py.

#include "worker/model/deepseek_v3.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tests/unit/worker/model/engine/engine_test_util.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"
#include "worker/model/plan.h"

namespace mq::model {
namespace {

using testing::GenerateModel;
using ::testing::HasSubstr;
using testing::RelErr;

DeepseekV3Config DeepSeekV3Attention() {
  DeepseekV3Config c;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.rope_theta = 10000;
  RopeScalingConfig y;
  y.type = "yarn";
  y.factor = 40;
  y.original_max_position_embeddings = 4096;
  y.beta_fast = 32;
  y.beta_slow = 1;
  y.mscale = 1.0;
  y.mscale_all_dim = 1.0;
  c.rope_scaling = y;
  return c;
}

TEST(DeepseekV3Rope, YarnMatchesFormatsSampleValues) {
  // FORMATS.md §3.3 and §3.2.
  RopeParameters rope = ComputeRopeParameters(DeepSeekV3Attention());
  ASSERT_EQ(rope.inv_freq.numel(), 32);
  const std::map<int, double> expected = {{0, 1.0},     {10, 0.0562341},  {11, 0.0390069},
                                          {16, 0.0055}, {23, 3.3338e-05}, {31, 3.3338e-06}};
  for (const auto& [j, value] : expected) {
    EXPECT_NEAR(rope.inv_freq[j].item<double>() / value, 1.0, 2e-4) << "inv_freq_" << j;
  }
  EXPECT_DOUBLE_EQ(rope.attention_factor, 1.0);
  EXPECT_NEAR(SoftmaxScale(DeepSeekV3Attention()), 0.13523378, 1e-7);
}

TEST(DeepseekV3Rope, DefaultRopeAndNoMscaleAllDim) {
  DeepseekV3Config c = DeepSeekV3Attention();
  c.rope_scaling.reset();
  RopeParameters rope = ComputeRopeParameters(c);
  EXPECT_NEAR(rope.inv_freq[1].item<double>(), std::pow(10000.0, -2.0 / 64), 1e-7);
  EXPECT_DOUBLE_EQ(rope.attention_factor, 1.0);
  EXPECT_DOUBLE_EQ(SoftmaxScale(c), 1 / std::sqrt(192.0));

  c = DeepSeekV3Attention();
  c.rope_scaling->mscale_all_dim = 0;  // transformers: cos/sin × (0.1 ln 40 + 1), plain scale
  EXPECT_NEAR(ComputeRopeParameters(c).attention_factor, 0.1 * std::log(40.0) + 1, 1e-12);
  EXPECT_DOUBLE_EQ(SoftmaxScale(c), 1 / std::sqrt(192.0));
}

TEST(DeepseekV3Norm, RmsNormCastsBeforeTheWeight) {
  at::Tensor x = at::randn({3, 10}).to(at::kBFloat16);
  at::Tensor w = (at::randn({10}) + 1).to(at::kBFloat16);
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor expected = w * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + 1e-6)).to(at::kBFloat16);
  at::Tensor got = RmsNorm(x, w, 1e-6);
  EXPECT_EQ(got.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(got, expected));
}

TEST(DeepseekV3Mlp, InputsOnlyCallsTheHooksOfTheFullMlp) {
  MlpWeights mlp;
  mlp.gate_proj = at::randn({6, 10});
  mlp.up_proj = at::randn({6, 10});
  mlp.down_proj = at::randn({10, 6});
  const at::Tensor x = at::randn({7, 10});
  auto record = [](std::vector<std::pair<std::string, at::Tensor>>* seen) {
    ForwardHooks hooks;
    hooks.on_linear_input = [seen](const std::string& name, const at::Tensor& in) {
      seen->emplace_back(name, in.clone());
    };
    return hooks;
  };
  std::vector<std::pair<std::string, at::Tensor>> full, inputs;
  RunMlpRows("m.", mlp, x, record(&full));
  RunMlpInputs("m.", mlp, x, record(&inputs));
  ASSERT_EQ(full.size(), 3u);
  ASSERT_EQ(inputs.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(inputs[i].first, full[i].first);
    EXPECT_TRUE(at::equal(inputs[i].second, full[i].second)) << full[i].first;
  }
  EXPECT_EQ(full[2].first, "m.down_proj");
}

// Router with zero gate weights (all scores 0.5) so that only the bias decides.
LayerWeights RouterOnly(const std::vector<float>& bias, int groups, int topk_group, int k) {
  LayerWeights w;
  w.config.n_routed_experts = static_cast<int>(bias.size());
  w.config.n_group = groups;
  w.config.topk_group = topk_group;
  w.config.num_experts_per_tok = k;
  w.config.norm_topk_prob = true;
  w.config.routed_scaling_factor = 2.5;
  w.prefix = "model.layers.1.";
  w.gate = at::zeros({static_cast<int64_t>(bias.size()), 4});
  w.e_score_correction_bias = at::tensor(bias);
  return w;
}

TEST(DeepseekV3Router, MasksDroppedGroupsWithMinusInfinity) {
  // Biased scores [1.0, -0.2 | -0.05, -0.05]: group 0 (sum 0.8) is kept, group 1 (-0.1) is
  // dropped. Both experts of group 0 must be chosen although expert 1's biased score is
  // negative; masking with 0.0 (transformers' native code) would pick expert 2 or 3 instead.
  LayerWeights w = RouterOnly({0.5f, -0.7f, -0.55f, -0.55f}, /*groups=*/2, /*topk_group=*/1,
                              /*k=*/2);
  Routing r = RouteTokens(w, at::randn({5, 4}));
  at::Tensor chosen = std::get<0>(r.topk_indices.sort(-1));
  EXPECT_TRUE(at::equal(chosen, at::tensor({0, 1}, at::kLong).expand({5, 2})));
  // Unbiased scores are all 0.5: normalised weights 0.5 each, times 2.5.
  EXPECT_TRUE(at::allclose(r.topk_weights, at::full({5, 2}, 1.25)));
}

TEST(DeepseekV3Router, GroupScoreIsTheSumOfTheTopTwo) {
  // Group 0 = [0.9, 0.0, 0.0] (top-2 sum 0.9, max 0.9); group 1 = [0.5, 0.5, 0.0] (sum 1.0,
  // max 0.5). The sum keeps group 1; the max would keep group 0.
  LayerWeights w = RouterOnly({0.4f, -0.5f, -0.5f, 0.0f, 0.0f, -0.5f}, 2, 1, 1);
  Routing r = RouteTokens(w, at::randn({3, 4}));
  at::Tensor chosen = r.topk_indices.flatten();
  for (int64_t i = 0; i < chosen.numel(); ++i) {
    EXPECT_THAT(chosen[i].item<int64_t>(), ::testing::AnyOf(3, 4));
  }
}

// More rows than one routing segment (kRouterSegmentRows) are routed segment by segment: every
// token gets the experts and weights it gets when routed alone with a few others (a random gate,
// so the scores differ by token and the choices are not ties).
TEST(DeepseekV3Router, RoutingInSegmentsEqualsRoutingPieceByPiece) {
  at::manual_seed(5);
  LayerWeights w = RouterOnly({0.1f, -0.2f, 0.05f, 0.0f, -0.1f, 0.2f, 0.0f, -0.05f}, 2, 1, 2);
  w.gate = at::randn({8, 4});
  const int64_t rows = kRouterSegmentRows + kRouterBlockRows + 123;
  const at::Tensor x = at::randn({rows, 4}).to(at::kBFloat16);
  const Routing all = RouteTokens(w, x);
  ASSERT_EQ(all.topk_indices.size(0), rows);
  for (const auto& [first, n] : std::vector<std::pair<int64_t, int64_t>>{
           {0, 7}, {kRouterSegmentRows - 3, 9}, {rows - 130, 130}}) {
    const Routing piece = RouteTokens(w, x.narrow(0, first, n));
    const at::Tensor a = std::get<0>(all.topk_indices.narrow(0, first, n).sort(-1));
    const at::Tensor b = std::get<0>(piece.topk_indices.sort(-1));
    EXPECT_TRUE(at::equal(a, b)) << first;
    const at::Tensor wa = std::get<0>(all.topk_weights.narrow(0, first, n).sort(-1));
    const at::Tensor wb = std::get<0>(piece.topk_weights.sort(-1));
    EXPECT_TRUE(at::equal(wa, wb)) << first;
  }
}

// A generated FP8 checkpoint (default mq-gen-model flags: 3 layers, 1 dense, 8 experts in 2
// groups, top-2, hidden 256, q LoRA, YaRN) loaded once for the tests below.
class DeepseekV3ModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(GenerateModel("cpu_default", {"--seed", "3"}));
  }
  static void TearDownTestSuite() { delete dir_; }

  void SetUp() override {
    ASSERT_FALSE(dir_->empty());
    absl::StatusOr<DeepseekV3Config> config = LoadDeepseekV3Config(*dir_ + "/config.json");
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
    absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(*dir_);
    ASSERT_TRUE(reader.ok()) << reader.status();
    reader_ = *std::move(reader);
    ids_ = at::randint(config_.vocab_size, {2, 9}, at::TensorOptions().dtype(at::kLong));
  }

  LayerWeights Layer(int layer) {
    absl::StatusOr<LayerWeights> w = LoadLayer(*reader_, config_, layer, at::kCPU, at::kFloat);
    EXPECT_TRUE(w.ok()) << w.status();
    return *std::move(w);
  }
  at::Tensor Positions() { return at::arange(ids_.size(1), at::kLong); }

  static std::string* dir_;
  DeepseekV3Config config_;
  std::unique_ptr<CheckpointReader> reader_;
  at::Tensor ids_;
};
std::string* DeepseekV3ModelTest::dir_ = nullptr;

TEST_F(DeepseekV3ModelTest, LayerAtATimeEqualsRunModel) {
  absl::StatusOr<ModelOutput> out = RunModel(*reader_, config_, ids_);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->hidden_states.size(), static_cast<size_t>(config_.num_hidden_layers + 1));
  EXPECT_EQ(out->logits.sizes(), (std::vector<int64_t>{2, 9, config_.vocab_size}));
  EXPECT_TRUE(at::isfinite(out->logits).all().item<bool>());

  absl::StatusOr<GlobalWeights> g = LoadGlobals(*reader_, config_, at::kCPU, at::kFloat);
  ASSERT_TRUE(g.ok()) << g.status();
  absl::StatusOr<at::Tensor> h = Embed(*g, ids_);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_TRUE(at::equal(*h, out->hidden_states[0]));
  for (int layer = 0; layer < config_.num_hidden_layers; ++layer) {
    h = RunLayer(Layer(layer), *h, Positions());
    ASSERT_TRUE(h.ok()) << h.status();
    if (layer + 1 < config_.num_hidden_layers) {
      EXPECT_TRUE(at::equal(*h, out->hidden_states[layer + 1])) << layer;
    }
  }
  absl::StatusOr<at::Tensor> normed = FinalNorm(*g, *h);
  ASSERT_TRUE(normed.ok());
  EXPECT_TRUE(at::equal(*normed, out->hidden_states.back()));
  absl::StatusOr<at::Tensor> logits = LmHead(*g, *normed);
  ASSERT_TRUE(logits.ok());
  EXPECT_TRUE(at::equal(*logits, out->logits));
}

TEST_F(DeepseekV3ModelTest, HooksSeeEveryLinearAndEveryRoutedToken) {
  std::map<std::string, int64_t> rows;  // linear -> rows seen
  ForwardHooks hooks;
  hooks.on_linear_input = [&](const std::string& name, const at::Tensor& x) {
    EXPECT_EQ(x.dim(), 2) << name;
    rows[name] += x.size(0);
  };
  RunModelOptions options;
  options.hooks = hooks;
  ASSERT_TRUE(RunModel(*reader_, config_, ids_, options).ok());

  const int64_t tokens = ids_.numel();
  EXPECT_EQ(rows["lm_head"], tokens);
  for (int layer = 0; layer < config_.num_hidden_layers; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    for (const char* l : {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}) {
      EXPECT_EQ(rows[p + "self_attn." + l], tokens) << p << l;
    }
    if (!config_.IsMoeLayer(layer)) {
      EXPECT_EQ(rows[p + "mlp.down_proj"], tokens);
      continue;
    }
    EXPECT_EQ(rows[p + "mlp.gate"], tokens);
    EXPECT_EQ(rows[p + "mlp.shared_experts.up_proj"], tokens);
    int64_t routed = 0;
    for (int e = 0; e < config_.n_routed_experts; ++e) {
      const std::string ex = p + "mlp.experts." + std::to_string(e) + ".";
      EXPECT_EQ(rows[ex + "gate_proj"], rows[ex + "down_proj"]);
      routed += rows[ex + "gate_proj"];
    }
    EXPECT_EQ(routed, tokens * config_.num_experts_per_tok) << p;
  }
}

TEST_F(DeepseekV3ModelTest, WeightOverridesReplaceLoadedWeights) {
  LayerWeights w = Layer(1);  // MoE layer
  at::Tensor h = at::randn({2, 9, config_.hidden_size});
  absl::StatusOr<at::Tensor> base = RunLayer(w, h, Positions());
  ASSERT_TRUE(base.ok()) << base.status();

  WeightOverrides same = {{"model.layers.1.self_attn.o_proj", w.o_proj.clone()},
                          {"model.layers.1.mlp.experts.3.down_proj", w.experts[3].down_proj}};
  ForwardHooks hooks;
  hooks.weight_overrides = &same;
  absl::StatusOr<at::Tensor> again = RunLayer(w, h, Positions(), hooks);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(at::equal(*again, *base));

  // Zeroing o_proj removes the attention contribution: the layer becomes h + MLP(norm(h)).
  WeightOverrides zero = {{"model.layers.1.self_attn.o_proj", at::zeros_like(w.o_proj)}};
  hooks.weight_overrides = &zero;
  absl::StatusOr<at::Tensor> no_attn = RunLayer(w, h, Positions(), hooks);
  ASSERT_TRUE(no_attn.ok()) << no_attn.status();
  at::Tensor expected =
      h + RunMlpBlock(w, RmsNorm(h, w.post_attention_layernorm, config_.rms_norm_eps));
  EXPECT_TRUE(at::allclose(*no_attn, expected, 1e-5, 1e-6));
  EXPECT_GT(RelErr(*no_attn, *base), 1e-3);

  // Overrides of other layers are ignored; unknown names and wrong shapes of this layer fail.
  WeightOverrides other = {{"model.layers.2.self_attn.o_proj", at::zeros({1, 1})}};
  hooks.weight_overrides = &other;
  EXPECT_TRUE(RunLayer(w, h, Positions(), hooks).ok());
  WeightOverrides unknown = {{"model.layers.1.self_attn.o_proj.weight", w.o_proj}};
  hooks.weight_overrides = &unknown;
  absl::StatusOr<at::Tensor> s = RunLayer(w, h, Positions(), hooks);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("o_proj.weight"));
  WeightOverrides shape = {{"model.layers.1.mlp.experts.0.up_proj", w.o_proj}};
  hooks.weight_overrides = &shape;
  s = RunLayer(w, h, Positions(), hooks);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("shape"));
}

TEST_F(DeepseekV3ModelTest, ExpertSubsetAndValidation) {
  LayerLoadOptions only_one;
  only_one.expert_begin = 0;
  only_one.expert_end = 1;
  absl::StatusOr<LayerWeights> w = LoadLayer(*reader_, config_, 1, at::kCPU, at::kFloat, only_one);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE(w->experts[0].defined());
  EXPECT_FALSE(w->experts[1].defined());
  at::Tensor h = at::randn({2, 9, config_.hidden_size});
  absl::StatusOr<at::Tensor> out = RunLayer(*w, h, Positions());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition) << out.status();

  EXPECT_EQ(LoadLayer(*reader_, config_, -1, at::kCPU, at::kFloat).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      LoadLayer(*reader_, config_, config_.num_hidden_layers, at::kCPU, at::kFloat).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadLayer(*reader_, config_, 0, at::kCPU, at::kHalf).status().code(),
            absl::StatusCode::kInvalidArgument);

  LayerWeights dense = Layer(0);
  EXPECT_EQ(RunLayer(dense, h.to(at::kBFloat16), Positions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RunLayer(dense, h, at::arange(5, at::kLong)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(RunLayer(dense, h, at::arange(9, at::kLong).expand({2, 9})).ok());

  absl::StatusOr<GlobalWeights> g = LoadGlobals(*reader_, config_, at::kCPU, at::kFloat);
  ASSERT_TRUE(g.ok());
  absl::StatusOr<at::Tensor> e = Embed(*g, at::full({1, 2}, config_.vocab_size, at::kLong));
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(e.status().message(), HasSubstr("vocab_size"));
}

TEST_F(DeepseekV3ModelTest, MissingTensorIsNotFound) {
  DeepseekV3Config wrong = config_;
  wrong.q_lora_rank = 0;  // the checkpoint has q_a_proj/q_b_proj, not q_proj
  absl::StatusOr<LayerWeights> w = LoadLayer(*reader_, wrong, 0, at::kCPU, at::kFloat);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound) << w.status();
  wrong = config_;
  wrong.kv_lora_rank += 1;
  w = LoadLayer(*reader_, wrong, 0, at::kCPU, at::kFloat);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument) << w.status();
  EXPECT_THAT(w.status().message(), HasSubstr("kv_a_proj_with_mqa"));
}

}  // namespace
}  // namespace mq::model
