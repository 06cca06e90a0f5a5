// compressed-tensors `pack-quantized` W4A16 checkpoints (FORMATS.md §4.6–§4.9): which linear
// layers of a DeepSeek-V3 checkpoint are quantized, and the `quantization_config` block that
// makes vLLM and transformers treat exactly those as quantized.
//
// The selection and the `ignore` list are two views of one rule, and they agree by
// construction: a linear is quantized iff it is in the target set and matches no entry of
// IgnoreList() under compressed-tensors' matching (exact name, or `re:<regex>` matched at the
// start of the name like Python's re.match). IgnoreList uses regexes (never exact names) so that
// vLLM's fused names (`self_attn.fused_qkv_a_proj`, `mlp.gate_up_proj`,
// `shared_experts.gate_up_proj`) and MTP prefixes resolve the same way.
//
// Plain C++ (no torch). Threading: pure functions, no shared state.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/config.h"

namespace mq::quant {

enum class TargetSet {
  kRoutedExperts,  // model.layers.N.mlp.experts.E.{gate,up,down}_proj only (the default)
  kAllLinear,      // also attention projections, dense MLPs and shared experts
};
enum class MtpMode {
  kIgnore,    // MTP layers (>= num_hidden_layers) written unquantized (BF16), ignored in config
  kQuantize,  // MTP decoder blocks quantized like the other layers
};

// "routed-experts" / "all-linear"; "ignore" / "quantize". Parse* return InvalidArgument naming
// the value and what is allowed.
std::string TargetSetName(TargetSet t);
absl::StatusOr<TargetSet> ParseTargetSet(const std::string& name);
std::string MtpModeName(MtpMode m);
absl::StatusOr<MtpMode> ParseMtpMode(const std::string& name);

struct CompressedTensorsOptions {
  int64_t group_size = 128;  // 32, 64 or 128 ("group" strategy), or 0 = per-channel
  TargetSet targets = TargetSet::kRoutedExperts;
  MtpMode mtp = MtpMode::kIgnore;
  // Extra module-name regexes left unquantized (Python `re` syntax restricted to what
  // std::regex ECMAScript reads the same way; matched at the start of the name, like re.match).
  // Written to `ignore` as "re:<regex>".
  std::vector<std::string> ignore_regexes;
};

// InvalidArgument naming the field ("group_size = 96: must be 0 (per-channel), 32, 64 or
// 128"; an ignore regex that does not compile).
absl::Status ValidateCompressedTensorsOptions(const CompressedTensorsOptions& options);

// The `ignore` list: "lm_head", then by target set (routed experts: "re:.*self_attn.*",
// "re:.*shared_experts.*", "re:.*mlp\.(gate|up|gate_up|down)_proj.*"), the router
// "re:.*mlp\.gate$", with all-linear and a group size one "re:.*\.<module>$" per non-expert
// linear kind whose input width is not a multiple of it (model/plan.h PartialGroupLinears; with
// the fused names loaders use when both halves are in: "self_attn.fused_qkv_a_proj",
// "<mlp>.gate_up_proj"), the MTP entries ("re:.*layers\.{N}\..*" per MTP layer when ignored;
// the MTP-only linears "re:.*eh_proj.*", "re:.*shared_head.*" otherwise, when the config has MTP
// layers), then the user regexes.
std::vector<std::string> IgnoreList(const CompressedTensorsOptions& options,
                                    const model::DeepseekV3Config& config);

// compressed-tensors' ignore check: `name` equals an entry, or matches an "re:" entry at its
// start. Entries whose regex does not compile never match.
bool MatchesIgnore(const std::string& name, const std::vector<std::string>& ignore);

// The `quantization_config` object of FORMATS.md §4.6 (keys as there; no `version`,
// `format` per group, `scale_dtype` or other keys older compressed-tensors forbids).
nlohmann::json QuantizationConfigJson(const CompressedTensorsOptions& options,
                                      const model::DeepseekV3Config& config);

// Every linear module (weight name without ".weight") of decoder layer `layer` (0 <= layer <
// num_hidden_layers + num_nextn_predict_layers) that a loader treats as a quantization
// candidate: attention projections, dense MLP or shared/routed experts. Never the router
// (`mlp.gate`), embeddings, lm_head or the MTP-only eh_proj/shared_head.
std::vector<std::string> LayerLinears(const model::DeepseekV3Config& config, int layer);

// True when `module` (a name from LayerLinears) is written quantized.
bool IsQuantized(const std::string& module, const CompressedTensorsOptions& options,
                 const model::DeepseekV3Config& config);

// The quantized subset of LayerLinears(config, layer), in its order.
std::vector<std::string> QuantizedLinears(const model::DeepseekV3Config& config, int layer,
                                          const CompressedTensorsOptions& options);

// FailedPrecondition naming the modules when the selection would break a loader: a routed
// expert's input width is not a multiple of the group size (a short last group); in a layer,
// gate_proj and up_proj of one MLP (vLLM fuses them), or q_a_proj and kv_a_proj_with_mqa
// (fused_qkv_a_proj), disagree; or the routed experts of a layer are partly quantized (vLLM
// uses one scheme per fused MoE layer).
absl::Status CheckSelectionConsistent(const model::DeepseekV3Config& config,
                                      const CompressedTensorsOptions& options);

}  // namespace mq::quant
