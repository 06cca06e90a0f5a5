#include "worker/quant/layer_tools.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "worker/model/fp8.h"
#include "worker/model/tensor_io.h"

namespace mq::quant {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// mkdir -p without std::filesystem (the torch wheel's libtorch exports conflicting symbols).
absl::Status MakeDirs(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    const std::string part = dir.substr(0, pos);
    if (::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::InternalError(absl::StrCat("mkdir ", part, ": ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

// An unquantized checkpoint tensor as written: F32 for e_score_correction_bias, BF16 for every
// other float tensor (FP8 dequantized), raw bytes otherwise.
absl::StatusOr<model::TensorData> PlainTensor(model::CheckpointReader& reader,
                                              const std::string& name) {
  absl::StatusOr<model::TensorView> view = reader.Get(name);
  if (!view.ok()) return view.status();
  model::TensorData d;
  d.name = name;
  d.shape = view->shape;
  const model::DType dt = view->dtype;
  const bool is_float = dt == model::DType::kF32 || dt == model::DType::kBF16 ||
                        dt == model::DType::kF16 || dt == model::DType::kF8E4M3;
  if (EndsWith(name, "e_score_correction_bias") && is_float) {
    absl::StatusOr<at::Tensor> t = model::LoadTensor(reader, name, at::kCPU, at::kFloat);
    if (!t.ok()) return t.status();
    return model::ToTensorData(name, *t);
  }
  if (!is_float) {
    d.dtype = dt;
    d.bytes.assign(view->data, view->data + view->num_bytes);
    if (absl::Status s = model::CheckTensorRead(*view); !s.ok()) return s;
    return d;
  }
  absl::StatusOr<std::vector<uint16_t>> bf16 = model::LoadAsBf16(reader, name);
  if (!bf16.ok()) return bf16.status();
  d.dtype = model::DType::kBF16;
  d.bytes.resize(bf16->size() * 2);
  std::memcpy(d.bytes.data(), bf16->data(), d.bytes.size());
  return d;
}

// The loaded weight of module `name` (a LayerLinears name) of `w`.
at::Tensor* ModuleTensor(model::LayerWeights& w, const std::string& name) {
  if (name.rfind(w.prefix, 0) != 0) return nullptr;
  const std::string s = name.substr(w.prefix.size());
  auto mlp = [](model::MlpWeights& m, const std::string& proj) -> at::Tensor* {
    if (proj == "gate_proj") return &m.gate_proj;
    if (proj == "up_proj") return &m.up_proj;
    if (proj == "down_proj") return &m.down_proj;
    return nullptr;
  };
  const std::map<std::string, at::Tensor*> fixed = {
      {"input_layernorm", &w.input_layernorm},
      {"post_attention_layernorm", &w.post_attention_layernorm},
      {"self_attn.q_proj", &w.q_proj},
      {"self_attn.q_a_proj", &w.q_a_proj},
      {"self_attn.q_a_layernorm", &w.q_a_layernorm},
      {"self_attn.q_b_proj", &w.q_b_proj},
      {"self_attn.kv_a_proj_with_mqa", &w.kv_a_proj_with_mqa},
      {"self_attn.kv_a_layernorm", &w.kv_a_layernorm},
      {"self_attn.kv_b_proj", &w.kv_b_proj},
      {"self_attn.o_proj", &w.o_proj},
      {"mlp.gate", &w.gate}};
  if (auto it = fixed.find(s); it != fixed.end()) return it->second;
  const std::string shared = "mlp.shared_experts.";
  const std::string experts = "mlp.experts.";
  if (s.rfind(shared, 0) == 0) return mlp(w.shared_experts, s.substr(shared.size()));
  if (s.rfind(experts, 0) == 0) {
    const std::string rest = s.substr(experts.size());
    const size_t dot = rest.find('.');
    int e = 0;
    if (dot == std::string::npos || !absl::SimpleAtoi(rest.substr(0, dot), &e) || e < 0 ||
        e >= static_cast<int>(w.experts.size())) {
      return nullptr;
    }
    return mlp(w.experts[e], rest.substr(dot + 1));
  }
  if (s.rfind("mlp.", 0) == 0) return mlp(w.mlp, s.substr(4));
  return nullptr;
}

at::Tensor WeightOf(const model::LayerWeights& w, const std::string& name) {
  const at::Tensor* t = ModuleTensor(const_cast<model::LayerWeights&>(w), name);
  return t ? *t : at::Tensor();
}

std::vector<HessianGroup> GroupLinears(const std::vector<std::string>& quantized) {
  const std::set<std::string> set(quantized.begin(), quantized.end());
  std::vector<HessianGroup> groups;
  for (const std::string& m : quantized) {
    if (EndsWith(m, "up_proj")) {
      const std::string gate = m.substr(0, m.size() - 7) + "gate_proj";
      if (set.count(gate)) continue;  // joined gate_proj's group
    }
    HessianGroup g{{m}};
    if (EndsWith(m, "gate_proj")) {
      const std::string up = m.substr(0, m.size() - 9) + "up_proj";
      if (set.count(up)) g.members.push_back(up);
    }
    groups.push_back(std::move(g));
  }
  return groups;
}

int LayerOfName(const std::string& name) {
  const std::string p = "model.layers.";
  if (name.rfind(p, 0) != 0) return -1;
  const size_t dot = name.find('.', p.size());
  int layer = -1;
  if (dot == std::string::npos ||
      !absl::SimpleAtoi(name.substr(p.size(), dot - p.size()), &layer)) {
    return -1;
  }
  return layer;
}

// MTP decoder input (FORMATS.md §3.6): eh_proj([enorm(embed(ids[:, 1:])); hnorm(h[:, :-1])])
// with h the main model's final (normed) hidden state.
absl::StatusOr<std::vector<at::Tensor>> MtpInputs(model::CheckpointReader& reader,
                                                  const model::DeepseekV3Config& config,
                                                  const model::GlobalWeights& globals, int layer,
                                                  const std::vector<at::Tensor>& ids,
                                                  const std::vector<at::Tensor>& hidden) {
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  auto load = [&](const std::string& n) {
    return model::LoadTensor(reader, p + n, globals.device, globals.dtype);
  };
  absl::StatusOr<at::Tensor> enorm = load("enorm.weight");
  if (!enorm.ok()) return enorm.status();
  absl::StatusOr<at::Tensor> hnorm = load("hnorm.weight");
  if (!hnorm.ok()) return hnorm.status();
  absl::StatusOr<at::Tensor> eh_proj = load("eh_proj.weight");
  if (!eh_proj.ok()) return eh_proj.status();
  at::Tensor embed = globals.embed_tokens;
  if (reader.Has(p + "embed_tokens.weight")) {
    absl::StatusOr<at::Tensor> e = load("embed_tokens.weight");
    if (!e.ok()) return e.status();
    embed = *e;
  }
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < ids.size(); ++i) {
    absl::StatusOr<at::Tensor> h = model::FinalNorm(globals, hidden[i]);
    if (!h.ok()) return h.status();
    const int64_t seq = ids[i].size(1);
    at::Tensor e = at::embedding(embed, ids[i].slice(1, 1, seq));
    at::Tensor x = at::cat({model::RmsNorm(e, *enorm, config.rms_norm_eps),
                            model::RmsNorm(h->slice(1, 0, seq - 1), *hnorm, config.rms_norm_eps)},
                           -1);
    out.push_back(at::matmul(x, eh_proj->t()));
  }
  return out;
}

}  // namespace mq::quant
