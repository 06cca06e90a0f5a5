#include "worker/model/config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace mq::model {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::UnorderedElementsAre;
using Json = nlohmann::json;

// DeepSeek-V3 hub config.json (FORMATS.md §2.1).
Json DeepseekV3Json() {
  return Json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": false, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": true, "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": true,
    "v_head_dim": 128, "vocab_size": 129280
  })");
}

std::vector<std::string> ProblemsOf(const Json& config) {
  return ParseDeepseekV3Config(config.dump()).problems;
}

TEST(ConfigTest, ParsesDeepseekV3) {
  ConfigParseResult r = ParseDeepseekV3Config(DeepseekV3Json().dump(2));
  ASSERT_THAT(r.problems, IsEmpty());
  const DeepseekV3Config& c = r.config;
  EXPECT_THAT(c.architectures, ElementsAre("DeepseekV3ForCausalLM"));
  EXPECT_EQ(c.model_type, "deepseek_v3");
  EXPECT_EQ(c.vocab_size, 129280);
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.intermediate_size, 18432);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.num_hidden_layers, 61);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_EQ(c.first_k_dense_replace, 3);
  EXPECT_EQ(c.moe_layer_freq, 1);
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.scoring_func, "sigmoid");
  EXPECT_EQ(c.topk_method, "noaux_tc");
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.num_attention_heads, 128);
  EXPECT_EQ(c.num_key_value_heads, 128);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.q_head_dim(), 192);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000);
  EXPECT_EQ(c.max_position_embeddings, 163840);
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_EQ(c.rope_scaling->type, "yarn");
  EXPECT_DOUBLE_EQ(c.rope_scaling->factor, 40);
  EXPECT_EQ(c.rope_scaling->original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.rope_scaling->beta_fast, 32);
  EXPECT_DOUBLE_EQ(c.rope_scaling->beta_slow, 1);
  EXPECT_DOUBLE_EQ(c.rope_scaling->mscale, 1);
  EXPECT_DOUBLE_EQ(c.rope_scaling->mscale_all_dim, 1);
  EXPECT_FALSE(c.tie_word_embeddings);
  ASSERT_TRUE(c.quantization_config.has_value());
  EXPECT_EQ(c.quantization_config->quant_method, "fp8");
  EXPECT_EQ(c.quantization_config->fmt, "e4m3");
  EXPECT_EQ(c.quantization_config->activation_scheme, "dynamic");
  EXPECT_EQ(c.quantization_config->weight_block_rows, 128);
  EXPECT_FALSE(c.IsMoeLayer(2));
  EXPECT_TRUE(c.IsMoeLayer(3));
  EXPECT_TRUE(c.IsMoeLayer(61));
}

TEST(ConfigTest, AppliesDefaultsAndNulls) {
  Json j = DeepseekV3Json();
  for (const char* key :
       {"num_nextn_predict_layers", "moe_layer_freq", "num_key_value_heads", "rope_scaling",
        "tie_word_embeddings", "quantization_config", "architectures"}) {
    j.erase(key);
  }
  j["q_lora_rank"] = nullptr;
  ConfigParseResult r = ParseDeepseekV3Config(j.dump());
  ASSERT_THAT(r.problems, IsEmpty());
  EXPECT_EQ(r.config.q_lora_rank, 0);
  EXPECT_EQ(r.config.num_nextn_predict_layers, 0);
  EXPECT_EQ(r.config.moe_layer_freq, 1);
  EXPECT_EQ(r.config.num_key_value_heads, 128);
  EXPECT_FALSE(r.config.rope_scaling.has_value());
  EXPECT_FALSE(r.config.quantization_config.has_value());
  EXPECT_TRUE(r.config.architectures.empty());

  j["rope_scaling"] = nullptr;
  j["quantization_config"] = nullptr;
  EXPECT_THAT(ProblemsOf(j), IsEmpty());
}

TEST(ConfigTest, AcceptsKimiK2AndRopeTypeAndUe8m0) {
  Json j = DeepseekV3Json();
  j["model_type"] = "kimi_k2";
  j["n_routed_experts"] = 384;
  j["n_group"] = 1;
  j["topk_group"] = 1;
  j["rope_scaling"].erase("type");
  j["rope_scaling"]["rope_type"] = "yarn";
  j["quantization_config"]["scale_fmt"] = "ue8m0";
  ConfigParseResult r = ParseDeepseekV3Config(j.dump());
  EXPECT_THAT(r.problems, IsEmpty());
  EXPECT_EQ(r.config.quantization_config->scale_fmt, "ue8m0");
}

