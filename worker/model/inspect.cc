#include "worker/model/inspect.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <string_view>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/path_policy.h"
#include "nlohmann/json.hpp"
#include "worker/model/config.h"
#include "worker/model/json_util.h"
#include "worker/model/plan.h"
#include "worker/model/safetensors.h"

namespace mq::model {
namespace {

using Json = nlohmann::json;

constexpr char kConfigFile[] = "config.json";
constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kSingleShard[] = "model.safetensors";
constexpr uint64_t kMaxConfigBytes = 16 << 20;
constexpr uint64_t kMaxIndexBytes = 1ULL << 30;

std::string Quote(std::string_view s) { return absl::StrCat("\"", std::string(s), "\""); }

// Status message without the "<path>: " prefix the readers add.
std::string StripPath(const absl::Status& status, const std::string& path) {
  absl::string_view message = status.message();
  const std::string prefix = path + ": ";
  if (absl::StartsWith(message, prefix)) message.remove_prefix(prefix.size());
  return std::string(message);
}

bool IsPlainFileName(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string_view::npos &&
         name.find('\0') == std::string_view::npos;
}

bool IsWideFloat(DType dtype) { return IsFloat(dtype) && DTypeBits(dtype) >= 16; }

// Where one indexed tensor lives.
struct Located {
  std::string shard;
  const TensorInfo* info = nullptr;
};

class Inspector {
 public:
  explicit Inspector(const InspectRequest& request) : request_(request), dir_(request.model_dir) {}

  InspectReport Run() {
    const bool request_ok = CheckRequestFields();
    std::error_code ec;
    if (request_.model_dir.empty()) return std::move(report_);
    if (!std::filesystem::is_directory(dir_, ec)) {
      Add("request.model_dir", std::filesystem::exists(dir_, ec)
                                   ? absl::StrCat(Quote(request_.model_dir), " is not a directory")
                                   : absl::StrCat(Quote(request_.model_dir), " does not exist"));
      return std::move(report_);
    }
    const bool config_ok = LoadConfig();
    LoadIndex();
    LoadShards();
    CrossCheckIndexAndShards();
    if (config_ok) {
      const bool plan_request_ok = CheckRequestAgainstConfig() && request_ok;
      CheckInventory();
      if (plan_request_ok) Plan();
    }
    ReportUnindexed();
    return std::move(report_);
  }

 private:
  void Add(std::string where, std::string message) {
    report_.problems.push_back(Problem{std::move(where), std::move(message)});
  }
  // Every file of the model directory is named through ModelDirFile: a symlink leading out of
  // the directory is refused before anything is read through it.
  absl::StatusOr<std::string> PathOf(std::string_view file) const {
    return ModelDirFile(request_.model_dir, std::string(file));
  }

  // request.<field> checks that do not need the config. True when all pass.
  bool CheckRequestFields() {
    const size_t before = report_.problems.size();
    const InspectRequest& r = request_;
    if (r.model_dir.empty()) Add("request.model_dir", "model_dir is empty: must name a directory");
    if (r.gang_size < 1)
      Add("request.gang_size", absl::StrCat("gang_size = ", r.gang_size, ": must be >= 1"));
    if (r.bits != 4) Add("request.bits", absl::StrCat("bits = ", r.bits, ": must be 4"));
    if (r.group_size != 0 && r.group_size != 32 && r.group_size != 64 && r.group_size != 128) {
      Add("request.group_size",
          absl::StrCat("group_size = ", r.group_size, ": must be 0 (per-channel), 32, 64 or 128"));
    }
    if (r.num_calibration_samples < 1) {
      Add("request.num_calibration_samples",
          absl::StrCat("num_calibration_samples = ", r.num_calibration_samples, ": must be >= 1"));
    }
    if (r.max_sequence_length < 1) {
      Add("request.max_sequence_length",
          absl::StrCat("max_sequence_length = ", r.max_sequence_length, ": must be >= 1"));
    }
    for (const auto& [field, value] :
         {std::pair<const char*, int64_t>{"experts_per_pass", r.experts_per_pass},
          {"dispatch_tokens", r.dispatch_tokens}}) {
      if (value < 0 && value != kChooseSetting) {
        Add(absl::StrCat("request.", field),
            absl::StrCat(field, " = ", value, ": must be >= 0 (0 = all) or ", kChooseSetting,
                         " (chosen by the plan)"));
      }
    }
    if (r.device_memory_bytes < 0) {
      Add("request.device_memory_bytes",
          absl::StrCat("device_memory_bytes = ", r.device_memory_bytes,
                       ": must be >= 0 (0 = unknown)"));
    }
    return report_.problems.size() == before;
  }

