#include "worker/model/config.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "worker/model/json_util.h"

namespace mq::model {
namespace {

using Json = nlohmann::json;

constexpr uint64_t kMaxConfigFileBytes = 16 << 20;

// Reads typed fields of one JSON object, appending a problem for each bad one. `prefix` is
// prepended to key names ("" at top level, "rope_scaling." inside).
class FieldReader {
 public:
  FieldReader(const Json& object, std::string prefix, std::vector<std::string>* problems)
      : object_(object), prefix_(std::move(prefix)), problems_(problems) {}

  // nullptr when absent; null values are returned (callers decide whether null is allowed).
  const Json* Find(std::string_view key) const {
    auto it = object_.find(key);
    return it == object_.end() ? nullptr : &*it;
  }
  std::string Name(std::string_view key) const {
    return absl::StrCat("\"", prefix_, std::string(key), "\"");
  }

  void Problem(std::string message) { problems_->push_back(std::move(message)); }

  // Integer in [lo, hi]. Absent: `fallback` when given, else a "missing" problem.
  // Present null: `null_value` when given, else a type problem.
  std::optional<int64_t> Int(std::string_view key, int64_t lo, int64_t hi,
                             std::optional<int64_t> fallback = std::nullopt,
                             std::optional<int64_t> null_value = std::nullopt) {
    const std::string allowed = absl::StrCat("an integer in [", lo, ", ", hi, "]");
    const Json* v = Find(key);
    if (v == nullptr) {
      if (fallback) return fallback;
      Problem(absl::StrCat(Name(key), " is missing (required: ", allowed,
                           null_value ? " or null" : "", ")"));
      return std::nullopt;
    }
    if (v->is_null() && null_value) return null_value;
    if (!v->is_number_integer()) {
      Problem(absl::StrCat(Name(key), " = ", JsonForMessage(*v), ": must be ", allowed,
                           null_value ? " or null" : "", ", found ", JsonTypeName(*v)));
      return std::nullopt;
    }
    // A JSON integer above INT64_MAX is stored unsigned; treat it as out of range.
    if (v->is_number_unsigned() &&
        v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      Problem(absl::StrCat(Name(key), " = ", JsonForMessage(*v), ": must be ", allowed));
      return std::nullopt;
    }
    const int64_t value = v->get<int64_t>();
    if (value < lo || value > hi) {
      Problem(absl::StrCat(Name(key), " = ", value, ": must be ", allowed));
      return std::nullopt;
    }
    return value;
  }

  // Finite number; `positive` requires > 0.
  std::optional<double> Number(std::string_view key, bool positive,
                               std::optional<double> fallback = std::nullopt) {
    const char* allowed = positive ? "a number > 0" : "a number";
    const Json* v = Find(key);
    if (v == nullptr) {
      if (fallback) return fallback;
      Problem(absl::StrCat(Name(key), " is missing (required: ", allowed, ")"));
      return std::nullopt;
    }
    if (!v->is_number()) {
      Problem(absl::StrCat(Name(key), " = ", JsonForMessage(*v), ": must be ", allowed, ", found ",
                           JsonTypeName(*v)));
      return std::nullopt;
    }
    const double value = v->get<double>();
    if (!std::isfinite(value) || (positive && !(value > 0))) {
      Problem(absl::StrCat(Name(key), " = ", JsonForMessage(*v), ": must be ", allowed));
      return std::nullopt;
    }
    return value;
  }

  std::optional<bool> Bool(std::string_view key, std::optional<bool> fallback = std::nullopt) {
    const Json* v = Find(key);
    if (v == nullptr) {
      if (fallback) return fallback;
      Problem(absl::StrCat(Name(key), " is missing (required: true or false)"));
      return std::nullopt;
    }
    if (!v->is_boolean()) {
      Problem(absl::StrCat(Name(key), " = ", JsonForMessage(*v), ": must be true or false, found ",
                           JsonTypeName(*v)));
      return std::nullopt;
    }
    return v->get<bool>();
  }