TEST(ConfigTest, MoeLayerFrequency) {
  Json j = DeepseekV3Json();
  j["moe_layer_freq"] = 2;
  ConfigParseResult r = ParseDeepseekV3Config(j.dump());
  ASSERT_THAT(r.problems, IsEmpty());
  EXPECT_FALSE(r.config.IsMoeLayer(1));
  EXPECT_TRUE(r.config.IsMoeLayer(4));
  EXPECT_FALSE(r.config.IsMoeLayer(5));
}

TEST(ConfigTest, ReportsMissingKeysAndWrongTypes) {
  Json j = DeepseekV3Json();
  j.erase("hidden_size");
  j.erase("q_lora_rank");
  j["vocab_size"] = "129280";
  j["intermediate_size"] = 18432.0;
  j["norm_topk_prob"] = 1;
  j["rms_norm_eps"] = "small";
  j["scoring_func"] = 3;
  EXPECT_THAT(
      ProblemsOf(j),
      UnorderedElementsAre(
          "\"vocab_size\" = \"129280\": must be an integer in [1, 4194304], found string",
          "\"hidden_size\" is missing (required: an integer in [1, 262144])",
          "\"intermediate_size\" = 18432.0: must be an integer in [1, 262144], found number",
          "\"scoring_func\" = 3: must be \"sigmoid\" or \"softmax\", found integer",
          "\"norm_topk_prob\" = 1: must be true or false, found integer",
          "\"q_lora_rank\" is missing (required: an integer in [1, 262144] or null)",
          "\"rms_norm_eps\" = \"small\": must be a number > 0, found string"));
}

TEST(ConfigTest, ReportsRangeProblems) {
  Json j = DeepseekV3Json();
  j["hidden_size"] = 0;
  j["n_shared_experts"] = -1;
  j["num_hidden_layers"] = 100000;
  j["routed_scaling_factor"] = 0;
  j["q_lora_rank"] = 0;
  EXPECT_THAT(ProblemsOf(j), UnorderedElementsAre(
                                 "\"hidden_size\" = 0: must be an integer in [1, 262144]",
                                 "\"num_hidden_layers\" = 100000: must be an integer in [1, 1024]",
                                 "\"n_shared_experts\" = -1: must be an integer in [0, 4096]",
                                 "\"routed_scaling_factor\" = 0: must be a number > 0",
                                 "\"q_lora_rank\" = 0: must be an integer in [1, 262144]"));
}

TEST(ConfigTest, ReportsCrossFieldProblems) {
  Json j = DeepseekV3Json();
  j["n_routed_experts"] = 64;
  j["n_group"] = 3;
  j["topk_group"] = 2;
  EXPECT_THAT(ProblemsOf(j), ElementsAre("\"n_group\" = 3 must divide \"n_routed_experts\" = 64"));

  j = DeepseekV3Json();
  j["topk_group"] = 9;
  EXPECT_THAT(ProblemsOf(j), ElementsAre("\"topk_group\" = 9 must be <= \"n_group\" = 8"));

  j = DeepseekV3Json();
  j["num_experts_per_tok"] = 257;
  EXPECT_THAT(ProblemsOf(j),
              ElementsAre("\"num_experts_per_tok\" = 257 must be <= \"n_routed_experts\" = 256"));

  j = DeepseekV3Json();
  j["topk_group"] = 1;
  j["num_experts_per_tok"] = 33;  // one group of 32 experts cannot supply 33
  EXPECT_THAT(ProblemsOf(j), ElementsAre(HasSubstr("\"num_experts_per_tok\" = 33 must be <= "
                                                   "\"topk_group\" * (\"n_routed_experts\" / "
                                                   "\"n_group\") = 32")));

  j = DeepseekV3Json();
  j["first_k_dense_replace"] = 62;
  EXPECT_THAT(ProblemsOf(j),
              ElementsAre("\"first_k_dense_replace\" = 62 must be <= \"num_hidden_layers\" = 61"));
}

TEST(ConfigTest, ReportsEnumsAndQuantizationConfig) {
  Json j = DeepseekV3Json();
  j["model_type"] = "llama";
  j["architectures"] = {"LlamaForCausalLM"};
  j["topk_method"] = "random";
  j["quantization_config"]["weight_block_size"] = {64, 64};
  j["quantization_config"]["quant_method"] = "gptq";
  j["rope_scaling"]["type"] = "linear";
  EXPECT_THAT(
      ProblemsOf(j),
      UnorderedElementsAre(
          "\"architectures\" = [\"LlamaForCausalLM\"]: must contain \"DeepseekV3ForCausalLM\"",
          "\"model_type\" = \"llama\": must be \"deepseek_v3\" or \"kimi_k2\"",
          "\"topk_method\" = \"random\": must be \"noaux_tc\", \"greedy\" or "
          "\"group_limited_greedy\"",
          "\"rope_scaling.type\" = \"linear\": must be \"yarn\"",
          "\"quantization_config.quant_method\" = \"gptq\": must be \"fp8\" or "
          "\"compressed-tensors\"",
          "\"quantization_config.weight_block_size\" = [64, 64]: must be [128, 128]"));
}

