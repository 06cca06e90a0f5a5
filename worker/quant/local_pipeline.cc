#include "worker/quant/local_pipeline.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/path_policy.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"
#include "worker/model/deepseek_v3.h"
#include "worker/model/fp8.h"
#include "worker/model/safetensors_writer.h"
#include "worker/model/tensor_io.h"
#include "worker/quant/hessian.h"
#include "worker/quant/layer_tools.h"
#include "worker/quant/pack.h"
#include "worker/quant/rtn.h"

namespace mq::quant {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// Splits `groups` into Hessian passes: the first holds every non-expert group; routed experts
// are spread so that each pass holds at most `experts_per_pass` experts (0 = all in one pass).
std::vector<std::vector<HessianGroup>> SplitPasses(const std::vector<HessianGroup>& groups,
                                                   int64_t experts_per_pass) {
  std::vector<std::vector<HessianGroup>> passes(1);
  std::set<std::string> experts_in_pass;
  for (const HessianGroup& g : groups) {
    const std::string& m = g.members[0];
    const size_t at = m.find(".mlp.experts.");
    if (at == std::string::npos || experts_per_pass <= 0) {
      passes.front().push_back(g);
      continue;
    }
    const std::string expert = m.substr(0, m.find('.', at + 13));
    if (!experts_in_pass.count(expert) &&
        static_cast<int64_t>(experts_in_pass.size()) >= experts_per_pass) {
      passes.emplace_back();
      experts_in_pass.clear();
    }
    experts_in_pass.insert(expert);
    passes.back().push_back(g);
  }
  return passes;
}

// Runs every chunk through the layer (with hooks) and returns the outputs.
absl::StatusOr<std::vector<at::Tensor>> RunChunks(const model::LayerWeights& w,
                                                  const std::vector<at::Tensor>& hidden,
                                                  const at::Tensor& positions,
                                                  const model::ForwardHooks& hooks) {
  std::vector<at::Tensor> out;
  out.reserve(hidden.size());
  for (const at::Tensor& h : hidden) {
    absl::StatusOr<at::Tensor> next = model::RunLayer(w, h, positions, hooks);
    if (!next.ok()) return next.status();
    out.push_back(*std::move(next));
  }
  return out;
}

}  // namespace

absl::StatusOr<QuantMethod> ParseQuantMethod(const std::string& name) {
  if (name == "gptq") return QuantMethod::kGptq;
  if (name == "rtn") return QuantMethod::kRtn;
  if (name == "awq") return QuantMethod::kAwq;
  if (name == "awq-gptq") return QuantMethod::kAwqGptq;
  return absl::InvalidArgumentError(
      absl::StrCat("method \"", name, "\": must be gptq, rtn, awq or awq-gptq"));
}

