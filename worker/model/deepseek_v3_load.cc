// Loading of DeepSeek-V3 weights into LibTorch tensors (see deepseek_v3.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/torch/fp8_ops.h"
#include "worker/model/deepseek_v3.h"
#include "worker/model/deepseek_v3_internal.h"
#include "worker/model/fp8.h"
#include "worker/model/packed_int4.h"
#include "worker/model/tensor_io.h"

namespace mq::model {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// The torch dtype a safetensors float dtype is read as; nullopt for anything that is not read
// directly (FP8 goes through LoadAsBf16).
std::optional<at::ScalarType> DirectTorchType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return at::kFloat;
    case DType::kBF16:
      return at::kBFloat16;
    case DType::kF16:
      return at::kHalf;
    case DType::kF64:
      return at::kDouble;
    default:
      return std::nullopt;
  }
}

absl::Status CheckComputeDtype(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype = ", c10::toString(dtype), ": must be float32 or bfloat16"));
  }
  return absl::OkStatus();
}

// Copies `bytes` bytes at `data` (host memory of any alignment, e.g. a mapped checkpoint) into a
// new uint8 tensor on CUDA `device`, through pinned staging buffers: the host copy into one
// buffer overlaps the transfer of the one before (torch's pinned allocator keeps a buffer until
// its transfer has finished). Returns after the last host copy; the transfers are enqueued on
// the current stream. When `data` is page-locked already (a staged copy), it is transferred
// directly, and the call returns once the transfer is done (the caller may then reuse the
// memory).
at::Tensor CopyToDevice(const uint8_t* data, uint64_t bytes, at::Device device, bool page_locked) {
  constexpr int64_t kStageBytes = int64_t{64} << 20;
  constexpr int64_t kGrainBytes = int64_t{4} << 20;
  const int64_t n = static_cast<int64_t>(bytes);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
  if (page_locked) {
    out.copy_(at::from_blob(const_cast<uint8_t*>(data), {n}, at::TensorOptions().dtype(at::kByte)));
    return out;
  }
  for (int64_t offset = 0; offset < n; offset += kStageBytes) {
    const int64_t len = std::min(kStageBytes, n - offset);
    at::Tensor staged = at::empty({len}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    uint8_t* dst = staged.data_ptr<uint8_t>();
    const uint8_t* src = data + offset;
    at::parallel_for(0, len, kGrainBytes, [&](int64_t begin, int64_t end) {
      std::memcpy(dst + begin, src + begin, static_cast<size_t>(end - begin));
    });
    out.slice(0, offset, offset + len).copy_(staged, /*non_blocking=*/true);
  }
  return out;
}

// FP8 weight `view` on CUDA `device`: the codes and their block scales are copied as they are
// and dequantized there (half the bytes of a bf16 transfer, no host dequantization), with the
// same bits as the CPU path.
absl::StatusOr<at::Tensor> LoadFp8OnDevice(CheckpointReader& reader, const TensorView& view,
                                           at::Device device, at::ScalarType dtype) {
  absl::StatusOr<TensorView> scale_view = Fp8ScaleView(reader, view.name);
  if (!scale_view.ok()) return scale_view.status();
  absl::StatusOr<std::vector<float>> scales = Fp8BlockScales(view, &*scale_view);
  if (!scales.ok()) return scales.status();
  const at::Tensor codes =
      CopyToDevice(view.data, view.num_bytes, device, view.page_locked).view(view.shape);
  const at::Tensor scale_inv = CopyToDevice(reinterpret_cast<const uint8_t*>(scales->data()),
                                            scales->size() * sizeof(float), device, false)
                                   .view(at::kFloat)
                                   .view(scale_view->shape);
  absl::StatusOr<at::Tensor> bf16 = kernels::Fp8BlockDequantCuda(codes, scale_inv);
  if (!bf16.ok()) return bf16.status();
  return bf16->to(dtype);
}

// A compressed-tensors pack-quantized linear `module` (module.weight_packed, weight_scale,
// weight_shape, optionally weight_zero_point): read as stored, dequantized on `device`
// (packed_int4.h) and converted to `dtype`.
absl::StatusOr<at::Tensor> LoadPackedLinear(CheckpointReader& reader, const std::string& module,
                                            at::Device device, at::ScalarType dtype,
                                            const std::vector<int64_t>* expected_shape) {
  if (reader.Has(module + ".weight_g_idx")) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", module,
                     ".weight_g_idx\": group act-order (actorder \"group\") "
                     "checkpoints are not supported"));
  }
  auto read = [&](const std::string& suffix) -> absl::StatusOr<at::Tensor> {
    absl::StatusOr<TensorView> view = reader.Get(module + suffix);
    if (!view.ok()) return view.status();
    return FromTensorView(*view);  // a CPU copy, read-checked
  };
  PackedInt4Linear linear;
  for (auto [suffix, out] : {std::pair{".weight_packed", &linear.weight_packed},
                             std::pair{".weight_scale", &linear.weight_scale},
                             std::pair{".weight_shape", &linear.weight_shape}}) {
    absl::StatusOr<at::Tensor> t = read(suffix);
    if (!t.ok()) return t.status();
    *out = *std::move(t);
  }
  if (reader.Has(module + ".weight_zero_point")) {
    absl::StatusOr<at::Tensor> zp = read(".weight_zero_point");
    if (!zp.ok()) return zp.status();
    linear.weight_zero_point = *std::move(zp);
  }
  const at::Tensor shape = linear.weight_shape.to(at::kLong).flatten();
  const std::vector<int64_t> stored(shape.data_ptr<int64_t>(),
                                    shape.data_ptr<int64_t>() + shape.numel());
  if (expected_shape != nullptr && stored != *expected_shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", module, ".weight_shape\" = ", ShapeString(stored), ", expected ",
                     ShapeString(*expected_shape), " from config.json"));
  }
  return internal::GuardTorch(
      absl::StrCat("dequantizing \"", module, "\""), [&]() -> absl::StatusOr<at::Tensor> {
        linear.weight_packed = linear.weight_packed.to(device);
        linear.weight_scale = linear.weight_scale.to(device);
        absl::StatusOr<at::Tensor> dense = DequantizePackedInt4(linear);
        if (!dense.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat("tensor \"", module, "\": ", dense.status().message()));
        }
        return dense->to(dtype);
      });
}