// FORMATS.md §4.6's block, as mq writes it.
Json CompressedTensorsJson() {
  return Json::parse(R"({
    "config_groups": {"group_0": {
      "input_activations": null, "output_activations": null, "targets": ["Linear"],
      "weights": {"actorder": null, "block_structure": null, "dynamic": false,
                  "group_size": 128, "num_bits": 4, "observer": "minmax", "observer_kwargs": {},
                  "strategy": "group", "symmetric": true, "type": "int"}}},
    "format": "pack-quantized", "global_compression_ratio": null,
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$"],
    "kv_cache_scheme": null, "quant_method": "compressed-tensors",
    "quantization_status": "compressed"})");
}

TEST(ConfigTest, ParsesCompressedTensorsPackQuantized) {
  Json j = DeepseekV3Json();
  j["quantization_config"] = CompressedTensorsJson();
  ConfigParseResult r = ParseDeepseekV3Config(j.dump());
  ASSERT_THAT(r.problems, IsEmpty());
  EXPECT_FALSE(r.config.quantization_config.has_value());
  ASSERT_TRUE(r.config.compressed_tensors.has_value());
  const CompressedTensorsConfig& ct = *r.config.compressed_tensors;
  EXPECT_EQ(ct.format, "pack-quantized");
  EXPECT_THAT(ct.ignore, ElementsAre("lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$"));
  ASSERT_EQ(ct.groups.size(), 1u);
  EXPECT_EQ(ct.groups[0].name, "group_0");
  EXPECT_THAT(ct.groups[0].targets, ElementsAre("Linear"));
  EXPECT_EQ(ct.groups[0].strategy, "group");
  EXPECT_EQ(ct.groups[0].group_size, 128);
  EXPECT_TRUE(ct.groups[0].symmetric);

  // Per-channel, asymmetric, format given per group only.
  Json channel = CompressedTensorsJson();
  channel.erase("format");
  channel["config_groups"]["group_0"]["format"] = "pack-quantized";
  channel["config_groups"]["group_0"]["weights"]["strategy"] = "channel";
  channel["config_groups"]["group_0"]["weights"]["group_size"] = nullptr;
  channel["config_groups"]["group_0"]["weights"]["symmetric"] = false;
  j["quantization_config"] = channel;
  r = ParseDeepseekV3Config(j.dump());
  ASSERT_THAT(r.problems, IsEmpty());
  EXPECT_EQ(r.config.compressed_tensors->groups[0].strategy, "channel");
  EXPECT_EQ(r.config.compressed_tensors->groups[0].group_size, 0);
  EXPECT_FALSE(r.config.compressed_tensors->groups[0].symmetric);
}

TEST(ConfigTest, RefusesCompressedTensorsFormatsItCannotRead) {
  Json j = DeepseekV3Json();
  Json q = CompressedTensorsJson();
  q["format"] = "marlin-24";
  j["quantization_config"] = q;
  EXPECT_THAT(ProblemsOf(j),
              ElementsAre("\"quantization_config.format\" = \"marlin-24\": compressed-tensors "
                          "format \"marlin-24\" cannot be read; only \"pack-quantized\" (int4 "
                          "weights, W4A16) is supported"));

  q = CompressedTensorsJson();
  q["format"] = "float-quantized";
  q["config_groups"]["group_0"]["weights"]["num_bits"] = 8;
  q["config_groups"]["group_0"]["weights"]["actorder"] = "group";
  q["config_groups"]["group_0"]["input_activations"] = {{"num_bits", 8}};
  q["quantization_status"] = "frozen";
  j["quantization_config"] = q;
  EXPECT_THAT(
      ProblemsOf(j),
      UnorderedElementsAre(
          HasSubstr("compressed-tensors format \"float-quantized\" cannot be read"),
          "\"quantization_config.quantization_status\" = \"frozen\": must be \"compressed\" (the "
          "weights on disk packed)",
          HasSubstr("\"quantization_config.config_groups.group_0.input_activations\" = "),
          "\"quantization_config.config_groups.group_0.weights.num_bits\" = 8: must be 4 (only "
          "int4 pack-quantized weights are read)",
          HasSubstr("\"quantization_config.config_groups.group_0.weights.actorder\" = \"group\": "
                    "must be null, \"static\" or \"weight\"")));
}

