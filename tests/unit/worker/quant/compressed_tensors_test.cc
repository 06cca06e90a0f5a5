#include "worker/quant/compressed_tensors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace mq::quant {
namespace {

model::DeepseekV3Config SmallConfig() {
  model::DeepseekV3Config c;
  c.num_hidden_layers = 3;
  c.num_nextn_predict_layers = 1;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.q_lora_rank = 128;  // every other width is 0, a multiple of any group size
  return c;
}

// The small trained test model's shapes: hidden 256, q_lora_rank 96, kv_lora_rank 64, dense
// intermediate 192, experts 128.
model::DeepseekV3Config NarrowConfig() {
  model::DeepseekV3Config c = SmallConfig();
  c.num_nextn_predict_layers = 0;
  c.hidden_size = 256;
  c.intermediate_size = 192;
  c.moe_intermediate_size = 128;
  c.num_attention_heads = 4;
  c.q_lora_rank = 96;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  return c;
}

TEST(QuantizationConfigJson, RoutedExpertsExactBlock) {
  CompressedTensorsOptions o;
  model::DeepseekV3Config c = SmallConfig();
  c.num_nextn_predict_layers = 0;
  const nlohmann::json expected = nlohmann::json::parse(R"({
    "config_groups": {"group_0": {
      "input_activations": null, "output_activations": null, "targets": ["Linear"],
      "weights": {"actorder": null, "block_structure": null, "dynamic": false, "group_size": 128,
                  "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                  "symmetric": true, "type": "int"}}},
    "format": "pack-quantized",
    "global_compression_ratio": null,
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
               "re:.*mlp\\.(gate|up|gate_up|down)_proj.*", "re:.*mlp\\.gate$"],
    "kv_cache_scheme": null,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed"})");
  EXPECT_EQ(QuantizationConfigJson(o, c), expected);
}

TEST(QuantizationConfigJson, ChannelAllLinearMtpAndUserIgnore) {
  CompressedTensorsOptions o;
  o.group_size = 0;
  o.targets = TargetSet::kAllLinear;
  o.ignore_regexes = {".*layers\\.2\\..*"};
  const nlohmann::json j = QuantizationConfigJson(o, SmallConfig());
  const nlohmann::json& w = j["config_groups"]["group_0"]["weights"];
  EXPECT_EQ(w["strategy"], "channel");
  EXPECT_TRUE(w["group_size"].is_null());
  EXPECT_TRUE(w["actorder"].is_null());
  EXPECT_EQ(j["ignore"], nlohmann::json::parse(
                             R"(["lm_head", "re:.*mlp\\.gate$", "re:.*layers\\.3\\..*",
                                 "re:.*layers\\.2\\..*"])"));
  o.mtp = MtpMode::kQuantize;
  EXPECT_EQ(QuantizationConfigJson(o, SmallConfig())["ignore"],
            nlohmann::json::parse(R"(["lm_head", "re:.*mlp\\.gate$", "re:.*eh_proj.*",
                                      "re:.*shared_head.*", "re:.*layers\\.2\\..*"])"));
}

TEST(Options, Validation) {
  CompressedTensorsOptions o;
  o.group_size = 96;
  absl::Status s = ValidateCompressedTensorsOptions(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("group_size = 96"), std::string::npos);
  o.group_size = 64;
  o.ignore_regexes = {"(unclosed"};
  EXPECT_EQ(ValidateCompressedTensorsOptions(o).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ParseTargetSet("experts").ok());
  EXPECT_EQ(*ParseMtpMode("quantize"), MtpMode::kQuantize);
}

TEST(MatchesIgnore, ExactAndAnchoredRegex) {
  const std::vector<std::string> ignore = {"lm_head", "re:.*mlp\\.gate$",
                                           "re:model\\.layers\\.1\\."};
  EXPECT_TRUE(MatchesIgnore("lm_head", ignore));
  EXPECT_FALSE(MatchesIgnore("model.lm_head", ignore));
  EXPECT_TRUE(MatchesIgnore("model.layers.3.mlp.gate", ignore));
  EXPECT_FALSE(MatchesIgnore("model.layers.3.mlp.gate_proj", ignore));
  EXPECT_TRUE(MatchesIgnore("model.layers.1.self_attn.o_proj", ignore));
  EXPECT_FALSE(MatchesIgnore("x.model.layers.1.self_attn.o_proj", ignore));  // re.match anchors
}

TEST(Selection, RoutedExpertsDefault) {
  CompressedTensorsOptions o;
  const model::DeepseekV3Config c = SmallConfig();
  EXPECT_TRUE(QuantizedLinears(c, 0, o).empty());  // dense layer
  const std::vector<std::string> q = QuantizedLinears(c, 1, o);
  ASSERT_EQ(q.size(), 12u);
  EXPECT_EQ(q.front(), "model.layers.1.mlp.experts.0.gate_proj");
  EXPECT_EQ(q.back(), "model.layers.1.mlp.experts.3.down_proj");
  EXPECT_TRUE(QuantizedLinears(c, 3, o).empty());  // MTP ignored by default
  o.mtp = MtpMode::kQuantize;
  EXPECT_EQ(QuantizedLinears(c, 3, o).size(), 12u);
  EXPECT_TRUE(CheckSelectionConsistent(c, o).ok());
}

TEST(Selection, AllLinearNeverRouterAndMatchesConfigIgnore) {
  CompressedTensorsOptions o;
  o.targets = TargetSet::kAllLinear;
  const model::DeepseekV3Config c = SmallConfig();
  const std::vector<std::string> dense = QuantizedLinears(c, 0, o);
  EXPECT_EQ(dense,
            (std::vector<std::string>{
                "model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.q_b_proj",
                "model.layers.0.self_attn.kv_a_proj_with_mqa", "model.layers.0.self_attn.kv_b_proj",
                "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj",
                "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}));
  const std::vector<std::string> moe = QuantizedLinears(c, 1, o);
  EXPECT_EQ(moe.size(), 5u + 12u + 3u);
  EXPECT_EQ(std::count(moe.begin(), moe.end(), "model.layers.1.mlp.gate"), 0);
  EXPECT_EQ(moe.back(), "model.layers.1.mlp.shared_experts.down_proj");
  // The written ignore list skips exactly the unquantized linears, for every option.
  for (TargetSet t : {TargetSet::kRoutedExperts, TargetSet::kAllLinear}) {
    for (MtpMode m : {MtpMode::kIgnore, MtpMode::kQuantize}) {
      o.targets = t;
      o.mtp = m;
      const std::vector<std::string> ignore = IgnoreList(o, c);
      for (int layer = 0; layer < 4; ++layer) {
        for (const std::string& name : LayerLinears(c, layer)) {
          EXPECT_EQ(IsQuantized(name, o, c), !MatchesIgnore(name, ignore)) << name;
        }
        // vLLM's fused names resolve the same way as their parts.
        const std::string p = "model.layers." + std::to_string(layer) + ".";
        EXPECT_EQ(MatchesIgnore(p + "self_attn.fused_qkv_a_proj", ignore),
                  MatchesIgnore(p + "self_attn.q_a_proj", ignore));
        EXPECT_TRUE(MatchesIgnore(p + "mlp.gate", ignore));
      }
      EXPECT_TRUE(MatchesIgnore("lm_head", ignore));
      EXPECT_TRUE(MatchesIgnore("model.layers.0.mlp.gate_up_proj", ignore) ==
                  (t == TargetSet::kRoutedExperts));
      EXPECT_TRUE(MatchesIgnore("model.layers.1.mlp.shared_experts.gate_up_proj", ignore) ==
                  (t == TargetSet::kRoutedExperts));
      EXPECT_TRUE(MatchesIgnore("model.layers.3.eh_proj", ignore));
    }
  }
}

TEST(Selection, InconsistentUserIgnoreIsRejected) {
  CompressedTensorsOptions o;
  const model::DeepseekV3Config c = SmallConfig();
  o.ignore_regexes = {".*experts\\.2\\.up_proj"};
  EXPECT_EQ(CheckSelectionConsistent(c, o).code(), absl::StatusCode::kFailedPrecondition);
  o.ignore_regexes = {".*experts\\.2\\..*"};
  EXPECT_EQ(CheckSelectionConsistent(c, o).code(), absl::StatusCode::kFailedPrecondition);
  o.ignore_regexes = {".*layers\\.1\\.mlp\\.experts.*"};
  EXPECT_TRUE(CheckSelectionConsistent(c, o).ok());
  EXPECT_TRUE(QuantizedLinears(c, 1, o).empty());
  o.targets = TargetSet::kAllLinear;
  o.ignore_regexes = {".*q_a_proj"};
  EXPECT_EQ(CheckSelectionConsistent(c, o).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(Selection, AllLinearLeavesPartialGroupLinearsInIgnore) {
  CompressedTensorsOptions o;
  o.targets = TargetSet::kAllLinear;
  const model::DeepseekV3Config c = NarrowConfig();
  const std::vector<std::string> ignore = IgnoreList(o, c);
  EXPECT_EQ(ignore, (std::vector<std::string>{
                        "lm_head", "re:.*mlp\\.gate$", "re:.*\\.self_attn\\.q_b_proj$",
                        "re:.*\\.self_attn\\.kv_b_proj$", "re:.*\\.mlp\\.down_proj$"}));
  EXPECT_EQ(QuantizedLinears(c, 0, o),
            (std::vector<std::string>{
                "model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa",
                "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj",
                "model.layers.0.mlp.up_proj"}));
  EXPECT_EQ(QuantizedLinears(c, 1, o).size(), 3u + 12u + 3u);
  for (int layer = 0; layer < 3; ++layer) {
    for (const std::string& name : LayerLinears(c, layer)) {
      EXPECT_EQ(IsQuantized(name, o, c), !MatchesIgnore(name, ignore)) << name;
    }
  }
  EXPECT_FALSE(MatchesIgnore("model.layers.1.mlp.shared_experts.down_proj", ignore));
  EXPECT_FALSE(MatchesIgnore("model.layers.1.mlp.experts.0.down_proj", ignore));
  EXPECT_TRUE(CheckSelectionConsistent(c, o).ok());
  // Group 32 divides every width; per-channel has no groups.
  o.group_size = 32;
  EXPECT_EQ(QuantizedLinears(c, 0, o).size(), 8u);
  o.group_size = 0;
  EXPECT_EQ(IgnoreList(o, c), (std::vector<std::string>{"lm_head", "re:.*mlp\\.gate$"}));
  // Routed experts only: the attention is ignored anyway.
  o.group_size = 128;
  o.targets = TargetSet::kRoutedExperts;
  EXPECT_EQ(IgnoreList(o, c).size(), 5u);
}

TEST(Selection, FusedNamesOfPartialGroupPairs) {
  CompressedTensorsOptions o;
  o.targets = TargetSet::kAllLinear;
  model::DeepseekV3Config c = NarrowConfig();
  c.hidden_size = 192;  // q_a/kv_a, the dense and shared gate/up and every expert read 192
  c.moe_intermediate_size = 128;
  o.group_size = 64;
  EXPECT_TRUE(CheckSelectionConsistent(c, o).ok());
  o.group_size = 128;
  const absl::Status s = CheckSelectionConsistent(c, o);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("mlp.experts.*.gate_proj has 192 input columns"), std::string::npos)
      << s.message();
  const std::vector<std::string> ignore = IgnoreList(o, c);
  for (const char* name :
       {"model.layers.0.self_attn.fused_qkv_a_proj", "model.layers.0.mlp.gate_up_proj",
        "model.layers.1.mlp.shared_experts.gate_up_proj"}) {
    EXPECT_TRUE(MatchesIgnore(name, ignore)) << name;
  }
}

}  // namespace
}  // namespace mq::quant