absl::StatusOr<LocalQuantizeReport> QuantizeLocal(const LocalQuantizeOptions& options) {
  const Clock::time_point start = Clock::now();
  if (!options.input_ids.defined() || options.input_ids.dim() != 2 ||
      options.input_ids.scalar_type() != at::kLong || options.input_ids.size(0) == 0 ||
      options.input_ids.size(1) < 2) {
    return absl::InvalidArgumentError("input_ids: must be int64 [n, seq] with n >= 1, seq >= 2");
  }
  if (options.dtype != at::kFloat && options.dtype != at::kBFloat16) {
    return absl::InvalidArgumentError("dtype: must be float32 or bfloat16");
  }
  if (UsesAwq(options.method)) {
    return absl::InvalidArgumentError(
        "method: the local pipeline runs gptq or rtn; AWQ runs in the gang pipeline (mq-worker)");
  }
  if (options.batch_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size = ", options.batch_size, ": must be > 0"));
  }
  if (options.experts_per_pass < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("experts_per_pass = ", options.experts_per_pass, ": must be >= 0 (0 = all)"));
  }
  absl::Status s = ValidateCompressedTensorsOptions(options.format);
  if (!s.ok()) return s;
  GptqOptions gptq = options.gptq;
  gptq.grid.group_size = options.format.group_size;
  gptq.grid.bits = 4;
  gptq.grid.symmetric = true;
  s = ValidateGptqOptions(gptq);
  if (!s.ok()) return s;

  absl::StatusOr<std::string> checked_config = ModelDirFile(options.model_dir, "config.json");
  if (!checked_config.ok()) return checked_config.status();
  const std::string& config_path = *checked_config;
  absl::StatusOr<model::DeepseekV3Config> config = model::LoadDeepseekV3Config(config_path);
  if (!config.ok()) return config.status();
  if (config->compressed_tensors) {
    return absl::FailedPreconditionError(
        "config.json: quantization_config is compressed-tensors (pack-quantized): the checkpoint "
        "is already quantized; quantize the original (FP8 or BF16) checkpoint");
  }
  absl::StatusOr<std::string> config_text = ReadFile(config_path);
  if (!config_text.ok()) return config_text.status();
  nlohmann::json raw_config = nlohmann::json::parse(*config_text, nullptr, false);
  if (raw_config.is_discarded() || !raw_config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a JSON object"));
  }
  s = CheckSelectionConsistent(*config, options.format);
  if (!s.ok()) return s;
  const bool quantize_mtp =
      options.format.mtp == MtpMode::kQuantize && config->num_nextn_predict_layers > 0;
  if (quantize_mtp && config->num_nextn_predict_layers > 1) {
    return absl::UnimplementedError(
        "mtp = quantize with num_nextn_predict_layers > 1: only one MTP layer is supported");
  }

  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> opened =
      model::CheckpointReader::Open(options.model_dir);
  if (!opened.ok()) return opened.status();
  model::CheckpointReader& reader = **opened;
  s = MakeDirs(options.output_dir);
  if (!s.ok()) return s;

  // Names by layer (-1 = globals and anything else).
  std::map<int, std::vector<std::string>> names_by_layer;
  for (const std::string& n : reader.names()) {
    if (EndsWith(n, model::kScaleInvSuffix)) continue;
    names_by_layer[LayerOfName(n)].push_back(n);
  }
  std::vector<int> layers_in_checkpoint;
  for (const auto& [layer, names] : names_by_layer) {
    if (layer >= 0) layers_in_checkpoint.push_back(layer);
  }
  const int num_shards = static_cast<int>(layers_in_checkpoint.size()) + 1;
  auto shard_name = [num_shards](int index) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "model-%05d-of-%05d.safetensors", index + 1, num_shards);
    return std::string(buf);
  };
  std::map<std::string, std::string> weight_map;
  int64_t total_size = 0;
  auto write_shard = [&](int index, std::vector<model::TensorData> tensors) -> absl::Status {
    const std::string file = shard_name(index);
    for (const model::TensorData& t : tensors) {
      weight_map[t.name] = file;
      total_size += static_cast<int64_t>(t.bytes.size());
    }
    return model::WriteSafetensors(options.output_dir + "/" + file, std::move(tensors));
  };

  absl::StatusOr<model::GlobalWeights> globals =
      model::LoadGlobals(reader, *config, options.device, options.dtype);
  if (!globals.ok()) return globals.status();
  std::vector<at::Tensor> ids;
  std::vector<at::Tensor> hidden;
  const at::Tensor all_ids = options.input_ids.to(options.device);
  for (int64_t b = 0; b < all_ids.size(0); b += options.batch_size) {
    ids.push_back(all_ids.slice(0, b, std::min(b + options.batch_size, all_ids.size(0))));
    absl::StatusOr<at::Tensor> e = model::Embed(*globals, ids.back());
    if (!e.ok()) return e.status();
    hidden.push_back(*std::move(e));
  }
  const int64_t seq = all_ids.size(1);
  at::Tensor positions =
      at::arange(seq, at::TensorOptions().dtype(at::kLong).device(options.device));

  LocalQuantizeReport report;
  report.calibration_tokens = all_ids.numel();
  const int run_layers =
      config->num_hidden_layers + (quantize_mtp ? config->num_nextn_predict_layers : 0);

  for (size_t shard = 0; shard < layers_in_checkpoint.size(); ++shard) {
    const int layer = layers_in_checkpoint[shard];
    std::vector<model::TensorData> tensors;
    std::set<std::string> quantized_set;
    if (layer < run_layers) {
      at::Tensor layer_positions = positions;
      if (layer >= config->num_hidden_layers) {  // MTP: its own inputs, one token shorter
        absl::StatusOr<std::vector<at::Tensor>> mtp =
            MtpInputs(reader, *config, *globals, layer, ids, hidden);
        if (!mtp.ok()) return mtp.status();
        hidden = *std::move(mtp);
        layer_positions = positions.slice(0, 0, seq - 1);
      }
      absl::StatusOr<model::LayerWeights> weights =
          model::LoadLayer(reader, *config, layer, options.device, options.dtype);
      if (!weights.ok()) return weights.status();
      const std::vector<std::string> quantized = QuantizedLinears(*config, layer, options.format);
      quantized_set.insert(quantized.begin(), quantized.end());
      const std::vector<HessianGroup> groups = GroupLinears(quantized);
      if (groups.empty()) {
        absl::StatusOr<std::vector<at::Tensor>> next =
            RunChunks(*weights, hidden, layer_positions, {});
        if (!next.ok()) return next.status();
        hidden = *std::move(next);
      } else {
        // Hessian passes (several when experts_per_pass bounds the Hessians held at once; every
        // pass runs the original weights, so the Hessians do not depend on the split), each
        // followed by quantizing its linears.
        model::WeightOverrides overrides;
        for (const std::vector<HessianGroup>& pass :
             SplitPasses(groups, options.experts_per_pass)) {
          std::map<std::string, std::unique_ptr<HessianAccumulator>> acc;
          for (const HessianGroup& g : pass) acc[g.members[0]] = nullptr;
          absl::Status hook_status;
          model::ForwardHooks hooks;
          hooks.on_linear_input = [&](const std::string& linear, const at::Tensor& x) {
            auto it = acc.find(linear);
            if (it == acc.end() || !hook_status.ok()) return;
            if (!it->second) {
              it->second = std::make_unique<HessianAccumulator>(x.size(1), options.device);
            }
            absl::Status a = it->second->Add(x);
            if (!a.ok()) hook_status = a;
          };
          absl::StatusOr<std::vector<at::Tensor>> unused =
              RunChunks(*weights, hidden, layer_positions, hooks);
          if (!unused.ok()) return unused.status();
          if (!hook_status.ok()) return hook_status;
          unused->clear();

          // Quantize.
          for (const HessianGroup& g : pass) {
            const Clock::time_point t0 = Clock::now();
            std::vector<at::Tensor> ws;
            for (const std::string& m : g.members) {
              at::Tensor w = WeightOf(*weights, m);
              if (!w.defined()) return absl::InternalError(absl::StrCat("no weight for ", m));
              ws.push_back(w);
            }
            const HessianAccumulator* a = acc[g.members[0]].get();
            const int64_t tokens = a ? a->tokens() : 0;
            at::Tensor h;
            if (tokens > 0) {
              absl::StatusOr<at::Tensor> fin = a->Finalize();
              if (!fin.ok()) return fin.status();
              h = *std::move(fin);
            }
            std::vector<GptqResult> results;
            if (options.method == QuantMethod::kGptq && tokens > 0) {
              absl::StatusOr<std::vector<GptqResult>> r = QuantizeGptqShared(ws, h, gptq);
              if (!r.ok()) return r.status();
              results = *std::move(r);
            } else {
              for (const at::Tensor& w : ws) {
                absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w, gptq.grid);
                if (!q.ok()) return q.status();
                GptqResult r;
                r.weight = *std::move(q);
                if (options.method == QuantMethod::kGptq) {
                  r.fallback = Fallback::kRtn;
                  r.fallback_reason = "no calibration tokens reached this linear";
                } else {
                  r.fallback = Fallback::kNone;
                }
                results.push_back(std::move(r));
              }
            }
            const double seconds = Seconds(t0) / static_cast<double>(g.members.size());
            for (size_t i = 0; i < g.members.size(); ++i) {
              const std::string& m = g.members[i];
              GptqResult& r = results[i];
              LinearReport lr;
              lr.name = m;
              lr.tokens = tokens;
              lr.method = options.method == QuantMethod::kGptq ? "gptq" : "rtn";
              lr.fallback = FallbackName(r.fallback);
              lr.fallback_reason = r.fallback_reason;
              lr.damping = r.damping;
              lr.rel_damp = r.rel_damp;
              lr.relative_output_error = std::numeric_limits<double>::quiet_NaN();
              if (tokens > 0) {
                absl::StatusOr<double> err = RelativeHessianError(ws[i], r.weight.dequantized, h);
                if (!err.ok()) return err.status();
                lr.relative_output_error = *err;
              }
              lr.seconds = seconds;
              report.linears.push_back(std::move(lr));
              absl::StatusOr<PackedWeight> packed = PackWeight(r.weight);
              if (!packed.ok()) return packed.status();
              tensors.push_back(model::ToTensorData(m + ".weight_packed", packed->weight_packed));
              tensors.push_back(model::ToTensorData(m + ".weight_scale", packed->weight_scale));
              tensors.push_back(model::ToTensorData(m + ".weight_shape", packed->weight_shape));
              overrides[m] = r.weight.dequantized.to(options.dtype);
            }
          }
          acc.clear();
          acc.clear();
        }
        // Pass 2: quantized propagation.
        model::ForwardHooks qhooks;
        qhooks.weight_overrides = &overrides;
        absl::StatusOr<std::vector<at::Tensor>> next =
            RunChunks(*weights, hidden, layer_positions, qhooks);
        if (!next.ok()) return next.status();
        hidden = *std::move(next);
      }
    }
    for (const std::string& n : names_by_layer[layer]) {
      if (EndsWith(n, ".weight") && quantized_set.count(n.substr(0, n.size() - 7))) continue;
      absl::StatusOr<model::TensorData> d = PlainTensor(reader, n);
      if (!d.ok()) return d.status();
      tensors.push_back(*std::move(d));
    }
    s = write_shard(static_cast<int>(shard), std::move(tensors));
    if (!s.ok()) return s;
  }
  {
    std::vector<model::TensorData> tensors;
    for (const std::string& n : names_by_layer[-1]) {
      absl::StatusOr<model::TensorData> d = PlainTensor(reader, n);
      if (!d.ok()) return d.status();
      tensors.push_back(*std::move(d));
    }
    s = write_shard(num_shards - 1, std::move(tensors));
    if (!s.ok()) return s;
  }
  s = model::WriteShardedIndex(options.output_dir + "/model.safetensors.index.json", total_size,
                               weight_map);
  if (!s.ok()) return s;
  for (const char* f :
       {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
        "tiktoken.model", "tokenization_kimi.py", "generation_config.json", "chat_template.jinja",
        "configuration_deepseek.py", "modeling_deepseek.py"}) {
    absl::StatusOr<std::string> path = ModelDirFile(options.model_dir, f);
    if (!path.ok()) return path.status();
    absl::StatusOr<std::string> text = ReadFile(*path);
    if (!text.ok()) continue;
    s = model::WriteFileAtomic(options.output_dir + "/" + f, *text);
    if (!s.ok()) return s;
  }
  report.seconds = Seconds(start);
  if (!options.report_path.empty()) {
    s = model::WriteFileAtomic(options.report_path, ReportJson(report));
    if (!s.ok()) return s;
  }
  raw_config["quantization_config"] = QuantizationConfigJson(options.format, *config);
  // As in the gang pipeline's output: kimi_k2 is written as deepseek_v3 (transformers knows it).
  if (raw_config.value("model_type", "") == "kimi_k2") raw_config["model_type"] = "deepseek_v3";
  if (raw_config.contains("dtype")) raw_config["dtype"] = "bfloat16";
  raw_config["torch_dtype"] = "bfloat16";
  s = model::WriteFileAtomic(options.output_dir + "/config.json", raw_config.dump(2) + "\n");
  if (!s.ok()) return s;
  return report;
}

