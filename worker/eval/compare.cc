#include "worker/eval/compare.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/model/deepseek_v3.h"

namespace mq::eval {
namespace {

using model::CheckpointReader;
using model::DeepseekV3Config;

// `status` with its message prefixed by `who` ("reference" or "candidate").
absl::Status Named(const std::string& who, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(who, ": ", status.message()));
}

// Σ (c − r)² and Σ r² in float64.
struct SquaredSums {
  double diff = 0;
  double ref = 0;
  void Add(const at::Tensor& ref_t, const at::Tensor& cand_t) {
    const at::Tensor r = ref_t.to(at::kDouble);
    diff += (cand_t.to(at::kDouble) - r).pow(2).sum().item<double>();
    ref += r.pow(2).sum().item<double>();
  }
  double Relative() const { return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff); }
};

// One model's part of the comparison: its reader and config, and its hidden states per batch.
struct Side {
  std::string name;
  CheckpointReader* reader;
  const DeepseekV3Config* config;
  std::vector<at::Tensor> hidden;  // per batch [b, seq, H]
};

// The rows of an integer [n >= 1, seq >= 2] matrix of ids.
absl::StatusOr<std::vector<at::Tensor>> Rows(const at::Tensor& input_ids) {
  if (!input_ids.defined() || input_ids.dim() != 2 || input_ids.size(0) < 1 ||
      input_ids.size(1) < 2 || !at::isIntegralType(input_ids.scalar_type(), false)) {
    return absl::InvalidArgumentError(
        "input_ids: must be an integer tensor [n >= 1, seq >= 2] of token ids");
  }
  return input_ids.unbind(0);
}

std::string Text(bool v) { return v ? "true" : "false"; }
template <typename T>
std::string Text(const T& v) {
  return absl::StrCat(v);
}

}  // namespace