  bool CheckRequestAgainstConfig() {
    const size_t before = report_.problems.size();
    if (request_.gang_size > config_.n_routed_experts) {
      Add("request.gang_size",
          absl::StrCat("gang_size = ", request_.gang_size, ": must be <= n_routed_experts = ",
                       config_.n_routed_experts, " (every rank owns at least one expert)"));
    }
    if (request_.include_mtp && config_.num_nextn_predict_layers == 0) {
      Add("request.include_mtp",
          "include_mtp is set but config.json \"num_nextn_predict_layers\" = 0 (no MTP layers)");
    }
    CheckGroupSizeAgainstExperts();
    return report_.problems.size() == before;
  }

  // Routed experts whose input width is not a multiple of the group size cannot be written
  // (a short last group) nor left out one by one (vLLM runs a layer's experts with one scheme).
  void CheckGroupSizeAgainstExperts() {
    const int group = request_.group_size;
    if (group != 32 && group != 64 && group != 128) return;  // per-channel, or a problem already
    std::vector<PartialGroupLinear> experts;
    for (PartialGroupLinear& p : PartialGroupLinears(config_, group, request_.all_linear)) {
      if (p.routed_expert) experts.push_back(std::move(p));
    }
    if (experts.empty()) return;
    std::vector<std::string> fitting;
    for (int g : {128, 64, 32}) {
      if (g == group) continue;
      if (PartialGroupLinears(config_, g, /*all_linear=*/false).empty()) {
        fitting.push_back(absl::StrCat(g));
      }
    }
    fitting.push_back("-1 (per channel)");
    std::string widths;
    for (const PartialGroupLinear& p : experts) {
      absl::StrAppend(&widths, widths.empty() ? "" : ", ", p.module, " has ", p.in_features);
    }
    std::string use = fitting.back();
    if (fitting.size() > 1) {
      use = absl::StrCat(absl::StrJoin(fitting.begin(), fitting.end() - 1, ", "), " or ", use);
    }
    Add("request.group_size",
        absl::StrCat("group_size = ", group, ": the routed experts' ", widths,
                     " input columns, not a multiple of ", group,
                     " (a short last group, which vLLM and transformers cannot run; a layer's "
                     "experts share one scheme, so they cannot be left unquantized): use "
                     "group_size ",
                     use));
  }

  bool LoadConfig() {
    const absl::StatusOr<std::string> checked = PathOf(kConfigFile);
    if (!checked.ok()) {
      Add(std::string(kConfigFile), std::string(checked.status().message()));
      return false;
    }
    const std::string& path = *checked;
    absl::StatusOr<std::string> text = ReadFileToString(path, kMaxConfigBytes);
    if (!text.ok()) {
      Add(std::string(kConfigFile), absl::IsNotFound(text.status())
                                        ? "missing file: config.json is not in the model directory"
                                        : StripPath(text.status(), path));
      return false;
    }
    ConfigParseResult parsed = ParseDeepseekV3Config(*text);
    for (std::string& p : parsed.problems) Add(std::string(kConfigFile), std::move(p));
    if (parsed.config.compressed_tensors) {
      Add(std::string(kConfigFile),
          "quantization_config is compressed-tensors (pack-quantized): the checkpoint is already "
          "quantized; quantize the original (FP8 or BF16) checkpoint");
    }
    config_ = std::move(parsed.config);
    ModelSummary& s = report_.summary;
    s.model_type = config_.model_type;
    s.architecture = config_.architectures.empty() ? "" : config_.architectures.front();
    s.num_hidden_layers = config_.num_hidden_layers;
    s.first_k_dense_replace = config_.first_k_dense_replace;
    s.num_nextn_predict_layers = config_.num_nextn_predict_layers;
    s.hidden_size = config_.hidden_size;
    s.intermediate_size = config_.intermediate_size;
    s.moe_intermediate_size = config_.moe_intermediate_size;
    s.n_routed_experts = config_.n_routed_experts;
    s.n_shared_experts = config_.n_shared_experts;
    s.num_experts_per_tok = config_.num_experts_per_tok;
    s.n_group = config_.n_group;
    s.topk_group = config_.topk_group;
    s.num_attention_heads = config_.num_attention_heads;
    s.q_lora_rank = config_.q_lora_rank;
    s.kv_lora_rank = config_.kv_lora_rank;
    s.qk_nope_head_dim = config_.qk_nope_head_dim;
    s.qk_rope_head_dim = config_.qk_rope_head_dim;
    s.v_head_dim = config_.v_head_dim;
    s.vocab_size = config_.vocab_size;
    return parsed.problems.empty() && !config_.compressed_tensors;
  }