  // String, one of `allowed` when that is non-empty. Absent: `fallback` or a problem.
  std::optional<std::string> String(std::string_view key,
                                    const std::vector<std::string_view>& allowed,
                                    std::optional<std::string> fallback = std::nullopt) {
    std::vector<std::string> quoted;
    for (std::string_view a : allowed) quoted.push_back(absl::StrCat("\"", std::string(a), "\""));
    const std::string allowed_text = allowed.empty() ? std::string("a string") : OneOf(quoted);
    const Json* v = Find(key);
    if (v == nullptr) {
      if (fallback) return fallback;
      Problem(absl::StrCat(Name(key), " is missing (required: ", allowed_text, ")"));
      return std::nullopt;
    }
    if (!v->is_string()) {
      Problem(absl::StrCat(Name(key), " = ", JsonForMessage(*v), ": must be ", allowed_text,
                           ", found ", JsonTypeName(*v)));
      return std::nullopt;
    }
    std::string value = v->get<std::string>();
    if (!allowed.empty()) {
      bool found = false;
      for (std::string_view a : allowed) found = found || a == value;
      if (!found) {
        Problem(absl::StrCat(Name(key), " = ", JsonForMessage(*v), ": must be ", allowed_text));
        return std::nullopt;
      }
    }
    return value;
  }

  // "a", "a or b", "a, b or c".
  static std::string OneOf(const std::vector<std::string>& items) {
    if (items.size() <= 1) return absl::StrJoin(items, "");
    return absl::StrCat(
        absl::StrJoin(std::vector<std::string>(items.begin(), items.end() - 1), ", "), " or ",
        items.back());
  }