TEST(ConfigTest, ReportsBadRopeScaling) {
  Json j = DeepseekV3Json();
  j["rope_scaling"] = {{"factor", -1}};
  EXPECT_THAT(
      ProblemsOf(j),
      UnorderedElementsAre(
          "\"rope_scaling.type\" is missing (required: \"yarn\", as \"type\" or \"rope_type\")",
          "\"rope_scaling.factor\" = -1: must be a number > 0",
          "\"rope_scaling.original_max_position_embeddings\" is missing (required: an integer in "
          "[1, 4294967296])"));
  j["rope_scaling"] = "yarn";
  EXPECT_THAT(ProblemsOf(j), ElementsAre("\"rope_scaling\" = \"yarn\": must be null or an "
                                         "object, found string"));
}

TEST(ConfigTest, CollectsAllProblems) {
  Json j = DeepseekV3Json();
  j.erase("vocab_size");
  j.erase("v_head_dim");
  j["n_group"] = 3;
  j["model_type"] = "gpt2";
  EXPECT_THAT(ProblemsOf(j),
              UnorderedElementsAre(HasSubstr("\"vocab_size\" is missing"),
                                   HasSubstr("\"v_head_dim\" is missing"),
                                   HasSubstr("\"model_type\" = \"gpt2\""),
                                   "\"n_group\" = 3 must divide \"n_routed_experts\" = 256",
                                   "\"topk_group\" = 4 must be <= \"n_group\" = 3"));
}

TEST(ConfigTest, ReportsJsonProblems) {
  EXPECT_THAT(ParseDeepseekV3Config("{").problems, ElementsAre(HasSubstr("invalid JSON")));
  EXPECT_THAT(ParseDeepseekV3Config("[1]").problems,
              ElementsAre("must be a JSON object, found array"));
  EXPECT_THAT(ParseDeepseekV3Config(R"({"hidden_size": 1, "hidden_size": 2})").problems,
              ElementsAre("duplicate key \"hidden_size\" in object (top level)"));
}

class ConfigFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (std::filesystem::temp_directory_path() / "config_XXXXXX").string();
    dir_ = mkdtemp(pattern.data());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

TEST_F(ConfigFileTest, LoadsAndJoinsProblems) {
  const std::string path = (dir_ / "config.json").string();
  std::ofstream(path) << DeepseekV3Json().dump();
  absl::StatusOr<DeepseekV3Config> ok = LoadDeepseekV3Config(path);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->hidden_size, 7168);

  Json j = DeepseekV3Json();
  j["n_routed_experts"] = 64;
  j["n_group"] = 3;
  j["topk_group"] = 4;
  std::ofstream(path, std::ios::trunc) << j.dump();
  absl::StatusOr<DeepseekV3Config> bad = LoadDeepseekV3Config(path);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(),
            "config.json: \"n_group\" = 3 must divide \"n_routed_experts\" = 64; config.json: "
            "\"topk_group\" = 4 must be <= \"n_group\" = 3");

  absl::StatusOr<DeepseekV3Config> missing = LoadDeepseekV3Config((dir_ / "nope.json").string());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace mq::model

namespace mq::model {
namespace {

// transformers 5 saves "rope_parameters" (rope_theta inside) and no scoring_func/topk_method.
TEST(ConfigTransformers5, RopeParametersLayoutIsAccepted) {
  const std::string base = R"({"model_type": "deepseek_v3", "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
    "first_k_dense_replace": 1, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
    "norm_topk_prob": true, "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, )";
  ConfigParseResult yarn = ParseDeepseekV3Config(
      base + R"("rope_parameters": {"rope_type": "yarn", "type": "yarn", "factor": 40,
      "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
      "mscale_all_dim": 1.0, "rope_theta": 10000.0}})");
  ASSERT_TRUE(yarn.ok()) << yarn.problems.front();
  EXPECT_EQ(yarn.config.rope_theta, 10000.0);
  EXPECT_EQ(yarn.config.scoring_func, "sigmoid");
  EXPECT_EQ(yarn.config.topk_method, "noaux_tc");
  ASSERT_TRUE(yarn.config.rope_scaling.has_value());
  EXPECT_EQ(yarn.config.rope_scaling->factor, 40);
  EXPECT_EQ(yarn.config.rope_scaling->mscale_all_dim, 1.0);

  ConfigParseResult plain = ParseDeepseekV3Config(
      base + R"("rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}})");
  ASSERT_TRUE(plain.ok()) << plain.problems.front();
  EXPECT_EQ(plain.config.rope_theta, 50000.0);
  EXPECT_FALSE(plain.config.rope_scaling.has_value());

  ConfigParseResult missing = ParseDeepseekV3Config(
      base + R"("rope_parameters": {"rope_type": "default"}})");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.problems.front().find("rope_parameters.rope_theta"), std::string::npos)
      << missing.problems.front();
}

}  // namespace
}  // namespace mq::model