  void LoadIndex() {
    const std::string where(kIndexFile);
    const absl::StatusOr<std::string> checked = PathOf(kIndexFile);
    if (!checked.ok()) {
      Add(where, std::string(checked.status().message()));
      return;
    }
    const std::string& index_path = *checked;
    absl::StatusOr<std::string> text = ReadFileToString(index_path, kMaxIndexBytes);
    if (!text.ok() && absl::IsNotFound(text.status())) {
      std::error_code ec;
      if (std::filesystem::exists(dir_ / kSingleShard, ec)) {
        single_shard_ = true;  // weight_map is filled from the header in LoadShards
        return;
      }
      Add(where, absl::StrCat("missing file: neither ", kIndexFile, " nor ", kSingleShard,
                              " is in the model directory"));
      return;
    }
    if (!text.ok()) {
      Add(where, StripPath(text.status(), index_path));
      return;
    }
    absl::StatusOr<Json> index = ParseJsonStrict(*text);
    if (!index.ok()) {
      Add(where, std::string(index.status().message()));
      return;
    }
    if (!index->is_object()) {
      Add(where, absl::StrCat("must be a JSON object, found ", JsonTypeName(*index)));
      return;
    }
    if (auto it = index->find("metadata");
        it != index->end() && !it->is_object() && !it->is_null()) {
      Add(where, absl::StrCat("\"metadata\" = ", JsonForMessage(*it), ": must be an object, found ",
                              JsonTypeName(*it)));
    }
    auto map_it = index->find("weight_map");
    if (map_it == index->end()) {
      Add(where,
          "\"weight_map\" is missing (required: an object mapping tensor names to shard "
          "file names)");
      return;
    }
    if (!map_it->is_object()) {
      Add(where, absl::StrCat("\"weight_map\" must be an object mapping tensor names to shard "
                              "file names, found ",
                              JsonTypeName(*map_it)));
      return;
    }
    if (map_it->empty()) Add(where, "\"weight_map\" is empty: it must list every tensor");
    std::map<std::string, int64_t> bad_shards;  // name -> tensors mapped to it
    for (const auto& [name, shard] : map_it->items()) {
      if (!shard.is_string()) {
        Add(where,
            absl::StrCat("\"weight_map\".", Quote(name), " = ", JsonForMessage(shard),
                         ": must be a shard file name (string), found ", JsonTypeName(shard)));
        unavailable_.insert(name);
        continue;
      }
      std::string shard_name = shard.get<std::string>();
      if (!IsPlainFileName(shard_name)) {
        ++bad_shards[shard_name];
        unavailable_.insert(name);
        continue;
      }
      weight_map_.emplace(name, std::move(shard_name));
    }
    for (const auto& [shard, count] : bad_shards) {
      Add(where, absl::StrCat("\"weight_map\" maps ", count, " tensors to shard ", Quote(shard),
                              ": shard names must be plain file names in the model directory"));
    }
  }

  void LoadShards() {
    std::map<std::string, int64_t> mapped;  // shard -> tensors the index maps to it
    if (single_shard_) {
      mapped[std::string(kSingleShard)] = 0;
    } else {
      for (const auto& [name, shard] : weight_map_) ++mapped[shard];
    }
    report_.summary.num_shards = static_cast<int>(mapped.size());
    for (const auto& [shard, count] : mapped) {
      const absl::StatusOr<std::string> checked = PathOf(shard);
      if (!checked.ok()) {
        Add(shard, std::string(checked.status().message()));
        broken_shards_.insert(shard);
        continue;
      }
      const std::string& path = *checked;
      absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeader(path);
      if (!header.ok()) {
        const std::string lost =
            single_shard_ ? std::string()
                          : absl::StrCat("; ", count, " tensors mapped to it are unavailable");
        Add(shard,
            absl::IsNotFound(header.status())
                ? absl::StrCat("missing shard: file not found", lost)
                : absl::StrCat("unreadable shard: ", StripPath(header.status(), path), lost));
        broken_shards_.insert(shard);
        continue;
      }
      ModelSummary& s = report_.summary;
      for (const TensorInfo& t : header->tensors) {
        ++s.num_tensors;
        s.num_parameters += t.num_elements();
        s.checkpoint_bytes += static_cast<int64_t>(t.num_bytes());
        if (single_shard_) weight_map_.emplace(t.name, shard);
      }
      headers_.emplace(shard, *std::move(header));
    }
  }