// Loads `name` with `shape` into `*out`.
absl::Status Load(CheckpointReader& reader, const std::string& name, std::vector<int64_t> shape,
                  at::Device device, at::ScalarType dtype, at::Tensor* out) {
  absl::StatusOr<at::Tensor> t = LoadTensor(reader, name, device, dtype, &shape);
  if (!t.ok()) return t.status();
  *out = *std::move(t);
  return absl::OkStatus();
}

absl::Status LoadMlp(CheckpointReader& reader, const std::string& prefix, int64_t hidden,
                     int64_t width, at::Device device, at::ScalarType dtype, MlpWeights* mlp) {
  if (auto s = Load(reader, prefix + "gate_proj.weight", {width, hidden}, device, dtype,
                    &mlp->gate_proj);
      !s.ok()) {
    return s;
  }
  if (auto s =
          Load(reader, prefix + "up_proj.weight", {width, hidden}, device, dtype, &mlp->up_proj);
      !s.ok()) {
    return s;
  }
  return Load(reader, prefix + "down_proj.weight", {hidden, width}, device, dtype, &mlp->down_proj);
}

}  // namespace

absl::StatusOr<at::Tensor> LoadTensor(CheckpointReader& reader, const std::string& name,
                                      at::Device device, at::ScalarType dtype,
                                      const std::vector<int64_t>* expected_shape) {
  // A linear stored pack-quantized (compressed-tensors) has no ".weight"; it is read through its
  // weight_packed/weight_scale/weight_shape instead.
  if (absl::EndsWith(name, ".weight") && !reader.Has(name)) {
    const std::string module = name.substr(0, name.size() - 7);
    if (reader.Has(module + ".weight_packed")) {
      return LoadPackedLinear(reader, module, device, dtype, expected_shape);
    }
  }
  absl::StatusOr<TensorView> view = reader.Get(name);
  if (!view.ok()) return view.status();
  if (expected_shape != nullptr && view->shape != *expected_shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", name, "\" has shape ", ShapeString(view->shape), ", expected ",
                     ShapeString(*expected_shape), " from config.json"));
  }
  absl::StatusOr<at::Tensor> loaded = internal::GuardTorch(
      absl::StrCat("loading \"", name, "\""), [&]() -> absl::StatusOr<at::Tensor> {
        if (device.is_cuda()) {
          // Straight to the device: FP8 dequantized there, other dtypes converted there.
          if (view->dtype == DType::kF8E4M3 && kernels::Fp8DequantTorchSupported(device).ok()) {
            return LoadFp8OnDevice(reader, *view, device, dtype);
          }
          if (std::optional<at::ScalarType> direct = DirectTorchType(view->dtype)) {
            return CopyToDevice(view->data, view->num_bytes, device, view->page_locked)
                .view(*direct)
                .view(view->shape)
                .to(dtype);
          }
        }
        at::Tensor host;
        if (std::optional<at::ScalarType> direct = DirectTorchType(view->dtype)) {
          // Copy out of the mapping (never alias it; it may also be unaligned).
          host = at::empty(view->shape, at::TensorOptions().dtype(*direct));
          if (static_cast<uint64_t>(host.nbytes()) != view->num_bytes) {
            return absl::InternalError(absl::StrCat("tensor \"", name, "\": ", view->num_bytes,
                                                    " bytes for ", host.nbytes()));
          }
          std::memcpy(host.data_ptr(), view->data, view->num_bytes);
        } else if (view->dtype == DType::kF8E4M3) {
          absl::StatusOr<std::vector<uint16_t>> bits = LoadAsBf16(reader, name);
          if (!bits.ok()) return bits.status();
          host = at::empty(view->shape, at::TensorOptions().dtype(at::kBFloat16));
          if (static_cast<size_t>(host.numel()) != bits->size()) {
            return absl::InternalError(absl::StrCat("tensor \"", name, "\": LoadAsBf16 gave ",
                                                    bits->size(), " values for ", host.numel()));
          }
          std::memcpy(host.data_ptr(), bits->data(), bits->size() * sizeof(uint16_t));
        } else {
          return absl::InvalidArgumentError(
              absl::StrCat("tensor \"", name, "\" has dtype ", std::string(DTypeName(view->dtype)),
                           ": must be F32, BF16, F16, F64 or F8_E4M3 (with _scale_inv)"));
        }
        return host.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
      });
  // Every path above has finished reading the mapping when it returns (device copies go through
  // pinned buffers filled on the host): a shard that shrank meanwhile fails the load by name.
  if (loaded.ok()) {
    if (absl::Status s = CheckTensorRead(*view); !s.ok()) return s;
  }
  return loaded;
}