absl::Status CheckSameArchitecture(const DeepseekV3Config& a, const DeepseekV3Config& b) {
  std::optional<std::string> first;
  auto check = [&](const char* field, const auto& x, const auto& y) {
    if (!first && !(x == y)) {
      first = absl::StrCat(field, ": reference ", Text(x), ", candidate ", Text(y));
    }
  };
  check("vocab_size", a.vocab_size, b.vocab_size);
  check("hidden_size", a.hidden_size, b.hidden_size);
  check("intermediate_size", a.intermediate_size, b.intermediate_size);
  check("moe_intermediate_size", a.moe_intermediate_size, b.moe_intermediate_size);
  check("num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers);
  check("first_k_dense_replace", a.first_k_dense_replace, b.first_k_dense_replace);
  check("moe_layer_freq", a.moe_layer_freq, b.moe_layer_freq);
  check("n_routed_experts", a.n_routed_experts, b.n_routed_experts);
  check("n_shared_experts", a.n_shared_experts, b.n_shared_experts);
  check("num_experts_per_tok", a.num_experts_per_tok, b.num_experts_per_tok);
  check("n_group", a.n_group, b.n_group);
  check("topk_group", a.topk_group, b.topk_group);
  check("routed_scaling_factor", a.routed_scaling_factor, b.routed_scaling_factor);
  check("scoring_func", a.scoring_func, b.scoring_func);
  check("topk_method", a.topk_method, b.topk_method);
  check("norm_topk_prob", a.norm_topk_prob, b.norm_topk_prob);
  check("num_attention_heads", a.num_attention_heads, b.num_attention_heads);
  check("q_lora_rank", a.q_lora_rank, b.q_lora_rank);
  check("kv_lora_rank", a.kv_lora_rank, b.kv_lora_rank);
  check("qk_nope_head_dim", a.qk_nope_head_dim, b.qk_nope_head_dim);
  check("qk_rope_head_dim", a.qk_rope_head_dim, b.qk_rope_head_dim);
  check("v_head_dim", a.v_head_dim, b.v_head_dim);
  check("rms_norm_eps", a.rms_norm_eps, b.rms_norm_eps);
  check("rope_theta", a.rope_theta, b.rope_theta);
  check("tie_word_embeddings", a.tie_word_embeddings, b.tie_word_embeddings);
  check("rope_scaling", a.rope_scaling.has_value(), b.rope_scaling.has_value());
  if (a.rope_scaling && b.rope_scaling) {
    const model::RopeScalingConfig& x = *a.rope_scaling;
    const model::RopeScalingConfig& y = *b.rope_scaling;
    check("rope_scaling.factor", x.factor, y.factor);
    check("rope_scaling.original_max_position_embeddings", x.original_max_position_embeddings,
          y.original_max_position_embeddings);
    check("rope_scaling.beta_fast", x.beta_fast, y.beta_fast);
    check("rope_scaling.beta_slow", x.beta_slow, y.beta_slow);
    check("rope_scaling.mscale", x.mscale, y.mscale);
    check("rope_scaling.mscale_all_dim", x.mscale_all_dim, y.mscale_all_dim);
  }
  if (first) {
    return absl::InvalidArgumentError(
        absl::StrCat("the models must have the same architecture: ", *first));
  }
  return absl::OkStatus();
}

absl::StatusOr<QualityReport> CompareModels(CheckpointReader& reference,
                                            const DeepseekV3Config& reference_config,
                                            CheckpointReader& candidate,
                                            const DeepseekV3Config& candidate_config,
                                            const std::vector<at::Tensor>& sequences,
                                            const CompareOptions& options) {
  if (absl::Status s = CheckSameArchitecture(reference_config, candidate_config); !s.ok()) {
    return s;
  }
  if (options.batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch_size = ", options.batch_size, ": must be >= 1"));
  }
  if (sequences.empty()) return absl::InvalidArgumentError("sequences: none given");
  const int64_t vocab = reference_config.vocab_size;
  std::vector<at::Tensor> rows;  // on the CPU, int64
  for (size_t i = 0; i < sequences.size(); ++i) {
    const at::Tensor& t = sequences[i];
    if (!t.defined() || t.dim() != 1 || t.size(0) < 2 ||
        !at::isIntegralType(t.scalar_type(), false)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", i, ": must be an integer tensor [seq >= 2] of token ids"));
    }
    rows.push_back(t.to(at::kCPU, at::kLong).contiguous());
    if (rows.back().min().item<int64_t>() < 0 || rows.back().max().item<int64_t>() >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", i, ": token ids must be in [0, ", vocab, ") (vocab_size of config.json)"));
    }
  }
  // Batches of equal length, longest first (stable, so equal lengths keep their order).
  std::vector<size_t> order(rows.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return rows[a].size(0) > rows[b].size(0); });
  std::vector<at::Tensor> batches;    // ids per batch [b, seq], on the compute device
  std::vector<at::Tensor> positions;  // per batch [seq]
  for (size_t i = 0; i < order.size();) {
    const int64_t len = rows[order[i]].size(0);
    std::vector<at::Tensor> batch;
    while (i < order.size() && rows[order[i]].size(0) == len &&
           static_cast<int64_t>(batch.size()) < options.batch_size) {
      batch.push_back(rows[order[i++]]);
    }
    batches.push_back(at::stack(batch).to(options.device));
    positions.push_back(at::arange(len, at::TensorOptions(at::kLong).device(options.device)));
  }

  Side sides[2] = {{"reference", &reference, &reference_config, {}},
                   {"candidate", &candidate, &candidate_config, {}}};
  model::GlobalWeights globals[2];
  for (int m = 0; m < 2; ++m) {
    Side& side = sides[m];
    absl::StatusOr<model::GlobalWeights> g =
        model::LoadGlobals(*side.reader, *side.config, options.device, options.dtype);
    if (!g.ok()) return Named(side.name, g.status());
    globals[m] = *std::move(g);
    for (const at::Tensor& batch : batches) {
      absl::StatusOr<at::Tensor> h = model::Embed(globals[m], batch);
      if (!h.ok()) return Named(side.name, h.status());
      side.hidden.push_back(*std::move(h));
    }
  }

  QualityReport report;
  report.sequences = static_cast<int64_t>(rows.size());
  report.sequence_length = rows[order.front()].size(0);
  const int total = reference_config.num_hidden_layers;
  for (int layer = 0; layer < total; ++layer) {
    for (Side& side : sides) {  // one layer resident at a time
      absl::StatusOr<model::LayerWeights> weights =
          model::LoadLayer(*side.reader, *side.config, layer, options.device, options.dtype);
      if (!weights.ok()) return Named(side.name, weights.status());
      for (size_t b = 0; b < side.hidden.size(); ++b) {
        absl::StatusOr<at::Tensor> next = model::RunLayer(*weights, side.hidden[b], positions[b]);
        if (!next.ok()) return Named(side.name, next.status());
        side.hidden[b] = *std::move(next);
      }
    }
    SquaredSums sums;
    for (size_t b = 0; b < batches.size(); ++b) sums.Add(sides[0].hidden[b], sides[1].hidden[b]);
    report.layers.push_back({layer, sums.Relative()});
    if (options.on_layer) {
      if (absl::Status s = options.on_layer(layer + 1, total); !s.ok()) return s;
    }
  }

  NextTokenAccumulator acc;
  for (size_t b = 0; b < batches.size(); ++b) {
    at::Tensor logits[2];
    for (int m = 0; m < 2; ++m) {
      absl::StatusOr<at::Tensor> normed = model::FinalNorm(globals[m], sides[m].hidden[b]);
      if (!normed.ok()) return Named(sides[m].name, normed.status());
      absl::StatusOr<at::Tensor> l = model::LmHead(globals[m], *normed);
      if (!l.ok()) return Named(sides[m].name, l.status());
      logits[m] = *std::move(l);
      sides[m].hidden[b] = at::Tensor();  // no longer needed
    }
    if (absl::Status s = acc.Add(logits[0], logits[1], batches[b]); !s.ok()) return s;
  }
  absl::StatusOr<NextTokenQuality> q = acc.Finish();
  if (!q.ok()) return q.status();
  report.next_token = *q;
  return report;
}

