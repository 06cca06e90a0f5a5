#include "worker/quant/compressed_tensors.h"

#include <algorithm>
#include <regex>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "worker/model/plan.h"

namespace mq::quant {
namespace {

constexpr const char* kReRoutedOnlyAttention = "re:.*self_attn.*";
constexpr const char* kReSharedExperts = "re:.*shared_experts.*";
constexpr const char* kReDenseMlp = "re:.*mlp\\.(gate|up|gate_up|down)_proj.*";
constexpr const char* kReRouter = "re:.*mlp\\.gate$";

bool IsRoutedExpert(const std::string& module) {
  return module.find(".mlp.experts.") != std::string::npos;
}

std::string EscapeDots(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '.') out += '\\';
    out += c;
  }
  return out;
}

// Ignore entries for the non-expert linears a group size cannot cover (see IgnoreList).
std::vector<std::string> PartialGroupIgnores(const CompressedTensorsOptions& options,
                                             const model::DeepseekV3Config& config) {
  std::vector<std::string> modules;
  if (options.targets != TargetSet::kAllLinear) return modules;
  for (const model::PartialGroupLinear& p :
       model::PartialGroupLinears(config, options.group_size, /*all_linear=*/true)) {
    if (!p.routed_expert) modules.push_back(p.module);
  }
  auto has = [&modules](const std::string& m) {
    return std::find(modules.begin(), modules.end(), m) != modules.end();
  };
  std::vector<std::string> fused;
  if (has("self_attn.q_a_proj") && has("self_attn.kv_a_proj_with_mqa")) {
    fused.push_back("self_attn.fused_qkv_a_proj");
  }
  for (const char* mlp : {"mlp.", "mlp.shared_experts."}) {
    if (has(absl::StrCat(mlp, "gate_proj")) && has(absl::StrCat(mlp, "up_proj"))) {
      fused.push_back(absl::StrCat(mlp, "gate_up_proj"));
    }
  }
  modules.insert(modules.end(), fused.begin(), fused.end());
  std::vector<std::string> out;
  for (const std::string& m : modules) out.push_back(absl::StrCat("re:.*\\.", EscapeDots(m), "$"));
  return out;
}

}  // namespace

std::string TargetSetName(TargetSet t) {
  return t == TargetSet::kRoutedExperts ? "routed-experts" : "all-linear";
}

absl::StatusOr<TargetSet> ParseTargetSet(const std::string& name) {
  if (name == "routed-experts") return TargetSet::kRoutedExperts;
  if (name == "all-linear") return TargetSet::kAllLinear;
  return absl::InvalidArgumentError(
      absl::StrCat("targets = \"", name, "\": must be routed-experts or all-linear"));
}

std::string MtpModeName(MtpMode m) { return m == MtpMode::kIgnore ? "ignore" : "quantize"; }

absl::StatusOr<MtpMode> ParseMtpMode(const std::string& name) {
  if (name == "ignore") return MtpMode::kIgnore;
  if (name == "quantize") return MtpMode::kQuantize;
  return absl::InvalidArgumentError(
      absl::StrCat("mtp = \"", name, "\": must be ignore or quantize"));
}

absl::Status ValidateCompressedTensorsOptions(const CompressedTensorsOptions& options) {
  const int64_t g = options.group_size;
  if (g != 0 && g != 32 && g != 64 && g != 128) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group_size = ", g, ": must be 0 (per-channel), 32, 64 or 128 (vLLM's MoE kernels)"));
  }
  for (const std::string& re : options.ignore_regexes) {
    if (re.empty()) return absl::InvalidArgumentError("ignore regex is empty");
    try {
      std::regex compiled(re, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("ignore regex \"", re, "\" does not compile: ", e.what()));
    }
  }
  return absl::OkStatus();
}

std::vector<std::string> IgnoreList(const CompressedTensorsOptions& options,
                                    const model::DeepseekV3Config& config) {
  std::vector<std::string> ignore = {"lm_head"};
  if (options.targets == TargetSet::kRoutedExperts) {
    ignore.push_back(kReRoutedOnlyAttention);
    ignore.push_back(kReSharedExperts);
    ignore.push_back(kReDenseMlp);
  }
  ignore.push_back(kReRouter);
  for (std::string& entry : PartialGroupIgnores(options, config)) {
    ignore.push_back(std::move(entry));
  }
  if (config.num_nextn_predict_layers > 0) {
    if (options.mtp == MtpMode::kIgnore) {
      for (int i = 0; i < config.num_nextn_predict_layers; ++i) {
        ignore.push_back(absl::StrCat("re:.*layers\\.", config.num_hidden_layers + i, "\\..*"));
      }
    } else {
      // FORMATS.md §4.9: eh_proj / shared_head stay BF16 even when the MTP block is quantized.
      ignore.push_back("re:.*eh_proj.*");
      ignore.push_back("re:.*shared_head.*");
    }
  }
  for (const std::string& re : options.ignore_regexes) ignore.push_back(absl::StrCat("re:", re));
  return ignore;
}

bool MatchesIgnore(const std::string& name, const std::vector<std::string>& ignore) {
  for (const std::string& entry : ignore) {
    if (entry.rfind("re:", 0) == 0) {
      try {
        const std::regex re(entry.substr(3), std::regex::ECMAScript);
        if (std::regex_search(name, re, std::regex_constants::match_continuous)) return true;
      } catch (const std::regex_error&) {
        // Validated earlier; an uncompilable entry never matches.
      }
    } else if (entry == name) {
      return true;
    }
  }
  return false;
}