absl::StatusOr<LayerWeights> LoadLayer(CheckpointReader& reader, const DeepseekV3Config& config,
                                       int layer, at::Device device, at::ScalarType dtype,
                                       const LayerLoadOptions& options) {
  if (auto s = CheckComputeDtype(dtype); !s.ok()) return s;
  const int total_layers = config.num_hidden_layers + config.num_nextn_predict_layers;
  if (layer < 0 || layer >= total_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer = ", layer, ": must be in [0, ", total_layers, ")"));
  }
  LayerWeights w;
  w.config = config;
  w.layer = layer;
  w.prefix = absl::StrCat("model.layers.", layer, ".");
  w.device = device;
  w.dtype = dtype;
  w.is_moe = config.IsMoeLayer(layer);

  const int64_t h = config.hidden_size;
  const int64_t nh = config.num_attention_heads;
  const int64_t qk = config.q_head_dim();
  const std::string& p = w.prefix;
  const std::string attn = p + "self_attn.";

  if (auto s = Load(reader, p + "input_layernorm.weight", {h}, device, dtype, &w.input_layernorm);
      !s.ok()) {
    return s;
  }
  if (auto s = Load(reader, p + "post_attention_layernorm.weight", {h}, device, dtype,
                    &w.post_attention_layernorm);
      !s.ok()) {
    return s;
  }
  if (config.q_lora_rank > 0) {
    const int64_t rq = config.q_lora_rank;
    if (auto s = Load(reader, attn + "q_a_proj.weight", {rq, h}, device, dtype, &w.q_a_proj);
        !s.ok()) {
      return s;
    }
    if (auto s = Load(reader, attn + "q_a_layernorm.weight", {rq}, device, dtype, &w.q_a_layernorm);
        !s.ok()) {
      return s;
    }
    if (auto s = Load(reader, attn + "q_b_proj.weight", {nh * qk, rq}, device, dtype, &w.q_b_proj);
        !s.ok()) {
      return s;
    }
  } else {
    if (auto s = Load(reader, attn + "q_proj.weight", {nh * qk, h}, device, dtype, &w.q_proj);
        !s.ok()) {
      return s;
    }
  }
  const int64_t rkv = config.kv_lora_rank;
  if (auto s = Load(reader, attn + "kv_a_proj_with_mqa.weight", {rkv + config.qk_rope_head_dim, h},
                    device, dtype, &w.kv_a_proj_with_mqa);
      !s.ok()) {
    return s;
  }
  if (auto s =
          Load(reader, attn + "kv_a_layernorm.weight", {rkv}, device, dtype, &w.kv_a_layernorm);
      !s.ok()) {
    return s;
  }
  if (auto s = Load(reader, attn + "kv_b_proj.weight",
                    {nh * (config.qk_nope_head_dim + config.v_head_dim), rkv}, device, dtype,
                    &w.kv_b_proj);
      !s.ok()) {
    return s;
  }
  if (auto s = Load(reader, attn + "o_proj.weight", {h, nh * config.v_head_dim}, device, dtype,
                    &w.o_proj);
      !s.ok()) {
    return s;
  }

  if (!w.is_moe) {
    if (auto s = LoadMlp(reader, p + "mlp.", h, config.intermediate_size, device, dtype, &w.mlp);
        !s.ok()) {
      return s;
    }
    return w;
  }

  // MoE layer.
  if (config.scoring_func != "sigmoid" || config.topk_method != "noaux_tc") {
    return absl::UnimplementedError(absl::StrCat(
        "scoring_func = \"", config.scoring_func, "\", topk_method = \"", config.topk_method,
        "\": only sigmoid + noaux_tc routing (DeepSeek-V3) is implemented"));
  }
  const int64_t experts = config.n_routed_experts;
  if (config.n_group < 1 || experts % config.n_group != 0 || experts / config.n_group < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "n_group = ", config.n_group, ": n_routed_experts = ", experts,
        " must split into groups of at least 2 experts (group score = sum of the top 2)"));
  }
  const int begin = options.expert_begin;
  const int end = options.expert_end < 0 ? static_cast<int>(experts) : options.expert_end;
  if (begin < 0 || begin > end || end > experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert range [", begin, ", ", end, "): must lie in [0, ", experts, "]"));
  }
  if (auto s = Load(reader, p + "mlp.gate.weight", {experts, h}, device, at::kFloat, &w.gate);
      !s.ok()) {
    return s;
  }
  if (auto s = Load(reader, p + "mlp.gate.e_score_correction_bias", {experts}, device, at::kFloat,
                    &w.e_score_correction_bias);
      !s.ok()) {
    return s;
  }
  w.experts.resize(experts);
  for (int e = begin; e < end; ++e) {
    if (auto s = LoadMlp(reader, absl::StrCat(p, "mlp.experts.", e, "."), h,
                         config.moe_intermediate_size, device, dtype, &w.experts[e]);
        !s.ok()) {
      return s;
    }
  }
  if (config.n_shared_experts > 0) {
    if (auto s = LoadMlp(reader, p + "mlp.shared_experts.", h,
                         config.moe_intermediate_size * config.n_shared_experts, device, dtype,
                         &w.shared_experts);
        !s.ok()) {
      return s;
    }
  }
  return w;
}

absl::StatusOr<GlobalWeights> LoadGlobals(CheckpointReader& reader, const DeepseekV3Config& config,
                                          at::Device device, at::ScalarType dtype) {
  if (auto s = CheckComputeDtype(dtype); !s.ok()) return s;
  GlobalWeights g;
  g.config = config;
  g.device = device;
  g.dtype = dtype;
  const int64_t v = config.vocab_size;
  const int64_t h = config.hidden_size;
  if (auto s = Load(reader, "model.embed_tokens.weight", {v, h}, device, dtype, &g.embed_tokens);
      !s.ok()) {
    return s;
  }
  if (auto s = Load(reader, "model.norm.weight", {h}, device, dtype, &g.norm); !s.ok()) return s;
  if (config.tie_word_embeddings && !reader.Has("lm_head.weight")) {
    g.lm_head = g.embed_tokens;
  } else if (auto s = Load(reader, "lm_head.weight", {v, h}, device, dtype, &g.lm_head); !s.ok()) {
    return s;
  }
  return g;
}

}  // namespace mq::model