  void CrossCheckIndexAndShards() {
    for (const auto& [name, shard] : weight_map_) {
      if (broken_shards_.count(shard) != 0) {
        unavailable_.insert(name);
        continue;
      }
      const TensorInfo* info = headers_.at(shard).Find(name);
      if (info == nullptr) {
        Add(name, absl::StrCat("missing tensor: ", kIndexFile, " maps it to ", shard,
                               ", which does not contain it"));
        reported_.insert(name);
        continue;
      }
      available_.emplace(name, Located{shard, info});
      if (info->dtype == DType::kF8E4M3) report_.summary.weight_format = "fp8";
    }
    if (report_.summary.weight_format.empty()) report_.summary.weight_format = "bf16";
    for (const auto& [shard, header] : headers_) {
      for (const TensorInfo& t : header.tensors) {
        auto it = weight_map_.find(t.name);
        if (it == weight_map_.end()) {
          unindexed_.emplace(t.name, shard);
        } else if (it->second != shard) {
          Add(t.name, absl::StrCat("tensor not in index: present in shard ", shard, " but ",
                                   kIndexFile, " maps it to ", it->second));
        }
      }
    }
  }

  // True when some indexed tensor (available or not) has a name starting with `prefix`.
  bool AnyTensorWithPrefix(const std::string& prefix) const {
    auto it = weight_map_.lower_bound(prefix);
    if (it != weight_map_.end() && absl::StartsWith(it->first, prefix)) return true;
    for (const std::string& name : unavailable_) {
      if (absl::StartsWith(name, prefix)) return true;
    }
    return false;
  }

  // A missing tensor: mentions the shard when the tensor is there but not in the index.
  void ReportMissing(const std::string& name, std::string expectation) {
    std::string message = absl::StrCat("missing tensor: ", expectation);
    if (auto it = unindexed_.find(name); it != unindexed_.end()) {
      absl::StrAppend(&message, "; present in shard ", it->second, " but not listed in ",
                      kIndexFile);
      unindexed_.erase(it);
    }
    Add(name, std::move(message));
  }

  void CheckInventory() {
    std::set<int> absent_mtp;
    for (int k = 0; k < config_.num_nextn_predict_layers; ++k) {
      const int layer = config_.num_hidden_layers + k;
      const std::string prefix = absl::StrCat("model.layers.", layer, ".");
      if (AnyTensorWithPrefix(prefix)) {
        ++report_.summary.num_mtp_layers_present;
        continue;
      }
      absent_mtp.insert(layer);
      if (request_.include_mtp) {
        Add(absl::StrCat("model.layers.", layer),
            absl::StrCat("missing MTP layer: request.include_mtp is set but the checkpoint has "
                         "no \"",
                         prefix, "*\" tensors (config.json \"num_nextn_predict_layers\" = ",
                         config_.num_nextn_predict_layers, ")"));
      }
    }
    std::set<std::string> expected;
    for (const ExpectedTensor& t : ExpectedInventory(config_, config_.num_nextn_predict_layers)) {
      if (absent_mtp.count(t.layer) != 0) continue;
      expected.insert(t.name);
      if (unavailable_.count(t.name) != 0 || reported_.count(t.name) != 0) continue;
      auto it = available_.find(t.name);
      if (it == available_.end()) {
        ReportMissing(t.name, absl::StrCat("expected shape ", ShapeToString(t.shape)));
        continue;
      }
      const TensorInfo& info = *it->second.info;
      if (info.shape != t.shape) {
        Add(t.name, absl::StrCat("shape ", ShapeToString(info.shape), ": expected ",
                                 ShapeToString(t.shape)));
      }
      CheckDType(t, info, expected);
    }
    for (const auto& [name, located] : available_) {
      if (expected.count(name) != 0) continue;
      constexpr absl::string_view kSuffix = "_scale_inv";
      if (absl::EndsWith(name, kSuffix)) {
        const std::string weight = name.substr(0, name.size() - kSuffix.size());
        auto w = available_.find(weight);
        if (expected.count(weight) != 0 && w != available_.end()) {
          Add(name,
              absl::StrCat("unexpected tensor: weight_scale_inv for ", Quote(weight), ", which is ",
                           std::string(DTypeName(w->second.info->dtype)), ", not F8_E4M3"));
          continue;
        }
      }
      Add(name, absl::StrCat("unexpected tensor: not part of the DeepseekV3 inventory for this "
                             "config.json (in shard ",
                             located.shard, ")"));
    }
  }