nlohmann::json QuantizationConfigJson(const CompressedTensorsOptions& options,
                                      const model::DeepseekV3Config& config) {
  const bool channel = options.group_size == 0;
  nlohmann::json weights = {
      {"actorder", nullptr},
      {"block_structure", nullptr},
      {"dynamic", false},
      {"group_size", channel ? nlohmann::json(nullptr) : nlohmann::json(options.group_size)},
      {"num_bits", 4},
      {"observer", "minmax"},
      {"observer_kwargs", nlohmann::json::object()},
      {"strategy", channel ? "channel" : "group"},
      {"symmetric", true},
      {"type", "int"},
  };
  nlohmann::json group = {
      {"input_activations", nullptr},
      {"output_activations", nullptr},
      {"targets", nlohmann::json::array({"Linear"})},
      {"weights", weights},
  };
  return nlohmann::json{
      {"config_groups", {{"group_0", group}}},
      {"format", "pack-quantized"},
      {"global_compression_ratio", nullptr},
      {"ignore", IgnoreList(options, config)},
      {"kv_cache_scheme", nullptr},
      {"quant_method", "compressed-tensors"},
      {"quantization_status", "compressed"},
  };
}

std::vector<std::string> LayerLinears(const model::DeepseekV3Config& config, int layer) {
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  std::vector<std::string> out;
  if (config.q_lora_rank > 0) {
    out.push_back(p + "self_attn.q_a_proj");
    out.push_back(p + "self_attn.q_b_proj");
  } else {
    out.push_back(p + "self_attn.q_proj");
  }
  out.push_back(p + "self_attn.kv_a_proj_with_mqa");
  out.push_back(p + "self_attn.kv_b_proj");
  out.push_back(p + "self_attn.o_proj");
  auto mlp = [&out](const std::string& m) {
    for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) out.push_back(m + proj);
  };
  if (!config.IsMoeLayer(layer)) {
    mlp(p + "mlp.");
    return out;
  }
  for (int e = 0; e < config.n_routed_experts; ++e) mlp(absl::StrCat(p, "mlp.experts.", e, "."));
  if (config.n_shared_experts > 0) mlp(p + "mlp.shared_experts.");
  return out;
}

bool IsQuantized(const std::string& module, const CompressedTensorsOptions& options,
                 const model::DeepseekV3Config& config) {
  if (options.targets == TargetSet::kRoutedExperts && !IsRoutedExpert(module)) return false;
  return !MatchesIgnore(module, IgnoreList(options, config));
}

std::vector<std::string> QuantizedLinears(const model::DeepseekV3Config& config, int layer,
                                          const CompressedTensorsOptions& options) {
  const std::vector<std::string> ignore = IgnoreList(options, config);
  std::vector<std::string> out;
  for (const std::string& m : LayerLinears(config, layer)) {
    if (options.targets == TargetSet::kRoutedExperts && !IsRoutedExpert(m)) continue;
    if (!MatchesIgnore(m, ignore)) out.push_back(m);
  }
  return out;
}

absl::Status CheckSelectionConsistent(const model::DeepseekV3Config& config,
                                      const CompressedTensorsOptions& options) {
  for (const model::PartialGroupLinear& p : model::PartialGroupLinears(
           config, options.group_size, options.targets == TargetSet::kAllLinear)) {
    if (!p.routed_expert) continue;
    return absl::FailedPreconditionError(absl::StrCat(
        "group_size = ", options.group_size, ": the routed experts' ", p.module, " has ",
        p.in_features, " input columns, not a multiple of ", options.group_size,
        " (a short last group, which vLLM and transformers cannot run): use a group size that "
        "divides it, or 0 (per channel)"));
  }
  const int layers = config.num_hidden_layers + config.num_nextn_predict_layers;
  for (int layer = 0; layer < layers; ++layer) {
    const std::vector<std::string> all = LayerLinears(config, layer);
    const std::vector<std::string> q = QuantizedLinears(config, layer, options);
    auto quantized = [&q](const std::string& m) {
      for (const std::string& x : q) {
        if (x == m) return true;
      }
      return false;
    };
    auto must_agree = [&](const std::string& a, const std::string& b) -> absl::Status {
      if (quantized(a) != quantized(b)) {
        return absl::FailedPreconditionError(absl::StrCat(
            a, " is ", quantized(a) ? "" : "not ", "quantized but ", b, " is ",
            quantized(b) ? "" : "not ", "(loaders fuse them): adjust the ignore regexes"));
      }
      return absl::OkStatus();
    };
    const std::string p = absl::StrCat("model.layers.", layer, ".");
    if (config.q_lora_rank > 0) {
      absl::Status s = must_agree(p + "self_attn.q_a_proj", p + "self_attn.kv_a_proj_with_mqa");
      if (!s.ok()) return s;
    }
    std::string first_expert;
    bool first_quantized = false;
    for (const std::string& m : all) {
      const std::string suffix = "gate_proj";
      if (m.size() > suffix.size() &&
          m.compare(m.size() - suffix.size(), suffix.size(), suffix) == 0) {
        const std::string base = m.substr(0, m.size() - suffix.size());
        absl::Status s = must_agree(m, base + "up_proj");
        if (!s.ok()) return s;
      }
      if (IsRoutedExpert(m)) {
        if (first_expert.empty()) {
          first_expert = m;
          first_quantized = quantized(m);
        } else if (quantized(m) != first_quantized) {
          return absl::FailedPreconditionError(absl::StrCat(
              m, " is ", quantized(m) ? "" : "not ", "quantized but ", first_expert, " is ",
              first_quantized ? "" : "not ",
              "(vLLM runs all routed experts of a layer with one scheme): adjust the ignore "
              "regexes"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace mq::quant