std::string ReportJson(const LocalQuantizeReport& report) {
  nlohmann::json linears = nlohmann::json::array();
  double sum_err = 0;
  int64_t n_err = 0;
  int64_t fallbacks = 0;
  for (const LinearReport& l : report.linears) {
    nlohmann::json j = {{"name", l.name},         {"tokens", l.tokens},   {"method", l.method},
                        {"fallback", l.fallback}, {"damping", l.damping}, {"rel_damp", l.rel_damp},
                        {"seconds", l.seconds}};
    j["fallback_reason"] =
        l.fallback_reason.empty() ? nlohmann::json(nullptr) : nlohmann::json(l.fallback_reason);
    j["relative_output_error"] = std::isfinite(l.relative_output_error)
                                     ? nlohmann::json(l.relative_output_error)
                                     : nlohmann::json(nullptr);
    if (std::isfinite(l.relative_output_error)) {
      sum_err += l.relative_output_error;
      ++n_err;
    }
    if (l.fallback != "none") ++fallbacks;
    linears.push_back(std::move(j));
  }
  nlohmann::json out = {
      {"calibration_tokens", report.calibration_tokens},
      {"seconds", report.seconds},
      {"quantized_linears", report.linears.size()},
      {"fallbacks", fallbacks},
      {"mean_relative_output_error",
       n_err > 0 ? nlohmann::json(sum_err / static_cast<double>(n_err)) : nlohmann::json(nullptr)},
      {"linears", linears},
  };
  return out.dump(2) + "\n";
}

}  // namespace mq::quant