  // Checks the dtype of an available expected tensor and, for FP8 linears, its scale. Adds the
  // scale name to `expected` when it belongs to the weight.
  void CheckDType(const ExpectedTensor& t, const TensorInfo& info,
                  std::set<std::string>& expected) {
    constexpr char kWideFloats[] = "F16, BF16, F32 or F64";
    const std::string dtype(DTypeName(info.dtype));
    if (t.role != TensorRole::kLinear) {
      if (!IsWideFloat(info.dtype)) {
        Add(t.name,
            absl::StrCat(
                "dtype ", dtype, ": expected ", kWideFloats,
                t.role == TensorRole::kRouter ? " (the router weight must never be FP8)" : ""));
      }
      return;
    }
    if (IsWideFloat(info.dtype)) return;
    if (info.dtype != DType::kF8E4M3) {
      Add(t.name, absl::StrCat("dtype ", dtype, ": expected F8_E4M3 (with weight_scale_inv) or ",
                               kWideFloats));
      return;
    }
    const std::string scale = ScaleInvName(t.name);
    expected.insert(scale);
    if (unavailable_.count(scale) != 0 || reported_.count(scale) != 0) return;
    const std::vector<int64_t> scale_shape = ScaleInvShape(info.shape);
    auto it = available_.find(scale);
    if (it == available_.end()) {
      ReportMissing(scale, absl::StrCat("F8_E4M3 weight ", Quote(t.name),
                                        " needs an F32 weight_scale_inv of shape ",
                                        ShapeToString(scale_shape)));
      return;
    }
    const TensorInfo& s = *it->second.info;
    if (s.dtype != DType::kF32) {
      Add(scale, absl::StrCat("dtype ", std::string(DTypeName(s.dtype)),
                              ": expected F32 for the weight_scale_inv of F8_E4M3 weight ",
                              Quote(t.name)));
    }
    if (s.shape != scale_shape) {
      Add(scale,
          absl::StrCat("shape ", ShapeToString(s.shape), ": expected ", ShapeToString(scale_shape),
                       " = ceil(", ShapeToString(info.shape),
                       " / 128) for the weight_scale_inv of F8_E4M3 weight ", Quote(t.name)));
    }
  }

  void ReportUnindexed() {
    for (const auto& [name, shard] : unindexed_) {
      Add(name, absl::StrCat("tensor not in index: present in shard ", shard, " but ", kIndexFile,
                             " does not list it"));
    }
  }

  void Plan() {
    StoredTensors stored;
    for (const auto& [name, located] : available_) {
      stored.emplace(
          name, StoredTensor{located.info->dtype, static_cast<int64_t>(located.info->num_bytes())});
    }
    JobPlan plan = PlanJob(config_, request_, stored);
    for (const PartialGroupLinear& p :
         PartialGroupLinears(config_, request_.group_size, request_.all_linear)) {
      if (p.routed_expert) continue;
      report_.notes.push_back(Problem{
          absl::StrCat("model.layers.*.", p.module),
          absl::StrCat("left unquantized (BF16, in quantization_config.ignore): ", p.in_features,
                       " input columns are not a multiple of group_size ", request_.group_size)});
    }
    for (Problem& note : plan.notes) report_.notes.push_back(std::move(note));
    report_.layers = std::move(plan.layers);
    report_.ranks = std::move(plan.ranks);
    report_.estimate = plan.estimate;
  }

  const InspectRequest& request_;
  const std::filesystem::path dir_;
  InspectReport report_;
  DeepseekV3Config config_;
  bool single_shard_ = false;
  std::map<std::string, std::string> weight_map_;     // tensor -> shard (valid names)
  std::map<std::string, SafetensorsHeader> headers_;  // readable shards
  std::set<std::string> broken_shards_;               // missing or unreadable
  std::map<std::string, Located> available_;          // indexed and present
  std::set<std::string> unavailable_;                 // in a broken shard or bad entry
  std::set<std::string> reported_;                    // already reported as missing
  std::map<std::string, std::string> unindexed_;      // in a shard, not in the index
};

}  // namespace

InspectReport InspectCheckpoint(const InspectRequest& request) { return Inspector(request).Run(); }

}  // namespace mq::model
