// Helpers shared by the quantization pipelines (single-process and gang): layer/tensor naming,
// unquantized tensors as written, weights by module name, Hessian sharing groups, MTP inputs.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: pure functions; the reader must not be used concurrently unless it allows it.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"
#include "worker/model/deepseek_v3.h"
#include "worker/model/safetensors_writer.h"

namespace mq::quant {

bool EndsWith(const std::string& s, const std::string& suffix);

// The whole file as a string; NOT_FOUND when it cannot be opened.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// mkdir -p without std::filesystem (the torch wheel's libtorch exports conflicting symbols).
absl::Status MakeDirs(const std::string& dir);

// An unquantized checkpoint tensor as written: F32 for e_score_correction_bias, BF16 for every
// other float tensor (FP8 dequantized), raw bytes otherwise.
absl::StatusOr<model::TensorData> PlainTensor(model::CheckpointReader& reader,
                                              const std::string& name);

// The loaded weight of module `name` (a LayerLinears name) of `w`; undefined when absent.
at::Tensor WeightOf(const model::LayerWeights& w, const std::string& name);
// The slot holding module `name`'s weight in `w` (a LayerLinears name, the router
// "...mlp.gate" or a norm such as "...post_attention_layernorm"), to replace it; nullptr when
// `w` has no such module.
at::Tensor* ModuleTensor(model::LayerWeights& w, const std::string& name);

// Linears reading the same input that share one Hessian (gate_proj + up_proj), else singletons.
struct HessianGroup {
  std::vector<std::string> members;
};
std::vector<HessianGroup> GroupLinears(const std::vector<std::string>& quantized);

// The decoder layer of a tensor name "model.layers.N....", or -1.
int LayerOfName(const std::string& name);

// MTP decoder input (FORMATS.md §3.6): eh_proj([enorm(embed(ids[:, 1:])); hnorm(h[:, :-1])])
// with h the main model's final (normed) hidden state, for each chunk of ids and hidden states.
absl::StatusOr<std::vector<at::Tensor>> MtpInputs(model::CheckpointReader& reader,
                                                  const model::DeepseekV3Config& config,
                                                  const model::GlobalWeights& globals, int layer,
                                                  const std::vector<at::Tensor>& ids,
                                                  const std::vector<at::Tensor>& hidden);

}  // namespace mq::quant