 private:
  const Json& object_;
  std::string prefix_;
  std::vector<std::string>* problems_;
};

template <typename T, typename U>
void Assign(T& field, const std::optional<U>& value) {
  if (value) field = static_cast<T>(*value);
}

void ParseRopeScaling(const Json& value, ConfigParseResult& result) {
  std::vector<std::string>& problems = result.problems;
  if (value.is_null()) return;
  if (!value.is_object()) {
    problems.push_back(absl::StrCat("\"rope_scaling\" = ", JsonForMessage(value),
                                    ": must be null or an object, found ", JsonTypeName(value)));
    return;
  }
  FieldReader r(value, "rope_scaling.", &problems);
  RopeScalingConfig rope;
  const bool has_type = r.Find("type") != nullptr;
  const bool has_rope_type = r.Find("rope_type") != nullptr;
  if (!has_type && !has_rope_type) {
    problems.push_back(
        "\"rope_scaling.type\" is missing (required: \"yarn\", as \"type\" or \"rope_type\")");
  }
  std::optional<std::string> type, rope_type;
  if (has_type) type = r.String("type", {"yarn"});
  if (has_rope_type) rope_type = r.String("rope_type", {"yarn"});
  rope.type = type ? *type : rope_type ? *rope_type : "";
  Assign(rope.factor, r.Number("factor", /*positive=*/true));
  Assign(rope.original_max_position_embeddings,
         r.Int("original_max_position_embeddings", 1, kMaxConfigPositions));
  Assign(rope.beta_fast, r.Number("beta_fast", false, 32.0));
  Assign(rope.beta_slow, r.Number("beta_slow", false, 1.0));
  Assign(rope.mscale, r.Number("mscale", false, 1.0));
  Assign(rope.mscale_all_dim, r.Number("mscale_all_dim", false, 0.0));
  result.config.rope_scaling = rope;
}

// A JSON array of strings at `key` (absent = empty); a problem otherwise.
std::vector<std::string> StringList(FieldReader& r, std::string_view key) {
  std::vector<std::string> out;
  const Json* v = r.Find(key);
  if (v == nullptr || v->is_null()) return out;
  bool ok = v->is_array();
  if (ok) {
    for (const Json& e : *v) {
      if (!e.is_string()) {
        ok = false;
        break;
      }
      out.push_back(e.get<std::string>());
    }
  }
  if (!ok) {
    r.Problem(absl::StrCat(r.Name(key), " = ", JsonForMessage(*v), ": must be a list of strings"));
    out.clear();
  }
  return out;
}

// compressed-tensors (FORMATS.md §4.6): only what the engine reads (CompressedTensorsConfig).
void ParseCompressedTensors(const Json& value, ConfigParseResult& result) {
  std::vector<std::string>& problems = result.problems;
  FieldReader r(value, "quantization_config.", &problems);
  CompressedTensorsConfig ct;
  const Json* format = r.Find("format");
  if (format != nullptr && !format->is_null()) {
    if (!format->is_string()) {
      r.Problem(
          absl::StrCat(r.Name("format"), " = ", JsonForMessage(*format), ": must be a string"));
    } else {
      ct.format = format->get<std::string>();
    }
  }
  auto check_format = [&](const std::string& name, const std::string& f) {
    if (f != "pack-quantized") {
      problems.push_back(absl::StrCat("\"", name, "\" = \"", f, "\": compressed-tensors format \"",
                                      f,
                                      "\" cannot be read; only \"pack-quantized\" "
                                      "(int4 weights, W4A16) is supported"));
    }
  };
  if (!ct.format.empty()) check_format("quantization_config.format", ct.format);
  if (const Json* status = r.Find("quantization_status");
      status != nullptr && !(status->is_string() && status->get<std::string>() == "compressed")) {
    r.Problem(absl::StrCat(r.Name("quantization_status"), " = ", JsonForMessage(*status),
                           ": must be \"compressed\" (the weights on disk packed)"));
  }
  ct.ignore = StringList(r, "ignore");
  if (const Json* kv = r.Find("kv_cache_scheme"); kv != nullptr && !kv->is_null()) {
    r.Problem(absl::StrCat(r.Name("kv_cache_scheme"), " = ", JsonForMessage(*kv),
                           ": must be null (a quantized KV cache is not supported)"));
  }
  const Json* groups = r.Find("config_groups");
  if (groups == nullptr || !groups->is_object() || groups->empty()) {
    r.Problem(absl::StrCat(r.Name("config_groups"),
                           groups == nullptr ? " is missing" : " = " + JsonForMessage(*groups),
                           ": must be an object of one or more quantization schemes"));
    result.config.compressed_tensors = ct;
    return;
  }
  for (const auto& [name, group] : groups->items()) {
    const std::string prefix = absl::StrCat("quantization_config.config_groups.", name, ".");
    if (!group.is_object()) {
      problems.push_back(absl::StrCat("\"", prefix.substr(0, prefix.size() - 1),
                                      "\" = ", JsonForMessage(group), ": must be an object"));
      continue;
    }
    FieldReader g(group, prefix, &problems);
    CompressedTensorsConfig::Group out;
    out.name = name;
    out.targets = StringList(g, "targets");
    if (const Json* f = g.Find("format"); f != nullptr && !f->is_null()) {
      if (f->is_string()) {
        check_format(prefix + "format", f->get<std::string>());
      } else {
        g.Problem(absl::StrCat(g.Name("format"), " = ", JsonForMessage(*f), ": must be a string"));
      }
    } else if (ct.format.empty()) {
      problems.push_back(absl::StrCat("\"quantization_config.format\" is missing and \"", prefix,
                                      "format\" too (required: \"pack-quantized\")"));
    }
    for (const char* act : {"input_activations", "output_activations"}) {
      if (const Json* a = g.Find(act); a != nullptr && !a->is_null()) {
        g.Problem(absl::StrCat(g.Name(act), " = ", JsonForMessage(*a),
                               ": must be null; only weight-only quantization (W4A16) is "
                               "supported"));
      }
    }
    const Json* weights = g.Find("weights");
    if (weights == nullptr || !weights->is_object()) {
      g.Problem(absl::StrCat(g.Name("weights"),
                             weights == nullptr ? " is missing" : " = " + JsonForMessage(*weights),
                             ": must be an object (int 4-bit weight quantization)"));
      ct.groups.push_back(out);
      continue;
    }
    FieldReader w(*weights, prefix + "weights.", &problems);
    if (const Json* bits = w.Find("num_bits");
        bits == nullptr || !bits->is_number_integer() || bits->get<int64_t>() != 4) {
      w.Problem(absl::StrCat(w.Name("num_bits"),
                             bits == nullptr ? " is missing" : " = " + JsonForMessage(*bits),
                             ": must be 4 (only int4 pack-quantized weights are read)"));
    }
    w.String("type", {"int"});
    Assign(out.symmetric, w.Bool("symmetric", true));
    if (auto dynamic = w.Bool("dynamic", false); dynamic && *dynamic) {
      w.Problem(absl::StrCat(w.Name("dynamic"), " = true: must be false (static weight scales)"));
    }
    Assign(out.strategy, w.String("strategy", {"group", "channel"}));
    if (out.strategy == "group") {
      Assign(out.group_size, w.Int("group_size", 1, kMaxConfigDim));
    }
    if (const Json* a = w.Find("actorder"); a != nullptr && !a->is_null()) {
      const bool ok = a->is_string() &&
                      (a->get<std::string>() == "static" || a->get<std::string>() == "weight");
      if (!ok) {
        w.Problem(absl::StrCat(w.Name("actorder"), " = ", JsonForMessage(*a),
                               ": must be null, \"static\" or \"weight\" (group act-order with "
                               "weight_g_idx is not supported)"));
      }
    }
    if (const Json* b = w.Find("block_structure"); b != nullptr && !b->is_null()) {
      w.Problem(
          absl::StrCat(w.Name("block_structure"), " = ", JsonForMessage(*b), ": must be null"));
    }
    ct.groups.push_back(out);
  }
  result.config.compressed_tensors = ct;
}

void ParseQuantizationConfig(const Json& value, ConfigParseResult& result) {
  std::vector<std::string>& problems = result.problems;
  if (value.is_null()) return;
  if (!value.is_object()) {
    problems.push_back(absl::StrCat("\"quantization_config\" = ", JsonForMessage(value),
                                    ": must be an object, found ", JsonTypeName(value)));
    return;
  }
  FieldReader r(value, "quantization_config.", &problems);
  std::optional<std::string> method = r.String("quant_method", {"fp8", "compressed-tensors"});
  if (method && *method == "compressed-tensors") {
    ParseCompressedTensors(value, result);
    return;
  }
  // FP8 (or an unknown method, already reported: the FP8 keys are checked too).
  Fp8QuantizationConfig quant;
  Assign(quant.quant_method, method);
  Assign(quant.fmt, r.String("fmt", {"e4m3"}, ""));
  Assign(quant.activation_scheme, r.String("activation_scheme", {}, ""));
  Assign(quant.scale_fmt, r.String("scale_fmt", {}, ""));
  const Json* block = r.Find("weight_block_size");
  if (block == nullptr) {
    problems.push_back(
        "\"quantization_config.weight_block_size\" is missing (required: [128, 128])");
  } else if (!(block->is_array() && block->size() == 2 && (*block)[0].is_number_integer() &&
               (*block)[1].is_number_integer() && (*block)[0].get<int64_t>() == 128 &&
               (*block)[1].get<int64_t>() == 128)) {
    problems.push_back(absl::StrCat("\"quantization_config.weight_block_size\" = ",
                                    JsonForMessage(*block), ": must be [128, 128]"));
  }
  result.config.quantization_config = quant;
}

}  // namespace

bool DeepseekV3Config::IsMoeLayer(int layer) const {
  return n_routed_experts > 0 && layer >= first_k_dense_replace && moe_layer_freq > 0 &&
         layer % moe_layer_freq == 0;
}

ConfigParseResult ParseDeepseekV3Config(std::string_view json_text) {
  ConfigParseResult result;
  std::vector<std::string>& problems = result.problems;
  absl::StatusOr<Json> parsed = ParseJsonStrict(json_text);
  if (!parsed.ok()) {
    problems.push_back(std::string(parsed.status().message()));
    return result;
  }
  if (!parsed->is_object()) {
    problems.push_back(absl::StrCat("must be a JSON object, found ", JsonTypeName(*parsed)));
    return result;
  }
  const Json& root = *parsed;
  DeepseekV3Config& c = result.config;
  FieldReader r(root, "", &problems);

  if (const Json* arch = r.Find("architectures"); arch != nullptr) {
    bool all_strings = arch->is_array();
    if (all_strings) {
      for (const Json& a : *arch) all_strings = all_strings && a.is_string();
    }
    if (!all_strings) {
      problems.push_back(absl::StrCat("\"architectures\" = ", JsonForMessage(*arch),
                                      ": must be an array of strings, found ",
                                      JsonTypeName(*arch)));
    } else {
      for (const Json& a : *arch) c.architectures.push_back(a.get<std::string>());
      bool found = false;
      for (const std::string& a : c.architectures) found = found || a == "DeepseekV3ForCausalLM";
      if (!found) {
        problems.push_back(absl::StrCat("\"architectures\" = ", JsonForMessage(*arch),
                                        ": must contain \"DeepseekV3ForCausalLM\""));
      }
    }
  }
  Assign(c.model_type, r.String("model_type", {"deepseek_v3", "kimi_k2"}));

  auto vocab = r.Int("vocab_size", 1, kMaxConfigVocab);
  auto hidden = r.Int("hidden_size", 1, kMaxConfigDim);
  auto inter = r.Int("intermediate_size", 1, kMaxConfigDim);
  auto moe_inter = r.Int("moe_intermediate_size", 1, kMaxConfigDim);
  auto layers = r.Int("num_hidden_layers", 1, kMaxConfigLayers);
  auto nextn = r.Int("num_nextn_predict_layers", 0, kMaxConfigLayers, 0);
  auto dense = r.Int("first_k_dense_replace", 0, kMaxConfigLayers);
  auto freq = r.Int("moe_layer_freq", 1, kMaxConfigLayers, 1);
  auto experts = r.Int("n_routed_experts", 1, kMaxConfigExperts);
  auto shared = r.Int("n_shared_experts", 0, kMaxConfigExperts);
  auto topk = r.Int("num_experts_per_tok", 1, kMaxConfigExperts);
  auto n_group = r.Int("n_group", 1, kMaxConfigExperts);
  auto topk_group = r.Int("topk_group", 1, kMaxConfigExperts);
  auto scaling = r.Number("routed_scaling_factor", /*positive=*/true);
  // transformers 5 saves neither key (its DeepseekV3 always routes with sigmoid + noaux_tc).
  auto scoring = r.String("scoring_func", {"sigmoid", "softmax"}, "sigmoid");
  auto topk_method =
      r.String("topk_method", {"noaux_tc", "greedy", "group_limited_greedy"}, "noaux_tc");
  auto norm_topk = r.Bool("norm_topk_prob");
  auto heads = r.Int("num_attention_heads", 1, kMaxConfigHeads);
  auto kv_heads = r.Int("num_key_value_heads", 1, kMaxConfigHeads, heads.value_or(1));
  auto q_lora = r.Int("q_lora_rank", 1, kMaxConfigDim, std::nullopt, /*null_value=*/0);
  auto kv_lora = r.Int("kv_lora_rank", 1, kMaxConfigDim);
  auto nope = r.Int("qk_nope_head_dim", 1, kMaxConfigDim);
  auto rope = r.Int("qk_rope_head_dim", 1, kMaxConfigDim);
  auto v_dim = r.Int("v_head_dim", 1, kMaxConfigDim);
  auto eps = r.Number("rms_norm_eps", /*positive=*/true);
  // transformers 5 writes "rope_parameters" {rope_theta, rope_type, yarn fields} instead of
  // "rope_theta" and "rope_scaling"; accept both layouts.
  const Json* rope_parameters = r.Find("rope_parameters");
  const bool v5_rope = r.Find("rope_theta") == nullptr && rope_parameters != nullptr &&
                       rope_parameters->is_object();
  std::optional<double> theta;
  if (v5_rope) {
    FieldReader rp(*rope_parameters, "rope_parameters.", &problems);
    theta = rp.Number("rope_theta", /*positive=*/true);
  } else {
    theta = r.Number("rope_theta", /*positive=*/true);
  }
  auto max_pos = r.Int("max_position_embeddings", 1, kMaxConfigPositions);
  auto tie = r.Bool("tie_word_embeddings", false);

  Assign(c.vocab_size, vocab);
  Assign(c.hidden_size, hidden);
  Assign(c.intermediate_size, inter);
  Assign(c.moe_intermediate_size, moe_inter);
  Assign(c.num_hidden_layers, layers);
  Assign(c.num_nextn_predict_layers, nextn);
  Assign(c.first_k_dense_replace, dense);
  Assign(c.moe_layer_freq, freq);
  Assign(c.n_routed_experts, experts);
  Assign(c.n_shared_experts, shared);
  Assign(c.num_experts_per_tok, topk);
  Assign(c.n_group, n_group);
  Assign(c.topk_group, topk_group);
  Assign(c.routed_scaling_factor, scaling);
  Assign(c.scoring_func, scoring);
  Assign(c.topk_method, topk_method);
  Assign(c.norm_topk_prob, norm_topk);
  Assign(c.num_attention_heads, heads);
  Assign(c.num_key_value_heads, kv_heads);
  Assign(c.q_lora_rank, q_lora);
  Assign(c.kv_lora_rank, kv_lora);
  Assign(c.qk_nope_head_dim, nope);
  Assign(c.qk_rope_head_dim, rope);
  Assign(c.v_head_dim, v_dim);
  Assign(c.rms_norm_eps, eps);
  Assign(c.rope_theta, theta);
  Assign(c.max_position_embeddings, max_pos);
  Assign(c.tie_word_embeddings, tie);

  if (const Json* v = r.Find("rope_scaling"); v != nullptr) {
    ParseRopeScaling(*v, result);
  } else if (v5_rope) {
    const Json* type = rope_parameters->contains("rope_type") ? &(*rope_parameters)["rope_type"]
                                                              : nullptr;
    if (type == nullptr || !type->is_string() || type->get<std::string>() != "default") {
      ParseRopeScaling(*rope_parameters, result);
    }
  }
  if (const Json* v = r.Find("quantization_config"); v != nullptr) {
    ParseQuantizationConfig(*v, result);
  }

  // Cross-field rules, checked only when both sides are valid.
  if (dense && layers && *dense > *layers) {
    problems.push_back(absl::StrCat("\"first_k_dense_replace\" = ", *dense,
                                    " must be <= \"num_hidden_layers\" = ", *layers));
  }
  if (n_group && experts && *experts % *n_group != 0) {
    problems.push_back(
        absl::StrCat("\"n_group\" = ", *n_group, " must divide \"n_routed_experts\" = ", *experts));
  }
  if (topk_group && n_group && *topk_group > *n_group) {
    problems.push_back(
        absl::StrCat("\"topk_group\" = ", *topk_group, " must be <= \"n_group\" = ", *n_group));
  }
  if (topk && experts && *topk > *experts) {
    problems.push_back(absl::StrCat("\"num_experts_per_tok\" = ", *topk,
                                    " must be <= \"n_routed_experts\" = ", *experts));
  } else if (topk && experts && n_group && topk_group && topk_method && *topk_method != "greedy" &&
             *experts % *n_group == 0 && *topk_group <= *n_group &&
             *topk > *topk_group * (*experts / *n_group)) {
    problems.push_back(
        absl::StrCat("\"num_experts_per_tok\" = ", *topk,
                     " must be <= \"topk_group\" * (\"n_routed_experts\" / \"n_group\") = ",
                     *topk_group * (*experts / *n_group), " (the experts in the selected groups)"));
  }
  return result;
}

absl::StatusOr<DeepseekV3Config> LoadDeepseekV3Config(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path, kMaxConfigFileBytes);
  if (!text.ok()) return text.status();
  ConfigParseResult result = ParseDeepseekV3Config(*text);
  if (!result.ok()) {
    std::vector<std::string> prefixed;
    for (const std::string& p : result.problems)
      prefixed.push_back(absl::StrCat("config.json: ", p));
    return absl::InvalidArgumentError(absl::StrJoin(prefixed, "; "));
  }
  return std::move(result.config);
}

bool RoutedExpertOf(std::string_view name, int* expert) {
  const size_t at = name.find(".mlp.experts.");
  if (at == std::string_view::npos) return false;
  size_t p = at + 13;
  int e = 0;
  bool digits = false;
  while (p < name.size() && name[p] >= '0' && name[p] <= '9') {
    e = e * 10 + (name[p++] - '0');
    digits = true;
  }
  if (!digits) return false;
  *expert = e;
  return true;
}

}  // namespace mq::model