absl::StatusOr<QualityReport> CompareModels(CheckpointReader& reference,
                                            const DeepseekV3Config& reference_config,
                                            CheckpointReader& candidate,
                                            const DeepseekV3Config& candidate_config,
                                            const at::Tensor& input_ids,
                                            const CompareOptions& options) {
  absl::StatusOr<std::vector<at::Tensor>> rows = Rows(input_ids);
  if (!rows.ok()) return rows.status();
  return CompareModels(reference, reference_config, candidate, candidate_config, *rows, options);
}

absl::StatusOr<QualityReport> CompareCheckpoints(const std::string& reference_dir,
                                                 const std::string& candidate_dir,
                                                 const std::vector<at::Tensor>& sequences,
                                                 const CompareOptions& options) {
  absl::StatusOr<DeepseekV3Config> ref_config =
      model::LoadDeepseekV3Config(reference_dir + "/config.json");
  if (!ref_config.ok()) return Named("reference", ref_config.status());
  absl::StatusOr<DeepseekV3Config> cand_config =
      model::LoadDeepseekV3Config(candidate_dir + "/config.json");
  if (!cand_config.ok()) return Named("candidate", cand_config.status());
  absl::StatusOr<std::unique_ptr<CheckpointReader>> ref = CheckpointReader::Open(reference_dir);
  if (!ref.ok()) return Named("reference", ref.status());
  absl::StatusOr<std::unique_ptr<CheckpointReader>> cand = CheckpointReader::Open(candidate_dir);
  if (!cand.ok()) return Named("candidate", cand.status());
  return CompareModels(**ref, *ref_config, **cand, *cand_config, sequences, options);
}

absl::StatusOr<QualityReport> CompareCheckpoints(const std::string& reference_dir,
                                                 const std::string& candidate_dir,
                                                 const at::Tensor& input_ids,
                                                 const CompareOptions& options) {
  absl::StatusOr<std::vector<at::Tensor>> rows = Rows(input_ids);
  if (!rows.ok()) return rows.status();
  return CompareCheckpoints(reference_dir, candidate_dir, *rows, options);
}

nlohmann::json QualityReportJson(const QualityReport& report) {
  const NextTokenQuality& q = report.next_token;
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerError& l : report.layers) {
    layers.push_back({{"layer", l.layer}, {"relative_error", l.relative_error}});
  }
  return {{"sequences", report.sequences},
          {"sequence_length", report.sequence_length},
          {"positions", q.positions},
          {"kl", {{"mean", q.kl_mean}, {"p99", q.kl_p99}, {"max", q.kl_max}}},
          {"top1_agreement", q.top1_agreement},
          {"nll", {{"reference", q.nll_reference}, {"candidate", q.nll_candidate}}},
          {"perplexity",
           {{"reference", q.perplexity_reference}, {"candidate", q.perplexity_candidate}}},
          {"layers", layers}};
}

}  // namespace mq::eval
