// Forward throughput of one full-width DeepSeek-V3 MoE decoder layer (hidden 7168, MLA with
// 128 heads, 256 routed experts of 2048 + 1 shared, top-8 of 8 groups / 4) with random bf16
// weights, against the device's measured bf16 matmul rate.
//
// usage: mq-bench-layer-forward [--device cuda:0] [--shapes 8x1024,1x4096] [--iters 5]
//                               [--experts 256]
// Prints a table: tokens, median ms, executed TFLOP (linear products counted from the tokens
// each linear really saw, plus causal attention), achieved TFLOP/s, fraction of the measured
// bf16 matmul rate, tokens/s, peak device memory.

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "worker/model/deepseek_v3.h"

namespace {

using mq::bench::MedianMs;

using mq::model::DeepseekV3Config;
using mq::model::LayerWeights;
using mq::model::MlpWeights;

DeepseekV3Config FullWidthConfig(int experts) {
  DeepseekV3Config c;
  c.architectures = {"DeepseekV3ForCausalLM"};
  c.model_type = "deepseek_v3";
  c.vocab_size = 129280;
  c.hidden_size = 7168;
  c.intermediate_size = 18432;
  c.moe_intermediate_size = 2048;
  c.num_hidden_layers = 61;
  c.first_k_dense_replace = 3;
  c.n_routed_experts = experts;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.routed_scaling_factor = 2.5;
  c.scoring_func = "sigmoid";
  c.topk_method = "noaux_tc";
  c.norm_topk_prob = true;
  c.num_attention_heads = 128;
  c.num_key_value_heads = 128;
  c.q_lora_rank = 1536;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000;
  c.max_position_embeddings = 163840;
  mq::model::RopeScalingConfig yarn;
  yarn.type = "yarn";
  yarn.factor = 40;
  yarn.original_max_position_embeddings = 4096;
  yarn.beta_fast = 32;
  yarn.beta_slow = 1;
  yarn.mscale = 1;
  yarn.mscale_all_dim = 1;
  c.rope_scaling = yarn;
  return c;
}

at::Tensor Rand(std::vector<int64_t> shape, const at::TensorOptions& o, double std) {
  return (at::randn(shape, o.dtype(at::kFloat)) * std).to(o.dtype());
}

MlpWeights Mlp(int64_t inter, int64_t hidden, const at::TensorOptions& o) {
  MlpWeights m;
  m.gate_proj = Rand({inter, hidden}, o, 0.02);
  m.up_proj = Rand({inter, hidden}, o, 0.02);
  m.down_proj = Rand({hidden, inter}, o, 0.02);
  return m;
}

LayerWeights RandomMoeLayer(const DeepseekV3Config& c, at::Device device) {
  const auto o = at::TensorOptions().device(device).dtype(at::kBFloat16);
  const int64_t H = c.hidden_size, nh = c.num_attention_heads;
  LayerWeights w;
  w.config = c;
  w.layer = 3;
  w.prefix = "model.layers.3.";
  w.device = device;
  w.dtype = at::kBFloat16;
  w.input_layernorm = at::ones({H}, o);
  w.post_attention_layernorm = at::ones({H}, o);
  w.q_a_proj = Rand({c.q_lora_rank, H}, o, 0.02);
  w.q_a_layernorm = at::ones({c.q_lora_rank}, o);
  w.q_b_proj = Rand({nh * c.q_head_dim(), c.q_lora_rank}, o, 0.02);
  w.kv_a_proj_with_mqa = Rand({c.kv_lora_rank + c.qk_rope_head_dim, H}, o, 0.02);
  w.kv_a_layernorm = at::ones({c.kv_lora_rank}, o);
  w.kv_b_proj = Rand({nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, o, 0.02);
  w.o_proj = Rand({H, nh * c.v_head_dim}, o, 0.02);
  w.is_moe = true;
  const auto f32 = o.dtype(at::kFloat);
  w.gate = Rand({c.n_routed_experts, H}, f32, 0.02);
  w.e_score_correction_bias = Rand({c.n_routed_experts}, f32, 0.01);
  for (int e = 0; e < c.n_routed_experts; ++e) {
    w.experts.push_back(Mlp(c.moe_intermediate_size, H, o));
  }
  w.shared_experts = Mlp(c.moe_intermediate_size * c.n_shared_experts, H, o);
  return w;
}

// Measured bf16 matmul rate (TFLOP/s) on an 8192^3 product, fresh random operands.
double MatmulCeilingTflops(at::Device device, int iters) {
  const int64_t n = device.is_cuda() ? 8192 : 1024;
  const auto o = at::TensorOptions().device(device).dtype(at::kBFloat16);
  at::Tensor a = at::randn({n, n}, o), b = at::randn({n, n}, o);
  const double ms = MedianMs(device, iters * 4, [&] { (void)at::matmul(a, b); });
  return 2.0 * n * n * n / (ms * 1e-3) / 1e12;
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_name = "cuda:0", shapes_arg = "8x1024,1x4096";
  int iters = 5, experts = 256;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--device") device_name = value;
    else if (flag == "--shapes") shapes_arg = value;
    else if (flag == "--iters") iters = std::atoi(value.c_str());
    else if (flag == "--experts") experts = std::atoi(value.c_str());
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const at::Device device(device_name);
  at::manual_seed(0);
  const DeepseekV3Config config = FullWidthConfig(experts);
  LayerWeights weights = RandomMoeLayer(config, device);
  const double ceiling = MatmulCeilingTflops(device, iters);
  std::printf("device %s, bf16 matmul 8192^3: %.0f TFLOP/s measured\n", device_name.c_str(),
              ceiling);
  std::printf("%-9s %8s %10s %10s %8s %10s %10s %12s\n", "shape", "tokens", "median_ms",
              "TFLOP", "TFLOP/s", "of_matmul", "tokens/s", "peak_GiB");

  std::stringstream ss(shapes_arg);
  std::string shape;
  while (std::getline(ss, shape, ',')) {
    const int64_t batch = std::atoll(shape.substr(0, shape.find('x')).c_str());
    const int64_t seq = std::atoll(shape.substr(shape.find('x') + 1).c_str());
    at::Tensor hidden =
        at::randn({batch, seq, config.hidden_size}, at::TensorOptions().device(device))
            .to(at::kBFloat16);
    at::Tensor positions = at::arange(seq, at::TensorOptions().dtype(at::kLong));

    // One counting pass: rows each linear saw -> multiply-accumulates.
    std::mutex mu;
    double macs = 0;
    std::map<std::string, std::pair<int64_t, int64_t>> dims;  // linear -> (out, in)
    auto dim_of = [&](const std::string& name) -> std::pair<int64_t, int64_t> {
      const std::string local = name.substr(weights.prefix.size());
      if (local == "self_attn.q_a_proj") return {weights.q_a_proj.size(0), weights.q_a_proj.size(1)};
      if (local == "self_attn.q_b_proj") return {weights.q_b_proj.size(0), weights.q_b_proj.size(1)};
      if (local == "self_attn.kv_a_proj_with_mqa")
        return {weights.kv_a_proj_with_mqa.size(0), weights.kv_a_proj_with_mqa.size(1)};
      if (local == "self_attn.kv_b_proj") return {weights.kv_b_proj.size(0), weights.kv_b_proj.size(1)};
      if (local == "self_attn.o_proj") return {weights.o_proj.size(0), weights.o_proj.size(1)};
      if (local == "mlp.gate") return {weights.gate.size(0), weights.gate.size(1)};
      if (local.find("down_proj") != std::string::npos)
        return {config.hidden_size, config.moe_intermediate_size};
      return {config.moe_intermediate_size, config.hidden_size};
    };
    mq::model::ForwardHooks counting;
    counting.on_linear_input = [&](const std::string& name, const at::Tensor& input) {
      auto [out, in] = dim_of(name);
      std::lock_guard<std::mutex> lock(mu);
      macs += static_cast<double>(input.size(0)) * out * in;
    };
    auto counted = mq::model::RunLayer(weights, hidden, positions, counting);
    if (!counted.ok()) {
      std::fprintf(stderr, "RunLayer failed: %s\n", counted.status().ToString().c_str());
      return 1;
    }
    // Causal attention: QK^T over (nope + rope) and PV over v, each over s(s+1)/2 pairs.
    const double pairs = static_cast<double>(batch) * seq * (seq + 1) / 2;
    macs += pairs * config.num_attention_heads * (config.q_head_dim() + config.v_head_dim);
    const double tflop = 2 * macs / 1e12;

    if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
    const double ms = MedianMs(device, iters, [&] {
      auto out = mq::model::RunLayer(weights, hidden, positions);
      if (!out.ok()) std::abort();
    });
    double peak_gib = 0;
    if (device.is_cuda()) {
      auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
      peak_gib = stats.allocated_bytes[0].peak / double(1ull << 30);
    }
    const double rate = tflop / (ms * 1e-3);
    std::printf("%-9s %8lld %10.1f %10.2f %8.1f %9.1f%% %10.0f %12.1f\n", shape.c_str(),
                static_cast<long long>(batch * seq), ms, tflop, rate, 100 * rate / ceiling,
                batch * seq / (ms * 1e-3), peak_gib);
  }
  return 0;
}
