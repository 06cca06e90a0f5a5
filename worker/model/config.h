// DeepseekV3 config.json (FORMATS.md §2.1): the fields the worker needs, parsed and validated.
//
// Pure functions with no shared state; safe to call from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace mq::model {

// Upper bounds accepted for config values. Real models are far below them (DeepSeek-V3: 61
// layers, 256 experts, 128 heads, hidden 7168, intermediate 18432, vocab 129280); they exist
// so that every size computed from a config fits comfortably in int64.
inline constexpr int64_t kMaxConfigLayers = 1024;          // num_hidden_layers, nextn, dense
inline constexpr int64_t kMaxConfigExperts = 4096;         // n_routed/shared_experts, top-k, groups
inline constexpr int64_t kMaxConfigHeads = 1024;           // attention and kv heads
inline constexpr int64_t kMaxConfigDim = 1 << 18;          // hidden/intermediate/lora/head dims
inline constexpr int64_t kMaxConfigVocab = 1 << 22;        // vocab_size
inline constexpr int64_t kMaxConfigPositions = 1LL << 32;  // max/original position embeddings

// "rope_scaling" (only YaRN is supported, as in DeepSeek-V3).
struct RopeScalingConfig {
  std::string type;  // "yarn" (from "type" or "rope_type")
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0;      // default when absent
  double beta_slow = 1.0;       // default when absent
  double mscale = 1.0;          // default when absent
  double mscale_all_dim = 0.0;  // default when absent
};

// "quantization_config" of the FP8 input checkpoint.
struct Fp8QuantizationConfig {
  std::string quant_method;       // "fp8"
  std::string fmt;                // "e4m3" ("" when absent)
  std::string activation_scheme;  // "dynamic" ("" when absent)
  std::string scale_fmt;          // "ue8m0" in V3.1+ ("" when absent)
  int64_t weight_block_rows = 128;
  int64_t weight_block_cols = 128;
};

// "quantization_config" of a compressed-tensors checkpoint (FORMATS.md §4.6), as far as reading
// its weights needs it. Only what the engine can load is accepted: format "pack-quantized",
// quantization_status "compressed" (when present), and every config group int 4-bit weights
// (strategy "group" or "channel", symmetric or not, static, actorder null/"static"/"weight")
// with no input or output activation quantization (W4A16).
struct CompressedTensorsConfig {
  std::string format;  // "pack-quantized"
  // One entry per config group, in the config's key order.
  struct Group {
    std::string name;
    std::vector<std::string> targets;
    std::string strategy;    // "group" or "channel"
    int64_t group_size = 0;  // 0 for "channel"
    bool symmetric = true;
  };
  std::vector<Group> groups;
  std::vector<std::string> ignore;  // module names or "re:<regex>", as written
};

struct DeepseekV3Config {
  std::vector<std::string> architectures;  // optional; must contain "DeepseekV3ForCausalLM"
  std::string model_type;                  // "deepseek_v3" or "kimi_k2"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP width
  int64_t moe_intermediate_size = 0;  // per-expert width
  int num_hidden_layers = 0;
  int num_nextn_predict_layers = 0;  // default 0
  int first_k_dense_replace = 0;
  int moe_layer_freq = 1;  // default 1
  int n_routed_experts = 0;
  int n_shared_experts = 0;
  int num_experts_per_tok = 0;
  int n_group = 0;
  int topk_group = 0;
  double routed_scaling_factor = 0;
  std::string scoring_func;  // "sigmoid" or "softmax"
  std::string topk_method;   // "noaux_tc", "greedy" or "group_limited_greedy"
  bool norm_topk_prob = false;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;  // default num_attention_heads
  int64_t q_lora_rank = 0;      // 0 when null: attention has q_proj instead of q_a/q_b
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  double rms_norm_eps = 0;
  double rope_theta = 0;
  int64_t max_position_embeddings = 0;
  std::optional<RopeScalingConfig> rope_scaling;             // null or absent -> nullopt
  bool tie_word_embeddings = false;                          // default false
  std::optional<Fp8QuantizationConfig> quantization_config;  // FP8 input; else nullopt
  // A compressed-tensors quantization_config (then quantization_config is nullopt).
  std::optional<CompressedTensorsConfig> compressed_tensors;

  int64_t q_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Same rule as the modeling code: layer >= first_k_dense_replace && layer % moe_layer_freq == 0.
  // Also applies to MTP layers (index >= num_hidden_layers).
  bool IsMoeLayer(int layer) const;
};

// The parsed config plus every problem found. `problems` entries are full sentences that start
// with the key they are about, and do not name the file, e.g.
//   "hidden_size" is missing (required: an integer in [1, 262144])
//   "hidden_size" = "7168": must be an integer, found string
//   "n_group" = 3 must divide "n_routed_experts" = 64
// Fields whose value is missing or invalid keep their defaults in `config`.
struct ConfigParseResult {
  DeepseekV3Config config;
  std::vector<std::string> problems;
  bool ok() const { return problems.empty(); }
};

// Parses and validates the text of config.json, collecting all problems:
//  * JSON: not valid JSON, duplicate keys, or not an object (then nothing else is checked).
//  * Required keys: model_type, vocab_size, hidden_size, intermediate_size,
//    moe_intermediate_size, num_hidden_layers, first_k_dense_replace, n_routed_experts,
//    n_shared_experts, num_experts_per_tok, n_group, topk_group, routed_scaling_factor,
//    scoring_func, topk_method, norm_topk_prob, num_attention_heads, q_lora_rank (may be null),
//    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, rms_norm_eps, rope_theta,
//    max_position_embeddings.
//  * Optional keys with defaults: architectures, num_nextn_predict_layers (0), moe_layer_freq
//    (1), num_key_value_heads (num_attention_heads), rope_scaling (null), tie_word_embeddings
//    (false), quantization_config (absent). Unknown keys are ignored.
//  * Types (integers must be JSON integers; floats accept any number), ranges (sizes >= 1 and
//    below the kMaxConfig* bounds; counts such as n_shared_experts >= 0; floats > 0), enums
//    (model_type deepseek_v3|kimi_k2, scoring_func, topk_method, rope type "yarn",
//    quant_method "fp8" or "compressed-tensors", fmt "e4m3"), weight_block_size == [128, 128]
//    (fp8), what CompressedTensorsConfig accepts (compressed-tensors; a problem names the
//    unsupported format or scheme), and cross-field rules:
//    first_k_dense_replace <= num_hidden_layers, n_group divides n_routed_experts, topk_group <=
//    n_group, num_experts_per_tok <= n_routed_experts and, for grouped top-k methods, <=
//    topk_group * (n_routed_experts / n_group).
ConfigParseResult ParseDeepseekV3Config(std::string_view json_text);

// Reads `path` (at most 16 MiB) and parses it. NotFound if the file does not exist; otherwise
// InvalidArgument listing every problem, each prefixed with "config.json: " and joined by "; ".
absl::StatusOr<DeepseekV3Config> LoadDeepseekV3Config(const std::string& path);

// The routed expert a tensor or module belongs to ("model.layers.3.mlp.experts.17.up_proj.weight"
// gives 17 in *expert): false for every other name (shared experts, the router, attention).
bool RoutedExpertOf(std::string_view name, int* expert);

}  // namespace mq::model
