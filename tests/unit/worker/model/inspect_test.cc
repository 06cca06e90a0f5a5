#include "worker/model/inspect.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/model/plan.h"

namespace mq::model {
namespace {

using ::testing::ElementsAre;
using ::testing::Field;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::UnorderedElementsAreArray;
using Json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// A tiny DeepseekV3 checkpoint written as real files. The tensor list is spelled out here from
// FORMATS.md §2.2 on purpose (not produced by ExpectedInventory) so the test checks the library.

struct TinyDims {
  int64_t vocab = 300;
  int64_t hidden = 200;  // not a multiple of 128: scale grids are ceil-divided
  int64_t inter = 384;
  int64_t moe_inter = 64;
  int layers = 2;  // layer 0 dense, layer 1 MoE
  int dense = 1;
  int experts = 4;
  int shared = 1;
  int64_t heads = 4;
  int64_t q_lora = 96;  // 0: q_proj instead of q_a/q_b
  int64_t kv_lora = 64;
  int64_t nope = 32;
  int64_t rope = 16;
  int64_t v = 32;
  int nextn = 1;
};

Json TinyConfig(const TinyDims& d) {
  Json j = {{"architectures", {"DeepseekV3ForCausalLM"}},
            {"model_type", "deepseek_v3"},
            {"vocab_size", d.vocab},
            {"hidden_size", d.hidden},
            {"intermediate_size", d.inter},
            {"moe_intermediate_size", d.moe_inter},
            {"num_hidden_layers", d.layers},
            {"num_nextn_predict_layers", d.nextn},
            {"first_k_dense_replace", d.dense},
            {"moe_layer_freq", 1},
            {"n_routed_experts", d.experts},
            {"n_shared_experts", d.shared},
            {"num_experts_per_tok", 2},
            {"n_group", 2},
            {"topk_group", 1},
            {"routed_scaling_factor", 2.5},
            {"scoring_func", "sigmoid"},
            {"topk_method", "noaux_tc"},
            {"norm_topk_prob", true},
            {"num_attention_heads", d.heads},
            {"num_key_value_heads", d.heads},
            {"kv_lora_rank", d.kv_lora},
            {"qk_nope_head_dim", d.nope},
            {"qk_rope_head_dim", d.rope},
            {"v_head_dim", d.v},
            {"rms_norm_eps", 1e-6},
            {"rope_theta", 10000},
            {"max_position_embeddings", 4096},
            {"rope_scaling",
             {{"type", "yarn"},
              {"factor", 40},
              {"original_max_position_embeddings", 4096},
              {"beta_fast", 32},
              {"beta_slow", 1},
              {"mscale", 1.0},
              {"mscale_all_dim", 1.0}}},
            {"tie_word_embeddings", false},
            {"quantization_config",
             {{"activation_scheme", "dynamic"},
              {"fmt", "e4m3"},
              {"quant_method", "fp8"},
              {"weight_block_size", {128, 128}}}}};
  j["q_lora_rank"] = d.q_lora > 0 ? Json(d.q_lora) : Json(nullptr);
  return j;
}

struct Spec {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
};

int64_t Ceil128(int64_t x) { return (x + 127) / 128; }

std::vector<Spec> TinyTensors(const TinyDims& d, bool fp8, bool with_mtp) {
  std::vector<Spec> out;
  auto linear = [&](const std::string& name, int64_t o, int64_t i) {
    if (fp8) {
      out.push_back({name, "F8_E4M3", {o, i}});
      out.push_back({name + "_scale_inv", "F32", {Ceil128(o), Ceil128(i)}});
    } else {
      out.push_back({name, "BF16", {o, i}});
    }
  };
  auto bf16 = [&](const std::string& name, std::vector<int64_t> shape) {
    out.push_back({name, "BF16", std::move(shape)});
  };
  bf16("model.embed_tokens.weight", {d.vocab, d.hidden});
  const int total_layers = d.layers + (with_mtp ? d.nextn : 0);
  for (int layer = 0; layer < total_layers; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    bf16(p + "input_layernorm.weight", {d.hidden});
    bf16(p + "post_attention_layernorm.weight", {d.hidden});
    if (d.q_lora > 0) {
      linear(p + "self_attn.q_a_proj.weight", d.q_lora, d.hidden);
      bf16(p + "self_attn.q_a_layernorm.weight", {d.q_lora});
      linear(p + "self_attn.q_b_proj.weight", d.heads * (d.nope + d.rope), d.q_lora);
    } else {
      linear(p + "self_attn.q_proj.weight", d.heads * (d.nope + d.rope), d.hidden);
    }
    linear(p + "self_attn.kv_a_proj_with_mqa.weight", d.kv_lora + d.rope, d.hidden);
    bf16(p + "self_attn.kv_a_layernorm.weight", {d.kv_lora});
    linear(p + "self_attn.kv_b_proj.weight", d.heads * (d.nope + d.v), d.kv_lora);
    linear(p + "self_attn.o_proj.weight", d.hidden, d.heads * d.v);
    if (layer < d.dense) {
      linear(p + "mlp.gate_proj.weight", d.inter, d.hidden);
      linear(p + "mlp.up_proj.weight", d.inter, d.hidden);
      linear(p + "mlp.down_proj.weight", d.hidden, d.inter);
    } else {
      bf16(p + "mlp.gate.weight", {d.experts, d.hidden});
      out.push_back({p + "mlp.gate.e_score_correction_bias", "F32", {d.experts}});
      for (int e = 0; e < d.experts; ++e) {
        const std::string ep = p + "mlp.experts." + std::to_string(e) + ".";
        linear(ep + "gate_proj.weight", d.moe_inter, d.hidden);
        linear(ep + "up_proj.weight", d.moe_inter, d.hidden);
        linear(ep + "down_proj.weight", d.hidden, d.moe_inter);
      }
      if (d.shared > 0) {
        linear(p + "mlp.shared_experts.gate_proj.weight", d.moe_inter * d.shared, d.hidden);
        linear(p + "mlp.shared_experts.up_proj.weight", d.moe_inter * d.shared, d.hidden);
        linear(p + "mlp.shared_experts.down_proj.weight", d.hidden, d.moe_inter * d.shared);
      }
    }
    if (layer >= d.layers) {  // MTP extras
      bf16(p + "embed_tokens.weight", {d.vocab, d.hidden});
      bf16(p + "enorm.weight", {d.hidden});
      bf16(p + "hnorm.weight", {d.hidden});
      bf16(p + "eh_proj.weight", {d.hidden, 2 * d.hidden});
      bf16(p + "shared_head.norm.weight", {d.hidden});
      bf16(p + "shared_head.head.weight", {d.vocab, d.hidden});
    }
  }
  bf16("model.norm.weight", {d.hidden});
  bf16("lm_head.weight", {d.vocab, d.hidden});
  return out;
}

int64_t BytesOf(const Spec& s) {
  int64_t n = 1;
  for (int64_t x : s.shape) n *= x;
  if (s.dtype == "F8_E4M3" || s.dtype == "U8") return n;
  if (s.dtype == "BF16") return 2 * n;
  return 4 * n;  // F32, I32
}

// Writes a safetensors file (8-byte LE length, compact header, zero data) with `tensors` laid
// out in the given order.
void WriteShard(const std::filesystem::path& path, const std::vector<Spec>& tensors) {
  Json header = {{"__metadata__", {{"format", "pt"}}}};
  int64_t offset = 0;
  for (const Spec& s : tensors) {
    header[s.name] = {
        {"dtype", s.dtype}, {"shape", s.shape}, {"data_offsets", {offset, offset + BytesOf(s)}}};
    offset += BytesOf(s);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream f(path, std::ios::binary);
  for (int i = 0; i < 8; ++i) f.put(static_cast<char>((text.size() >> (8 * i)) & 0xff));
  f << text;
  const std::string zeros(static_cast<size_t>(offset), '\0');
  f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "inspect_XXXXXX").string();
    path_ = mkdtemp(pattern.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

std::string ShardName(int index, int num_shards) {
  return "model-0000" + std::to_string(index + 1) + "-of-00000" + std::to_string(num_shards) +
         ".safetensors";  // DeepSeek style: 6-digit total
}

void WriteIndex(const std::filesystem::path& dir,
                const std::map<std::string, std::string>& weight_map) {
  std::ofstream(dir / "model.safetensors.index.json", std::ios::trunc)
      << Json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump(2);
}

// Writes config.json, `num_shards` shards and the index; tensor i goes to shard
// `shard_of(spec, i)` (round robin by default). Returns the weight map (name -> shard).
std::map<std::string, std::string> WriteCheckpoint(
    const std::filesystem::path& dir, const Json& config, const std::vector<Spec>& tensors,
    int num_shards, std::function<int(const Spec&, size_t)> shard_of = nullptr) {
  if (!shard_of) shard_of = [&](const Spec&, size_t i) { return static_cast<int>(i % num_shards); };
  std::ofstream(dir / "config.json") << config.dump(2);
  std::vector<std::vector<Spec>> shards(num_shards);
  std::map<std::string, std::string> weight_map;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int s = shard_of(tensors[i], i);
    shards[s].push_back(tensors[i]);
    weight_map[tensors[i].name] = ShardName(s, num_shards);
  }
  for (int s = 0; s < num_shards; ++s) WriteShard(dir / ShardName(s, num_shards), shards[s]);
  WriteIndex(dir, weight_map);
  return weight_map;
}

InspectRequest Request(const std::filesystem::path& dir) {
  InspectRequest r;
  r.model_dir = dir.string();
  r.gang_size = 3;
  // Per-channel: no group size divides the tiny model's hidden width (200); see
  // RoutedExpertsWithPartialGroupsAreRefused.
  r.group_size = 0;
  r.num_calibration_samples = 8;
  r.max_sequence_length = 16;
  return r;
}

std::vector<std::string> Render(const std::vector<Problem>& problems) {
  std::vector<std::string> out;
  for (const Problem& p : problems) out.push_back(p.where + ": " + p.message);
  return out;
}

// ---------------------------------------------------------------------------------------------

TEST(InspectTest, ValidFp8CheckpointHasNoProblems) {
  TempDir dir;
  TinyDims d;
  const std::vector<Spec> tensors = TinyTensors(d, /*fp8=*/true, /*with_mtp=*/true);
  WriteCheckpoint(dir.path(), TinyConfig(d), tensors, 3);
  InspectRequest request = Request(dir.path());
  request.include_mtp = true;
  InspectReport report = InspectCheckpoint(request);
  EXPECT_THAT(Render(report.problems), IsEmpty());
  EXPECT_TRUE(report.ok());

  const ModelSummary& s = report.summary;
  EXPECT_EQ(s.model_type, "deepseek_v3");
  EXPECT_EQ(s.architecture, "DeepseekV3ForCausalLM");
  EXPECT_EQ(s.weight_format, "fp8");
  EXPECT_EQ(s.num_hidden_layers, 2);
  EXPECT_EQ(s.first_k_dense_replace, 1);
  EXPECT_EQ(s.num_nextn_predict_layers, 1);
  EXPECT_EQ(s.hidden_size, 200);
  EXPECT_EQ(s.n_routed_experts, 4);
  EXPECT_EQ(s.q_lora_rank, 96);
  EXPECT_EQ(s.vocab_size, 300);
  EXPECT_EQ(s.num_shards, 3);
  EXPECT_EQ(s.num_tensors, static_cast<int64_t>(tensors.size()));
  int64_t params = 0, bytes = 0;
  for (const Spec& t : tensors) {
    int64_t n = 1;
    for (int64_t x : t.shape) n *= x;
    params += n;
    bytes += BytesOf(t);
  }
  EXPECT_EQ(s.num_parameters, params);
  EXPECT_EQ(s.checkpoint_bytes, bytes);

  ASSERT_EQ(report.layers.size(), 3u);
  EXPECT_EQ(report.layers[0].kind, LayerKind::kDense);
  EXPECT_EQ(report.layers[1].kind, LayerKind::kMoe);
  EXPECT_EQ(report.layers[2].kind, LayerKind::kMtp);
  EXPECT_EQ(report.layers[0].num_quantized_linears, 0);
  EXPECT_EQ(report.layers[1].num_quantized_linears, 12);
  EXPECT_EQ(report.layers[2].num_quantized_linears, 12);
  ASSERT_EQ(report.ranks.size(), 3u);
}

TEST(InspectTest, Bf16SingleFileCheckpointWithoutQLora) {
  TempDir dir;
  TinyDims d;
  d.q_lora = 0;
  d.nextn = 0;
  std::ofstream(dir.path() / "config.json") << TinyConfig(d).dump();
  WriteShard(dir.path() / "model.safetensors", TinyTensors(d, /*fp8=*/false, false));
  InspectReport report = InspectCheckpoint(Request(dir.path()));
  EXPECT_THAT(Render(report.problems), IsEmpty());
  EXPECT_EQ(report.summary.weight_format, "bf16");
  EXPECT_EQ(report.summary.num_shards, 1);
  EXPECT_EQ(report.summary.q_lora_rank, 0);
  EXPECT_EQ(report.layers.size(), 2u);
}

TEST(InspectTest, MixedFp8AndBf16LinearsAreFp8) {
  TempDir dir;
  TinyDims d;
  std::vector<Spec> tensors = TinyTensors(d, /*fp8=*/true, /*with_mtp=*/true);
  // Store layer 0's attention output projection as BF16 without a scale.
  const std::string o = "model.layers.0.self_attn.o_proj.weight";
  tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                               [&](const Spec& s) { return s.name == o + "_scale_inv"; }),
                tensors.end());
  for (Spec& s : tensors) {
    if (s.name == o) s.dtype = "BF16";
  }
  WriteCheckpoint(dir.path(), TinyConfig(d), tensors, 2);
  InspectReport report = InspectCheckpoint(Request(dir.path()));
  EXPECT_THAT(Render(report.problems), IsEmpty());
  EXPECT_EQ(report.summary.weight_format, "fp8");
  EXPECT_EQ(report.layers.size(), 2u);  // MTP present but not planned without include_mtp
}

TEST(InspectTest, BrokenCheckpointReportsExactlyItsProblems) {
  TempDir dir;
  TinyDims d;
  std::vector<Spec> tensors = TinyTensors(d, /*fp8=*/true, /*with_mtp=*/true);
  const std::string down = "model.layers.1.mlp.experts.2.down_proj.weight";
  const std::string up_scale = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv";
  const std::string router = "model.layers.1.mlp.gate.weight";
  const std::string kv_b_scale = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv";
  const std::string forgotten = "model.layers.1.mlp.experts.1.gate_proj.weight_scale_inv";
  for (Spec& s : tensors) {
    if (s.name == down) s.shape = {200, 65};              // wrong shape
    if (s.name == down + "_scale_inv") s.shape = {2, 1};  // consistent with [200, 65]
    if (s.name == router) s.dtype = "F8_E4M3";            // the router must not be FP8
    if (s.name == kv_b_scale) s.dtype = "BF16";           // scales must be F32
  }
  tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                               [&](const Spec& s) { return s.name == up_scale; }),
                tensors.end());
  tensors.push_back({"model.layers.1.mlp.experts.4.up_proj.weight", "BF16", {64, 200}});
  tensors.push_back({"model.layers.0.extra.weight", "BF16", {3}});

  // Shard 3 (deleted below) holds expert 0 of layer 1: 3 weights + 3 scales. Shard 2 holds
  // attention and the extra tensor; shard 1 the rest.
  auto shard_of = [](const Spec& s, size_t) {
    if (s.name.rfind("model.layers.1.mlp.experts.0.", 0) == 0) return 2;
    if (s.name.find("self_attn") != std::string::npos ||
        s.name.find("extra") != std::string::npos) {
      return 1;
    }
    return 0;
  };
  std::map<std::string, std::string> weight_map =
      WriteCheckpoint(dir.path(), TinyConfig(d), tensors, 3, shard_of);
  const std::string shard1 = ShardName(0, 3);
  const std::string shard2 = ShardName(1, 3);
  const std::string shard3 = ShardName(2, 3);
  std::filesystem::remove(dir.path() / shard3);
  // The index forgets a scale that shard 1 holds and the extra tensor of shard 2, and lists a
  // tensor that shard 1 does not hold.
  weight_map.erase(forgotten);
  weight_map.erase("model.layers.0.extra.weight");
  weight_map["model.layers.0.mlp.ghost.weight"] = shard1;
  WriteIndex(dir.path(), weight_map);

  InspectReport report = InspectCheckpoint(Request(dir.path()));
  EXPECT_THAT(
      Render(report.problems),
      ElementsAre(
          shard3 + ": missing shard: file not found; 6 tensors mapped to it are unavailable",
          "model.layers.0.mlp.ghost.weight: missing tensor: model.safetensors.index.json maps it "
          "to " +
              shard1 + ", which does not contain it",
          kv_b_scale + ": dtype BF16: expected F32 for the weight_scale_inv of F8_E4M3 weight "
                       "\"model.layers.0.self_attn.kv_b_proj.weight\"",
          router + ": dtype F8_E4M3: expected F16, BF16, F32 or F64 (the router weight must "
                   "never be FP8)",
          forgotten +
              ": missing tensor: F8_E4M3 weight "
              "\"model.layers.1.mlp.experts.1.gate_proj.weight\" needs an F32 "
              "weight_scale_inv of shape [1, 2]; present in shard " +
              shard1 + " but not listed in model.safetensors.index.json",
          down + ": shape [200, 65]: expected [200, 64]",
          up_scale + ": missing tensor: F8_E4M3 weight "
                     "\"model.layers.1.mlp.experts.3.up_proj.weight\" needs an F32 "
                     "weight_scale_inv of shape [1, 2]",
          "model.layers.1.mlp.experts.4.up_proj.weight: unexpected tensor: not part of the "
          "DeepseekV3 inventory for this config.json (in shard " +
              shard1 + ")",
          "model.layers.0.extra.weight: tensor not in index: present in shard " + shard2 +
              " but model.safetensors.index.json does not list it"));
  EXPECT_FALSE(report.ok());
  EXPECT_EQ(report.summary.num_shards, 3);
  // Planning still runs: the config and the request are fine.
  EXPECT_EQ(report.layers.size(), 2u);
}

TEST(InspectTest, ReportsMissingAndMisshapenTensorsByName) {
  TempDir dir;
  TinyDims d;
  std::vector<Spec> tensors = TinyTensors(d, /*fp8=*/true, /*with_mtp=*/false);
  tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                               [](const Spec& s) {
                                 return s.name == "lm_head.weight" ||
                                        s.name == "model.layers.0.mlp.down_proj.weight_scale_inv";
                               }),
                tensors.end());
  for (Spec& s : tensors) {
    if (s.name == "model.layers.0.mlp.up_proj.weight_scale_inv") s.shape = {3, 1};
    if (s.name == "model.norm.weight") s.dtype = "I32";
    if (s.name == "model.layers.1.mlp.experts.1.gate_proj.weight") s.dtype = "U8";
  }
  WriteCheckpoint(dir.path(), TinyConfig(d), tensors, 1);
  InspectRequest request = Request(dir.path());
  request.include_mtp = true;
  InspectReport report = InspectCheckpoint(request);
  EXPECT_THAT(
      Render(report.problems),
      UnorderedElementsAreArray(std::vector<std::string>{
          "model.layers.2: missing MTP layer: request.include_mtp is set but the checkpoint has "
          "no \"model.layers.2.*\" tensors (config.json \"num_nextn_predict_layers\" = 1)",
          "lm_head.weight: missing tensor: expected shape [300, 200]",
          "model.layers.0.mlp.down_proj.weight_scale_inv: missing tensor: F8_E4M3 weight "
          "\"model.layers.0.mlp.down_proj.weight\" needs an F32 weight_scale_inv of shape [2, 3]",
          "model.layers.0.mlp.up_proj.weight_scale_inv: shape [3, 1]: expected [3, 2] = "
          "ceil([384, 200] / 128) for the weight_scale_inv of F8_E4M3 weight "
          "\"model.layers.0.mlp.up_proj.weight\"",
          "model.norm.weight: dtype I32: expected F16, BF16, F32 or F64",
          "model.layers.1.mlp.experts.1.gate_proj.weight: dtype U8: expected F8_E4M3 (with "
          "weight_scale_inv) or F16, BF16, F32 or F64",
          "model.layers.1.mlp.experts.1.gate_proj.weight_scale_inv: unexpected tensor: "
          "weight_scale_inv for \"model.layers.1.mlp.experts.1.gate_proj.weight\", which is U8, "
          "not F8_E4M3",
      }));
}

TEST(InspectTest, ValidatesRequest) {
  TempDir dir;
  TinyDims d;
  d.nextn = 0;
  WriteCheckpoint(dir.path(), TinyConfig(d), TinyTensors(d, true, false), 1);
  InspectRequest r = Request(dir.path());
  r.bits = 3;
  r.group_size = 96;
  r.num_calibration_samples = 0;
  r.max_sequence_length = -1;
  r.include_mtp = true;
  EXPECT_THAT(Render(InspectCheckpoint(r).problems),
              ElementsAre("request.bits: bits = 3: must be 4",
                          "request.group_size: group_size = 96: must be 0 (per-channel), 32, 64 "
                          "or 128",
                          "request.num_calibration_samples: num_calibration_samples = 0: must be "
                          ">= 1",
                          "request.max_sequence_length: max_sequence_length = -1: must be >= 1",
                          "request.include_mtp: include_mtp is set but config.json "
                          "\"num_nextn_predict_layers\" = 0 (no MTP layers)"));
  InspectRequest g = Request(dir.path());
  g.gang_size = 0;
  EXPECT_THAT(Render(InspectCheckpoint(g).problems),
              ElementsAre("request.gang_size: gang_size = 0: must be >= 1"));
  g.gang_size = 5;
  InspectReport report = InspectCheckpoint(g);
  EXPECT_THAT(Render(report.problems),
              ElementsAre("request.gang_size: gang_size = 5: must be <= n_routed_experts = 4 "
                          "(every rank owns at least one expert)"));
  EXPECT_THAT(report.layers, IsEmpty());
  InspectRequest settings = Request(dir.path());
  settings.experts_per_pass = -2;
  settings.dispatch_tokens = -7;
  settings.device_memory_bytes = -1;
  EXPECT_THAT(Render(InspectCheckpoint(settings).problems),
              ElementsAre("request.experts_per_pass: experts_per_pass = -2: must be >= 0 (0 = "
                          "all) or -1 (chosen by the plan)",
                          "request.dispatch_tokens: dispatch_tokens = -7: must be >= 0 (0 = all) "
                          "or -1 (chosen by the plan)",
                          "request.device_memory_bytes: device_memory_bytes = -1: must be >= 0 "
                          "(0 = unknown)"));
}

TEST(InspectTest, ReportsMissingFiles) {
  TempDir dir;
  InspectRequest r = Request(dir.path() / "nope");
  EXPECT_THAT(InspectCheckpoint(r).problems,
              ElementsAre(Field(&Problem::where, "request.model_dir")));
  EXPECT_THAT(Render(InspectCheckpoint(Request(dir.path())).problems),
              ElementsAre("config.json: missing file: config.json is not in the model directory",
                          "model.safetensors.index.json: missing file: neither "
                          "model.safetensors.index.json nor model.safetensors is in the model "
                          "directory"));
}

TEST(InspectTest, ReportsBadConfigIndexAndShardFiles) {
  TempDir dir;
  TinyDims d;
  Json config = TinyConfig(d);
  config["n_group"] = 3;
  WriteCheckpoint(dir.path(), config, TinyTensors(d, true, true), 2);
  std::ofstream(dir.path() / "model-00002-of-000002.safetensors", std::ios::trunc) << "garbage!!";
  InspectReport report = InspectCheckpoint(Request(dir.path()));
  std::vector<std::string> rendered = Render(report.problems);
  ASSERT_EQ(rendered.size(), 2u);
  EXPECT_EQ(rendered[0], "config.json: \"n_group\" = 3 must divide \"n_routed_experts\" = 4");
  EXPECT_THAT(rendered[1], HasSubstr("model-00002-of-000002.safetensors: unreadable shard: "
                                     "header length "));
  EXPECT_THAT(rendered[1], HasSubstr("tensors mapped to it are unavailable"));
  EXPECT_THAT(report.layers, IsEmpty());

  std::ofstream(dir.path() / "model.safetensors.index.json", std::ios::trunc)
      << R"({"weight_map": {"a": "../etc/passwd", "b": 7, "a2": "../etc/passwd"}})";
  EXPECT_THAT(Render(InspectCheckpoint(Request(dir.path())).problems),
              ElementsAre("config.json: \"n_group\" = 3 must divide \"n_routed_experts\" = 4",
                          "model.safetensors.index.json: \"weight_map\".\"b\" = 7: must be a "
                          "shard file name (string), found integer",
                          "model.safetensors.index.json: \"weight_map\" maps 2 tensors to shard "
                          "\"../etc/passwd\": shard names must be plain file names in the model "
                          "directory"));
  std::ofstream(dir.path() / "model.safetensors.index.json", std::ios::trunc)
      << R"({"weight_map": {"a": "x", "a": "y"}})";
  EXPECT_THAT(Render(InspectCheckpoint(Request(dir.path())).problems),
              testing::Contains("model.safetensors.index.json: duplicate key \"a\" in object "
                                "\"weight_map\""));
}

TEST(InspectTest, RefusesAnAlreadyQuantizedCheckpoint) {
  TempDir dir;
  TinyDims d;
  Json config = TinyConfig(d);
  config["quantization_config"] = Json::parse(R"({
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "quantization_status": "compressed", "ignore": ["lm_head"],
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
      "num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
      "group_size": 128}}}})");
  WriteCheckpoint(dir.path(), config, TinyTensors(d, true, true), 2);
  InspectReport report = InspectCheckpoint(Request(dir.path()));
  EXPECT_THAT(Render(report.problems),
              testing::Contains("config.json: quantization_config is compressed-tensors "
                                "(pack-quantized): the checkpoint is already quantized; quantize "
                                "the original (FP8 or BF16) checkpoint"));
}

// ---------------------------------------------------------------------------------------------
// Plan and estimate, checked against hand computation for the tiny model (FP8, G = 128,
// experts only, gang 3, 8 sequences of 16 tokens, include_mtp).

// What rank [first, first + count) of the routed experts loads of `layer` (its tensors in name
// order: every non-expert one and its experts'), staged in page-locked slabs, less those
// tensors' bytes: the slabs' rounding and alignment (plan.h host(r), staged(r)).
int64_t StagingSlack(const StoredTensors& stored, int layer, int first, int count) {
  const std::string prefix = "model.layers." + std::to_string(layer) + ".";
  std::vector<int64_t> loaded;
  int64_t bytes = 0;
  for (auto it = stored.lower_bound(prefix); it != stored.end() && it->first.rfind(prefix, 0) == 0;
       ++it) {
    int e = -1;
    if (RoutedExpertOf(it->first, &e) && (e < first || e >= first + count)) continue;
    loaded.push_back(it->second.num_bytes);
    bytes += it->second.num_bytes;
  }
  return PinnedSlabsBytes(loaded) - bytes;
}

TEST(InspectTest, PlanMatchesHandComputation) {
  TempDir dir;
  TinyDims d;
  WriteCheckpoint(dir.path(), TinyConfig(d), TinyTensors(d, true, true), 2);
  InspectRequest request = Request(dir.path());
  request.include_mtp = true;
  InspectReport report = InspectCheckpoint(request);
  ASSERT_TRUE(report.ok()) << Render(report.problems).front();

  // Attention + the two layer norms, element counts (H = 200).
  const int64_t attn_linear = 96 * 200 + 192 * 96 + 80 * 200 + 256 * 64 + 200 * 128;  // 96,784
  const int64_t attn_norms = 200 + 200 + 96 + 64;                                     // 560
  const int64_t attn_scales = 1 * 2 + 2 * 1 + 1 * 2 + 2 * 1 + 2 * 1;                  // 10
  // Dense MLP [384, 200] x2 + [200, 384]; scales [3,2] x2 + [2,3].
  const int64_t dense_linear = 3 * 384 * 200;  // 230,400
  const int64_t dense_scales = 6 + 6 + 6;
  // Expert gate/up [64, 200] (scale [1, 2]), down [200, 64] (scale [2, 1]).
  const int64_t expert_linear = 3 * 64 * 200;  // 38,400 per expert
  const int64_t expert_scales = 2 + 2 + 2;
  const int64_t router = 4 * 200;  // BF16
  const int64_t bias = 4;          // F32
  const int64_t mtp_extras_bf16 = 300 * 200 + 200 + 200 + 200 * 400 + 200 + 300 * 200;

  // Input bytes: FP8 = 1 byte, scales F32 = 4, norms/router BF16 = 2, bias F32 = 4.
  const int64_t attn_in = attn_linear + 4 * attn_scales + 2 * attn_norms;
  EXPECT_EQ(report.layers[0].input_bytes, attn_in + dense_linear + 4 * dense_scales);
  const int64_t moe_in = attn_in + 2 * router + 4 * bias +
                         5 * (expert_linear + 4 * expert_scales);  // 4 routed + 1 shared
  EXPECT_EQ(report.layers[1].input_bytes, moe_in);
  EXPECT_EQ(report.layers[2].input_bytes, moe_in + 2 * mtp_extras_bf16);

  // Output bytes (per-channel): quantized expert gate/up [64, 200]: 64*25*4 + 64*1*2 + 16 =
  // 6,544; down [200, 64]: 200*8*4 + 200*1*2 + 16 = 6,816. Everything else BF16 (F32 bias stays
  // F32).
  const int64_t expert_out = 2 * 6544 + 6816;  // 19,904
  const int64_t attn_out = 2 * (attn_linear + attn_norms);
  EXPECT_EQ(report.layers[0].output_bytes, attn_out + 2 * dense_linear);
  const int64_t moe_out = attn_out + 2 * router + 4 * bias + 4 * expert_out + 2 * expert_linear;
  EXPECT_EQ(report.layers[1].output_bytes, moe_out);
  EXPECT_EQ(report.layers[2].output_bytes, moe_out + 2 * mtp_extras_bf16);
  const int64_t model_level = 2 * (300 * 200 + 200 + 300 * 200);
  EXPECT_EQ(report.estimate.output_bytes,
            model_level + report.layers[0].output_bytes + 2 * moe_out + 2 * mtp_extras_bf16);

  // Ranks: 4 experts over 3 ranks = 2, 1, 1; 8 sequences = 3, 3, 2.
  ASSERT_EQ(report.ranks.size(), 3u);
  EXPECT_EQ(report.ranks[0].first_expert, 0);
  EXPECT_EQ(report.ranks[0].num_experts, 2);
  EXPECT_EQ(report.ranks[1].first_expert, 2);
  EXPECT_EQ(report.ranks[1].num_experts, 1);
  EXPECT_EQ(report.ranks[2].first_expert, 3);
  EXPECT_EQ(report.ranks[2].num_experts, 1);
  EXPECT_EQ(report.ranks[0].num_sequences, 3);
  EXPECT_EQ(report.ranks[1].num_sequences, 3);
  EXPECT_EQ(report.ranks[2].num_sequences, 2);

  // Replicated: the MTP layer is the largest (attention + MoE non-routed + extras).
  const int64_t replicated =
      2 * (attn_linear + attn_norms + router + bias + expert_linear + mtp_extras_bf16);
  const int64_t scores = 16 * 16 * 4 * 4;  // S^2 * min(heads = 4, 16) * 4
  // Routed rows (gang of 3, top-2 of 4 experts, 8 x 16 tokens in all): sent tokens * 2, received
  // ceil(8 * 16 * 2 * experts / 4), overwritten by the experts' outputs; one pass solves every
  // expert.
  // Attention temporaries per token: 2 * (2 * q_lora 96 + 4 * heads 4 * 48 + 4 * (32 + 32)
  // + 2 * 4 * 32 + 4 * H 200) = 4,544 bytes; routing: router scores 4 experts * 4 * 4 and the
  // fp32 input, 200 * 4 bytes a token (every token in one segment and one block here). The
  // propagation holds one round's routed output (one round: all of the rank's tokens).
  auto gpu = [&](int64_t experts, int64_t sequences, int64_t dispatch, bool one_round) {
    const int64_t tokens = sequences * 16;
    const int64_t t = tokens * 200 * 2;
    const int64_t square = 200 * 200 + 64 * 64;
    const int64_t solve = experts * square * 4 * 2 + experts * square * 8 +
                          2 * experts * 64 * 200 * 18;
    const int64_t routing = tokens * 4 * 4 * 4 + tokens * 200 * 4;
    const int64_t phase =
        std::max({tokens * 4544 + scores, routing, dispatch + experts * square * 4,
                  solve + (one_round ? dispatch : 0), t + dispatch});
    return replicated + experts * 3 * 64 * 200 * 2 + t + phase + kDeviceOverheadBytes;
  };
  auto one_round = [](int64_t experts, int64_t sequences) {
    return (sequences * 16 * 2 + 64 * experts) * 200 * 2;
  };
  EXPECT_EQ(report.ranks[0].gpu_bytes, gpu(2, 3, one_round(2, 3), true));
  EXPECT_EQ(report.ranks[1].gpu_bytes, gpu(1, 3, one_round(1, 3), true));
  EXPECT_EQ(report.ranks[2].gpu_bytes, gpu(1, 2, one_round(1, 2), true));
  // Host (plan.h host(r)): the hidden states (kHiddenCopiesOnHost copies), the layer file's tensors
  // twice (rank 0 also writes the non-expert ones), the rank's mapped checkpoint bytes twice (the
  // MTP layer is the largest), the calibration ids (8 x 16 int32 for the whole set, int64 for the
  // rank's) and routing (top-2: 2 x 32 bytes a token).
  const int64_t expert_in = expert_linear + 4 * expert_scales;
  const int64_t others_in = report.layers[2].input_bytes - 4 * expert_in;
  const int64_t others_out = report.layers[2].output_bytes - 4 * expert_out;
  // On a GPU a quantized linear's packed weight and scales are held in page-locked copies, each
  // rounded up to a power of two: gate/up 6,400 -> 8,192 and 128 bytes, down 6,400 -> 8,192 and
  // 400 -> 512 bytes (+16 for weight_shape).
  const int64_t expert_held = 2 * (8192 + 128 + 16) + (8192 + 512 + 16);  // 25,392
  // The hidden states too: one forward call's tensor (all of a rank's 2 or 3 sequences of 16
  // tokens) rounded up to a power of two, 19,200 -> 32,768 and 12,800 -> 16,384 bytes.
  // On a GPU the next layer is staged in page-locked slabs, each tensor 4 KiB-aligned.
  StoredTensors tiny;
  for (const Spec& t : TinyTensors(d, true, true)) {
    int64_t n = t.dtype == "F32" ? 4 : t.dtype == "BF16" ? 2 : 1;
    for (int64_t e : t.shape) n *= e;
    tiny[t.name] = {t.dtype == "F32" ? DType::kF32 : DType::kBF16, n};
  }
  auto host = [&](int rank, int64_t experts, int64_t sequences, bool gpu = true) {
    const int64_t tokens = sequences * 16;
    const int64_t out =
        (rank == 0 ? others_out : 0) + experts * (gpu ? expert_held : expert_out);
    const int first = rank == 0 ? 0 : rank + 1;
    const int64_t in = others_in + experts * expert_in +
                       (gpu ? StagingSlack(tiny, 2, first, static_cast<int>(experts)) : 0);
    const int64_t hidden = gpu ? (sequences == 3 ? 32768 : 16384) : tokens * 200 * 2;
    // One layer's mapped bytes, and rank 0's unquantized tensors read again by the write.
    return hidden * kHiddenCopiesOnHost + 2 * out + in + (rank == 0 ? others_in : 0) + 8 * 16 * 4 +
           tokens * 8 + tokens * 2 * 32 + kPinnedStagingBytes + kHostOverheadBytes;
  };
  EXPECT_EQ(report.ranks[0].host_bytes, host(0, 2, 3));
  EXPECT_EQ(report.ranks[1].host_bytes, host(1, 1, 3));
  EXPECT_EQ(report.ranks[2].host_bytes, host(2, 1, 2));
  EXPECT_EQ(report.estimate.gpu_bytes_per_rank, gpu(2, 3, one_round(2, 3), true));
  EXPECT_EQ(report.estimate.host_bytes_per_rank, host(0, 2, 3));
  // On a CPU the device's working set is host memory too.
  InspectRequest on_host = request;
  on_host.device_is_host = true;
  EXPECT_EQ(InspectCheckpoint(on_host).ranks.at(2).host_bytes,
            host(2, 1, 2, /*gpu=*/false) + gpu(1, 2, one_round(1, 2), true) -
                kDeviceOverheadBytes);
  EXPECT_EQ(report.estimate.scratch_bytes_per_rank, 48 * 200 * 4);
  EXPECT_EQ(report.estimate.calibration_tokens, 128);
  EXPECT_DOUBLE_EQ(report.estimate.tokens_per_expert, 128.0 * 2 / 4);

  // Dispatch rounds of at most 40 tokens over the gang: ceil(128 / 40) = 4 rounds of 2 of the 8
  // sequences; rank 0 sends the rows of at most ceil(3 / 4) = 1 of its sequences per round and
  // receives ceil(2 * 16 * 2 * 2 / 4) = 32 rows for its 2 experts.
  EXPECT_EQ(report.estimate.dispatch_rounds, 1);
  request.dispatch_tokens = 40;
  const InspectReport rounds = InspectCheckpoint(request);
  EXPECT_EQ(rounds.estimate.dispatch_rounds, 4);
  EXPECT_EQ(rounds.ranks.at(0).gpu_bytes, gpu(2, 3, (1 * 16 * 2 + 2 * 32) * 200 * 2, false));
  // More rounds than sequences are not possible: one sequence per round at most.
  request.dispatch_tokens = 1;
  EXPECT_EQ(InspectCheckpoint(request).ranks.at(0).gpu_bytes,
            gpu(2, 3, (1 * 16 * 2 + 2 * 16) * 200 * 2, false));

  // Hidden-state checkpoints: a checkpoint (48 x 200 x 2 bytes) costs far less than the layer,
  // so one after every step but the last (two of three steps: at most two on disk); every 2
  // steps, one; every 3 (the steps), none.
  EXPECT_EQ(report.estimate.checkpoint_every, 1);
  EXPECT_EQ(report.estimate.resume_replay_seconds, 0);
  request.checkpoint_every = 2;
  InspectReport forced = InspectCheckpoint(request);
  EXPECT_EQ(forced.estimate.checkpoint_every, 2);
  EXPECT_EQ(forced.estimate.scratch_bytes_per_rank, 48 * 200 * 2);
  EXPECT_DOUBLE_EQ(forced.estimate.resume_replay_seconds,
                   48 * kSecondsPerToken * kReplayShareOfTokenSeconds);
  request.checkpoint_every = 3;
  forced = InspectCheckpoint(request);
  EXPECT_EQ(forced.estimate.checkpoint_every, 3);
  EXPECT_EQ(forced.estimate.scratch_bytes_per_rank, 0);
  request.checkpoint_every = 1000;  // capped at the steps
  EXPECT_EQ(InspectCheckpoint(request).estimate.checkpoint_every, 3);
}

TEST(InspectTest, AllLinearPlanCountsAndHessians) {
  TempDir dir;
  TinyDims d;
  WriteCheckpoint(dir.path(), TinyConfig(d), TinyTensors(d, true, false), 1);
  InspectRequest request = Request(dir.path());
  request.all_linear = true;
  request.group_size = 0;
  request.gang_size = 1;
  InspectReport report = InspectCheckpoint(request);
  ASSERT_TRUE(report.ok());
  ASSERT_EQ(report.layers.size(), 2u);
  EXPECT_EQ(report.layers[0].num_quantized_linears, 5 + 3);       // attention + dense MLP
  EXPECT_EQ(report.layers[1].num_quantized_linears, 5 + 12 + 3);  // + experts + shared
  // Per-channel dense down_proj [200, 384]: 200*48*4 + 200*1*2 + 16.
  // Layer 0 Hessians (all_linear): attn input 200, q_b 96, kv_b 64, o 128, mlp 200, down 384.
  const int64_t layer0_h = (200 * 200 + 96 * 96 + 64 * 64 + 128 * 128 + 200 * 200 + 384 * 384) * 4;
  // Layer 1: the same attention, shared gate/up input 200, shared down 64: smaller than layer 0.
  const int64_t replicated =
      2 * (96 * 200 + 192 * 96 + 80 * 200 + 256 * 64 + 200 * 128 + 560 + 3 * 384 * 200);
  const int64_t tokens = 8 * 16;
  // A gang of one keeps its routed rows (tokens * top-2), which the experts' outputs overwrite;
  // one pass of 4 experts.
  const int64_t square = 200 * 200 + 64 * 64;
  // The solve is the largest phase (the one round's rows are kept through it).
  EXPECT_EQ(report.ranks.at(0).gpu_bytes, replicated + 4 * 3 * 64 * 200 * 2 + tokens * 200 * 2 +
                                              (tokens * 2) * 200 * 2 + 4 * square * 4 * 2 +
                                              4 * square * 8 + 2 * 4 * 64 * 200 * 18 + layer0_h +
                                              kDeviceOverheadBytes);
  // Passes of 3 experts bound the solve's working set.
  request.experts_per_pass = 3;
  EXPECT_EQ(InspectCheckpoint(request).ranks.at(0).gpu_bytes,
            report.ranks.at(0).gpu_bytes - (square * 4 * 2 + square * 8 + 2 * 64 * 200 * 18));
}

TEST(InspectTest, RoutedExpertsWithPartialGroupsAreRefused) {
  TempDir dir;
  TinyDims d;  // hidden 200, moe_intermediate 64
  d.nextn = 0;
  WriteCheckpoint(dir.path(), TinyConfig(d), TinyTensors(d, true, false), 1);
  InspectRequest r = Request(dir.path());
  r.group_size = 128;
  InspectReport report = InspectCheckpoint(r);
  EXPECT_THAT(Render(report.problems),
              ElementsAre("request.group_size: group_size = 128: the routed experts' "
                          "mlp.experts.*.gate_proj has 200, mlp.experts.*.up_proj has 200, "
                          "mlp.experts.*.down_proj has 64 input columns, not a multiple of 128 (a "
                          "short last group, which vLLM and transformers cannot run; a layer's "
                          "experts share one scheme, so they cannot be left unquantized): use "
                          "group_size -1 (per channel)"));
  EXPECT_THAT(report.layers, IsEmpty());
  // Hidden 256: group 128 still splits down_proj's 64 columns; 64 and 32 fit.
  d.hidden = 256;
  WriteCheckpoint(dir.path(), TinyConfig(d), TinyTensors(d, true, false), 1);
  EXPECT_THAT(Render(InspectCheckpoint(r).problems),
              ElementsAre(HasSubstr("mlp.experts.*.down_proj has 64 input columns, not a "
                                    "multiple of 128")));
  EXPECT_THAT(Render(InspectCheckpoint(r).problems),
              ElementsAre(HasSubstr("use group_size 64, 32 or -1 (per channel)")));
  r.group_size = 64;
  EXPECT_TRUE(InspectCheckpoint(r).ok());
}

TEST(InspectTest, AllLinearLeavesPartialGroupLinearsUnquantized) {
  TempDir dir;
  TinyDims d;
  d.hidden = 256;
  d.moe_inter = 128;  // experts: 256 and 128 input columns
  d.nextn = 0;
  WriteCheckpoint(dir.path(), TinyConfig(d), TinyTensors(d, true, false), 1);
  InspectRequest r = Request(dir.path());
  r.group_size = 128;
  r.all_linear = true;
  InspectReport report = InspectCheckpoint(r);
  ASSERT_THAT(Render(report.problems), IsEmpty());
  // q_b_proj reads q_lora_rank 96 columns, kv_b_proj kv_lora_rank 64: written BF16.
  EXPECT_THAT(Render(report.notes),
              ElementsAre("model.layers.*.self_attn.q_b_proj: left unquantized (BF16, in "
                          "quantization_config.ignore): 96 input columns are not a multiple of "
                          "group_size 128",
                          "model.layers.*.self_attn.kv_b_proj: left unquantized (BF16, in "
                          "quantization_config.ignore): 64 input columns are not a multiple of "
                          "group_size 128"));
  ASSERT_EQ(report.layers.size(), 2u);
  EXPECT_EQ(report.layers[0].num_quantized_linears, 5 - 2 + 3);
  EXPECT_EQ(report.layers[1].num_quantized_linears, 5 - 2 + 12 + 3);
  InspectRequest per_channel = r;
  per_channel.group_size = 0;
  const InspectReport all = InspectCheckpoint(per_channel);
  EXPECT_THAT(all.notes, IsEmpty());
  EXPECT_EQ(all.layers[0].num_quantized_linears, 5 + 3);
  // Routed experts only: nothing to leave out.
  r.all_linear = false;
  EXPECT_THAT(InspectCheckpoint(r).notes, IsEmpty());
}

TEST(InspectTest, MtpDeclaredButAbsent) {
  TempDir dir;
  TinyDims d;  // num_nextn_predict_layers 1
  WriteCheckpoint(dir.path(), TinyConfig(d), TinyTensors(d, true, /*with_mtp=*/false), 2);
  InspectRequest r = Request(dir.path());
  InspectReport report = InspectCheckpoint(r);
  EXPECT_THAT(Render(report.problems), IsEmpty());
  EXPECT_EQ(report.summary.num_nextn_predict_layers, 1);
  EXPECT_EQ(report.summary.num_mtp_layers_present, 0);
  EXPECT_EQ(report.layers.size(), 2u);  // planned without it
  r.include_mtp = true;
  EXPECT_THAT(Render(InspectCheckpoint(r).problems),
              ElementsAre(HasSubstr("model.layers.2: missing MTP layer")));
  WriteCheckpoint(dir.path(), TinyConfig(d), TinyTensors(d, true, /*with_mtp=*/true), 2);
  EXPECT_EQ(InspectCheckpoint(r).summary.num_mtp_layers_present, 1);
}

TEST(PlanTest, PartialGroupLinears) {
  DeepseekV3Config c;
  c.hidden_size = 256;
  c.intermediate_size = 192;
  c.moe_intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.num_attention_heads = 2;
  c.q_lora_rank = 96;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  c.vocab_size = 300;
  auto modules = [&c](int64_t g, bool all_linear) {
    std::vector<std::string> out;
    for (const PartialGroupLinear& p : PartialGroupLinears(c, g, all_linear)) {
      out.push_back(absl::StrCat(p.module, ":", p.in_features, p.routed_expert ? ":expert" : ""));
    }
    return out;
  };
  EXPECT_THAT(modules(128, true), ElementsAre("self_attn.q_b_proj:96", "self_attn.kv_b_proj:64",
                                              "self_attn.o_proj:64", "mlp.down_proj:192"));
  EXPECT_THAT(modules(128, false), IsEmpty());
  EXPECT_THAT(modules(64, true), ElementsAre("self_attn.q_b_proj:96"));
  EXPECT_THAT(modules(32, true), IsEmpty());
  EXPECT_THAT(modules(0, true), IsEmpty());
  c.moe_intermediate_size = 96;
  EXPECT_THAT(modules(64, false), ElementsAre("mlp.experts.*.down_proj:96:expert"));
  EXPECT_THAT(modules(64, true),
              ElementsAre("self_attn.q_b_proj:96", "mlp.experts.*.down_proj:96:expert",
                          "mlp.shared_experts.down_proj:96"));
}

TEST(PlanTest, CheckpointCadence) {
  // A tiny model: a checkpoint (128 tokens x 200 x 2 bytes, 0.03 ms) is far below 3% of the
  // layer (0.7 ms of tokens + 2 experts' solve): every step.
  CheckpointCadence c = ChooseCheckpointCadence(128, 200, 2, 5, 0);
  EXPECT_EQ(c.every, 1);
  EXPECT_EQ(c.checkpoints, 4);  // all but the last step
  EXPECT_EQ(c.bytes, 128 * 200 * 2);
  EXPECT_DOUBLE_EQ(c.resume_seconds, 0);

  // DeepSeek-V3 at 512 x 4096 on one rank: a 30 GB checkpoint (21.8 s) against a 17.0 s layer.
  c = ChooseCheckpointCadence(512 * 4096, 7168, 256, 61, 0);
  EXPECT_EQ(c.bytes, int64_t{512} * 4096 * 7168 * 2);
  EXPECT_DOUBLE_EQ(c.write_seconds, c.bytes / kCheckpointWriteBytesPerSecond);
  EXPECT_DOUBLE_EQ(c.layer_seconds, 512 * 4096 * kSecondsPerToken + 256 * kSolveSecondsPerExpert);
  EXPECT_EQ(c.every, 43);
  // The smallest K within the share: 43 is, 42 is not.
  EXPECT_LE(c.write_seconds / c.every, kCheckpointShareOfLayer * c.layer_seconds);
  EXPECT_GT(c.write_seconds / (c.every - 1), kCheckpointShareOfLayer * c.layer_seconds);
  EXPECT_EQ(c.checkpoints, 60 / 43);
  EXPECT_DOUBLE_EQ(c.resume_seconds, 42 * c.replay_seconds);
  EXPECT_NEAR(c.resume_seconds, 300.2, 1);
  // More tokens per rank than the expert solve can hide: a larger cadence; fewer, a smaller one.
  EXPECT_GT(ChooseCheckpointCadence(4 * 512 * 4096, 7168, 256, 61, 0).every, 43);
  EXPECT_LT(ChooseCheckpointCadence(64 * 4096, 7168, 256, 61, 0).every, 43);
  // Without MoE layers (no solve to amortise against): ceil(10.39 us / 0.144 us) = 73 per token,
  // capped at the steps (then no checkpoint is written).
  EXPECT_EQ(ChooseCheckpointCadence(512 * 4096, 7168, 0, 100, 0).every, 73);
  c = ChooseCheckpointCadence(512 * 4096, 7168, 0, 61, 0);
  EXPECT_EQ(c.every, 61);
  EXPECT_EQ(c.checkpoints, 0);
  c = ChooseCheckpointCadence(512 * 4096, 7168, 0, 10, 0);
  EXPECT_EQ(c.every, 10);
  EXPECT_EQ(c.checkpoints, 0);

  // A forced cadence replaces the model's, capped at the steps.
  EXPECT_EQ(ChooseCheckpointCadence(128, 200, 2, 5, 2).every, 2);
  EXPECT_EQ(ChooseCheckpointCadence(512 * 4096, 7168, 256, 61, 1).every, 1);
  EXPECT_EQ(ChooseCheckpointCadence(512 * 4096, 7168, 256, 61, 1).checkpoints, 60);
  EXPECT_EQ(ChooseCheckpointCadence(128, 200, 2, 5, 99).every, 5);
  // Degenerate inputs stay in bounds.
  EXPECT_EQ(ChooseCheckpointCadence(0, 7168, 0, 61, 0).every, 1);
  EXPECT_EQ(ChooseCheckpointCadence(128, 200, 2, 0, 0).every, 1);
  EXPECT_EQ(ChooseCheckpointCadence(128, 200, 2, 0, 0).checkpoints, 0);
  c = ChooseCheckpointCadence(std::numeric_limits<int64_t>::max(), 7168, 0, 61, 0);
  EXPECT_GE(c.every, 1);
  EXPECT_LE(c.every, 61);

  // Which steps checkpoint: after every `every` steps, never the last.
  std::vector<int> steps;
  for (int s = 0; s < 6; ++s) {
    if (IsCheckpointStep(s, 6, 2)) steps.push_back(s);
  }
  EXPECT_THAT(steps, ElementsAre(1, 3));
  steps.clear();
  for (int s = 0; s < 6; ++s) {
    if (IsCheckpointStep(s, 6, 1)) steps.push_back(s);
  }
  EXPECT_THAT(steps, ElementsAre(0, 1, 2, 3, 4));
  EXPECT_FALSE(IsCheckpointStep(0, 1, 1));
  EXPECT_TRUE(IsCheckpointStep(2, 6, 3));
  EXPECT_FALSE(IsCheckpointStep(5, 6, 3));  // the last step
  EXPECT_FALSE(IsCheckpointStep(1, 6, 0));
}

TEST(PlanTest, DispatchRounds) {
  EXPECT_EQ(DispatchRounds(128, 8, 40), 4);      // ceil(128 / 40)
  EXPECT_EQ(DispatchRounds(128, 8, 1), 8);       // at most one round per sequence
  EXPECT_EQ(DispatchRounds(128, 8, 1000), 1);
  EXPECT_EQ(DispatchRounds(128, 8, 0), 1);       // 0: everything at once
  EXPECT_EQ(DispatchRounds(0, 0, 40), 1);
  EXPECT_EQ(DispatchRounds(std::numeric_limits<int64_t>::max(), 1 << 20, 2), 1 << 20);
}

// The real DeepSeek-V3 (61 layers + MTP present in the checkpoint but not planned), 512 x 4096
// calibration, gang 8, G = 128, experts only, from an ideal FP8 checkpoint (FORMATS.md §2.2).
// These numbers document the formulas in plan.h at full scale (cross-checked with an
// independent Python transcription of the formulas):
//   output  = 371,407,749,120 bytes (~371.4 GB: 337.2 GB int4 experts with BF16 group scales,
//             the rest BF16: embeddings, lm_head, attention, dense MLPs, shared experts, routers)
//   gpu     =  31,902,826,496 bytes per rank (~31.9 GB: 1.17 GB replicated dense layer,
//             2.8 GB bf16 weights of 32 experts, 3.76 GB u of 64 x 4096 tokens, and the largest
//             phase, the solve of one pass of 16 experts, 19.9 GB: Hessians and factors 7.1 GB,
//             fp64 chunk 4 GiB, solve buffers 8.5 GB; the attention phase's chunk temporaries
//             and scores come to 7.5 GB, the routed rows of one of 32 dispatch rounds to
//             2.8 GB, routing a segment at a time to 0.2 GB);
//             122,097,139,712 bytes (~122.1 GB, more than an 80 GB card) with the whole layer's
//             rows dispatched at once (dispatch_tokens = 0: 90.2 GB of routed rows, kept through
//             the solve)
//   host    =  18,880,157,120 bytes per rank (rank 0: 3 x 3.76 GB hidden states, 2 x 1.2 GB
//             layer file tensors (32 experts' int4 and the BF16 rest),
//             2 x 1.6 GB mapped checkpoint bytes (the MoE layer's non-expert tensors and 32
//             experts, FP8), 46 MB ids and routing, 0.25 GiB pinned staging, 1.5 GiB overhead)
//   scratch =   3,758,096,384 bytes per rank (one checkpoint of 64 x 4096 x 7168 x 2 bytes, every
//             43 layers: 3.76 GB take 2.7 s to write against a 2.1 s layer)
// The real DeepSeek-V3 config (671B).
DeepseekV3Config DeepseekV3() {
  DeepseekV3Config c;
  c.model_type = "deepseek_v3";
  c.vocab_size = 129280;
  c.hidden_size = 7168;
  c.intermediate_size = 18432;
  c.moe_intermediate_size = 2048;
  c.num_hidden_layers = 61;
  c.num_nextn_predict_layers = 1;
  c.first_k_dense_replace = 3;
  c.n_routed_experts = 256;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.topk_method = "noaux_tc";
  c.num_attention_heads = 128;
  c.num_key_value_heads = 128;
  c.q_lora_rank = 1536;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  return c;
}

// Ideal FP8 checkpoint: linears F8_E4M3 + F32 scales, router/norms BF16, bias F32.
StoredTensors IdealFp8(const DeepseekV3Config& c) {
  StoredTensors stored;
  for (const ExpectedTensor& t : ExpectedInventory(c, 1)) {
    int64_t n = 1;
    for (int64_t x : t.shape) n *= x;
    const bool fp8 = t.role == TensorRole::kLinear && t.name.find("eh_proj") == std::string::npos;
    if (fp8) {
      stored[t.name] = {DType::kF8E4M3, n};
      const std::vector<int64_t> s = ScaleInvShape(t.shape);
      stored[ScaleInvName(t.name)] = {DType::kF32, s[0] * s[1] * 4};
    } else if (t.role == TensorRole::kRouterBias) {
      stored[t.name] = {DType::kF32, n * 4};
    } else {
      stored[t.name] = {DType::kBF16, n * 2};
    }
  }
  return stored;
}

TEST(PlanTest, DeepseekV3FullScaleSanity) {
  const DeepseekV3Config c = DeepseekV3();
  const StoredTensors stored = IdealFp8(c);
  InspectRequest request;
  request.gang_size = 8;
  request.group_size = 128;
  request.num_calibration_samples = 512;
  request.max_sequence_length = 4096;
  JobPlan plan = PlanJob(c, request, stored);
  ASSERT_EQ(plan.layers.size(), 61u);
  EXPECT_EQ(plan.layers[0].kind, LayerKind::kDense);
  EXPECT_EQ(plan.layers[3].kind, LayerKind::kMoe);
  EXPECT_EQ(plan.layers[3].num_quantized_linears, 768);
  EXPECT_EQ(plan.layers[0].input_bytes, 583642336);
  EXPECT_EQ(plan.layers[3].input_bytes, 11511947488);
  EXPECT_EQ(plan.ranks.size(), 8u);
  EXPECT_EQ(plan.ranks[7].first_expert, 224);
  EXPECT_EQ(plan.ranks[7].num_experts, 32);
  EXPECT_EQ(plan.ranks[7].num_sequences, 64);
  EXPECT_EQ(plan.estimate.output_bytes, 371407749120);
  // Rank 7: dense layer 0's replicated tensors (the largest), 32 experts, u of 262144 tokens,
  // and the solve of a pass of 16 experts (the largest phase with 32 dispatch rounds).
  const int64_t replicated = 2 * 583483392LL;
  const int64_t experts = 32LL * 3 * 2048 * 7168 * 2;
  const int64_t u = 262144LL * 7168 * 2;
  const int64_t square = 7168LL * 7168 + 2048 * 2048;
  const int64_t solve =
      16 * square * 8 + (int64_t{4} << 30) + 2LL * 16 * 2048 * 7168 * 18;  // passes of 16
  EXPECT_EQ(plan.estimate.gpu_bytes_per_rank,
            replicated + experts + u + solve + kDeviceOverheadBytes);
  EXPECT_EQ(plan.estimate.gpu_bytes_per_rank, 31902826496);
  // Host: the hidden states, then (rank 0) 2 x layer file tensors, one MoE layer's mapped
  // checkpoint bytes and the dense layer's (written unquantized, so read again by its write),
  // ids, routing, staging and overhead (6,777,758,144 bytes: 6,570,140,096 plus the pinned
  // copies' rounding, 7 MiB -> 8 MiB per packed weight and 224 -> 256 KiB per scale tensor, for
  // 2 x 96 linears). The hidden states are page-locked per forward call of 4 sequences
  // (16,384 tokens: 224 MiB, rounded to 256 MiB), 16 calls a copy.
  const int64_t hidden_copy = 16 * (int64_t{256} << 20);
  EXPECT_GT(hidden_copy, u);
  // The next MoE layer is staged in page-locked slabs: their rounding comes on top (rank 0).
  EXPECT_EQ(plan.estimate.host_bytes_per_rank,
            hidden_copy * kHiddenCopiesOnHost + 6777758144 + StagingSlack(stored, 3, 0, 32));
  EXPECT_EQ(plan.estimate.scratch_bytes_per_rank, 3758096384);
  EXPECT_EQ(plan.estimate.calibration_tokens, 2097152);
  EXPECT_DOUBLE_EQ(plan.estimate.tokens_per_expert, 65536.0);
  EXPECT_EQ(plan.estimate.dispatch_rounds, 32);
  EXPECT_EQ(plan.estimate.checkpoint_every, 43);
  EXPECT_NEAR(plan.estimate.resume_replay_seconds,
              42 * 262144 * kSecondsPerToken * kReplayShareOfTokenSeconds, 1e-6);
  // Projected time on 8 H200s: per MoE layer 64 x 4096 tokens and 32 experts a rank, the layer
  // staged ahead of its load.
  const double moe_compute = 11511947488.0 / 8 / kStagedLoadBytesPerSecond +
                             262144 * kSecondsPerToken + 32 * kSolveSecondsPerExpert;
  EXPECT_GT(plan.estimate.seconds_per_layer, moe_compute * 0.9);
  EXPECT_GT(plan.estimate.total_seconds, 58 * moe_compute);
  EXPECT_LT(plan.estimate.total_seconds, 61 * 20.0);
  EXPECT_NEAR(plan.estimate.seconds_per_layer * 61, plan.estimate.total_seconds, 1e-6);
  request.dispatch_tokens = 0;
  // One round: rank 7 sends 262144 * 8 rows and receives 512 * 4096 * 8 * 32 / 256 (which the
  // experts' outputs overwrite), all kept through the solve.
  const int64_t dispatch = (262144LL * 8 + 2097152LL) * 7168 * 2;
  EXPECT_EQ(PlanJob(c, request, stored).estimate.gpu_bytes_per_rank,
            replicated + experts + u + solve + dispatch + kDeviceOverheadBytes);
  EXPECT_EQ(PlanJob(c, request, stored).estimate.dispatch_rounds, 1);
  // A gang of one at the same calibration: the three hidden-state copies take 3 x 28.5 GiB of
  // page-locked slabs (14 of 2 GiB and one of 512 MiB each, for 28 GiB of tensors), and the
  // whole host estimate fits the 128 GiB of the one-H200 machine.
  request.gang_size = 1;
  request.dispatch_tokens = 65536;
  const JobPlan alone = PlanJob(c, request, stored);  // 131,825,019,328 bytes (122.8 GiB)
  EXPECT_GT(alone.estimate.host_bytes_per_rank, 3 * (int64_t{57} << 29));
  EXPECT_LT(alone.estimate.host_bytes_per_rank, int64_t{128} << 30);
}

// The next layer's weights are preloaded where the job's settings leave room for them: on eight
// H200s for DeepSeek-V3 at 512 x 4096 with 16 experts a pass and 65,536 tokens a round, at the
// cost of a second layer's weights in the estimate and without the loads after the first in the
// projected time. Settings the plan chooses (fewest expert passes, then fewest dispatch rounds)
// fill the device first; what is left may still hold the next layer.
TEST(PlanJob, PreloadsTheNextLayerWhereTheDeviceHasRoom) {
  const DeepseekV3Config c = DeepseekV3();
  const StoredTensors stored = IdealFp8(c);
  constexpr int64_t kH200 = 150754820096;
  InspectRequest request;
  request.gang_size = 8;
  request.group_size = 128;
  request.num_calibration_samples = 512;
  request.max_sequence_length = 4096;
  request.experts_per_pass = 16;
  request.dispatch_tokens = 65536;
  request.device_memory_bytes = kH200;
  const JobPlan on = PlanJob(c, request, stored);
  request.preload_next_layer = false;
  const JobPlan off = PlanJob(c, request, stored);
  EXPECT_TRUE(on.estimate.preload_next_layer);
  EXPECT_FALSE(off.estimate.preload_next_layer);
  EXPECT_EQ(on.estimate.experts_per_pass, off.estimate.experts_per_pass);
  EXPECT_EQ(on.estimate.dispatch_tokens, off.estimate.dispatch_tokens);
  // The next layer's weights (dense layer 0's replicated tensors, the largest, and 32 experts)
  // in the phases after attention.
  const int64_t weights = 2 * 583483392LL + 32LL * 3 * 2048 * 7168 * 2;
  EXPECT_EQ(on.estimate.gpu_bytes_per_rank, off.estimate.gpu_bytes_per_rank + weights);
  EXPECT_LE(on.estimate.gpu_bytes_per_rank, kH200 * (1 - kDeviceMemoryMargin));
  // 60 loads fewer on the critical path, each of a staged layer (the write of the layer before
  // can still set the pace).
  double loads = 0;
  for (size_t i = 1; i < on.layers.size(); ++i) {
    loads += static_cast<double>(on.layers[i].input_bytes) / 8 / kStagedLoadBytesPerSecond;
  }
  EXPECT_LT(on.estimate.total_seconds, off.estimate.total_seconds);
  EXPECT_GE(on.estimate.total_seconds, off.estimate.total_seconds - loads - 1e-6);
  // Chosen settings: eight H200s take all of a rank's experts in one pass and one dispatch round
  // and still have room for the next layer's weights; one H200 fills its memory with the passes
  // (64 experts a pass), so no preload there.
  request.preload_next_layer = true;
  request.experts_per_pass = kChooseSetting;
  request.dispatch_tokens = kChooseSetting;
  for (int gang : {8, 1}) {
    request.gang_size = gang;
    const JobPlan chosen = PlanJob(c, request, stored);
    EXPECT_EQ(chosen.estimate.preload_next_layer, gang == 8) << gang;
    EXPECT_EQ(chosen.estimate.expert_passes == 1 && chosen.estimate.dispatch_rounds == 1, gang == 8)
        << gang;
    EXPECT_LE(chosen.estimate.gpu_bytes_per_rank, kH200 * (1 - kDeviceMemoryMargin)) << gang;
    // The projections README.md quotes (512 x 4096, GPTQ, H200s): DeepSeek-V3, then Kimi-K2's
    // dimensions (384 experts, 64 heads, one dense layer, its vocabulary).
    DeepseekV3Config kimi = c;
    kimi.model_type = "kimi_k2";
    kimi.n_routed_experts = 384;
    kimi.num_attention_heads = kimi.num_key_value_heads = 64;
    kimi.first_k_dense_replace = 1;
    kimi.n_group = kimi.topk_group = 1;
    kimi.vocab_size = 163840;
    const JobPlan k2 = PlanJob(kimi, request, IdealFp8(kimi));
    for (const auto& [name, p] : {std::pair{"DeepSeek-V3", &chosen}, std::pair{"Kimi-K2", &k2}}) {
      std::cout << "projected: " << name << " on " << gang
                << " H200: " << p->estimate.seconds_per_layer << " s a layer, "
                << p->estimate.total_seconds << " s\n";
    }
    EXPECT_GT(k2.estimate.total_seconds, chosen.estimate.total_seconds) << gang;
  }
  request.experts_per_pass = 16;
  request.dispatch_tokens = 65536;
  // Not on the CPU, for an unknown device, or for one layer.
  request.gang_size = 8;
  request.device_is_host = true;
  request.device_memory_bytes = int64_t{2} << 40;
  EXPECT_FALSE(PlanJob(c, request, stored).estimate.preload_next_layer);
  request.device_is_host = false;
  request.device_memory_bytes = 0;
  EXPECT_FALSE(PlanJob(c, request, stored).estimate.preload_next_layer);
  request.device_memory_bytes = kH200;
  DeepseekV3Config single = c;
  single.num_hidden_layers = 1;
  const JobPlan one = PlanJob(single, request, IdealFp8(single));
  ASSERT_EQ(one.layers.size(), 1u);
  EXPECT_FALSE(one.estimate.preload_next_layer);
}

// A plan of one MoE layer: its step is neither propagated nor followed by a prefetch, so the host
// holds two copies of the hidden states and the layer's mapped bytes once (for one full-width
// layer at 512 x 4096 on one H200 this came within +1.0% of the worker's measured peak RSS).
// With two layers, a third copy, and the first layer's unquantized tensors, mapped again by its
// write while the second layer's bytes are.
TEST(PlanJob, OneLayerHoldsTwoHiddenCopiesAndItsBytesOnce) {
  DeepseekV3Config c = DeepseekV3();
  c.first_k_dense_replace = 0;
  InspectRequest request;
  request.gang_size = 1;
  request.num_calibration_samples = 512;
  request.max_sequence_length = 4096;
  request.device_memory_bytes = 150754820096;
  c.num_hidden_layers = 2;
  const JobPlan two = PlanJob(c, request, IdealFp8(c));
  c.num_hidden_layers = 1;
  const JobPlan one = PlanJob(c, request, IdealFp8(c));
  ASSERT_EQ(one.layers.size(), 1u);
  ASSERT_EQ(two.layers.size(), 2u);
  const int64_t hidden_copy = 14 * (int64_t{2} << 30) + (int64_t{512} << 20);  // 28.5 GiB
  // 256 experts of three 2048 x 7168 FP8 matrices, each with 16 x 56 fp32 block scales.
  const int64_t experts = int64_t{256} * 3 * (2048 * 7168 + 16 * 56 * 4);
  // With two steps the second layer is staged ahead of its load, in page-locked slabs.
  EXPECT_EQ(
      two.estimate.host_bytes_per_rank - one.estimate.host_bytes_per_rank,
      hidden_copy + one.layers[0].input_bytes - experts + StagingSlack(IdealFp8(c), 0, 0, 256));
}

// Settings chosen for the device (plan.h ChooseSettings), on DeepSeek-V3 cut to its three dense
// layers and one MoE layer, 128 x 4096 calibration tokens, a gang of one.
class ChosenSettingsTest : public ::testing::Test {
 protected:
  static constexpr int64_t kH200 = 150754820096;  // 143,771 MiB (nvidia-smi)
  static constexpr int64_t kH100 = 85520809984;   // 81,559 MiB: too small for this job
  static constexpr int64_t k100GiB = int64_t{100} << 30;
  static constexpr int64_t kTokens = 128 * 4096;

  ChosenSettingsTest() : config_(DeepseekV3()) {
    config_.num_hidden_layers = 4;
    stored_ = IdealFp8(config_);
    request_.gang_size = 1;
    request_.num_calibration_samples = 128;
    request_.max_sequence_length = 4096;
    request_.experts_per_pass = kChooseSetting;
    request_.dispatch_tokens = kChooseSetting;
  }

  JobPlan Plan(int64_t device_memory, int64_t experts_per_pass = kChooseSetting,
               int64_t dispatch_tokens = kChooseSetting) const {
    InspectRequest r = request_;
    r.device_memory_bytes = device_memory;
    r.experts_per_pass = experts_per_pass;
    r.dispatch_tokens = dispatch_tokens;
    return PlanJob(config_, r, stored_);
  }
  static int64_t Budget(int64_t device_memory) {
    return static_cast<int64_t>(static_cast<double>(device_memory) * (1 - kDeviceMemoryMargin));
  }
  // The estimate with the given settings.
  int64_t Gpu(int64_t experts_per_pass, int64_t dispatch_tokens) const {
    return Plan(0, experts_per_pass, dispatch_tokens).estimate.gpu_bytes_per_rank;
  }
  // Checks that `e` fits `device_memory` and that one pass or one round fewer would not.
  void ExpectFewestThatFit(const ResourceEstimate& e, int64_t device_memory) const {
    EXPECT_LE(e.gpu_bytes_per_rank, Budget(device_memory));
    EXPECT_EQ(e.gpu_bytes_per_rank, Gpu(e.experts_per_pass, e.dispatch_tokens));
    const int64_t n = e.expert_passes, m = e.dispatch_rounds;
    if (n > 1) {  // n - 1 passes do not fit even with a sequence per round
      const int64_t per_pass = n - 1 == 1 ? 0 : (256 + n - 2) / (n - 1);
      EXPECT_GT(Gpu(per_pass, 4096), Budget(device_memory)) << n;
    }
    if (m > 1) {  // with these passes, m - 1 rounds do not fit
      const int64_t tokens = m - 1 == 1 ? 0 : (kTokens + m - 2) / (m - 1);
      EXPECT_GT(Gpu(e.experts_per_pass, tokens), Budget(device_memory)) << m;
    }
  }

  DeepseekV3Config config_;
  StoredTensors stored_;
  InspectRequest request_;
};

TEST_F(ChosenSettingsTest, AHugeDeviceTakesOnePassAndOneRound) {
  const int64_t huge = int64_t{1} << 50;
  const JobPlan plan = Plan(huge);
  const ResourceEstimate& e = plan.estimate;
  EXPECT_EQ(e.experts_per_pass, 0);  // all
  EXPECT_EQ(e.dispatch_tokens, 0);   // all
  EXPECT_EQ(e.expert_passes, 1);
  EXPECT_EQ(e.dispatch_rounds, 1);
  EXPECT_TRUE(e.experts_per_pass_chosen);
  EXPECT_TRUE(e.dispatch_tokens_chosen);
  EXPECT_EQ(e.device_memory_bytes, huge);
  // Room for the next layer's weights too: the three dense layers' largest replicated tensors
  // and the MoE layer's 256 experts.
  EXPECT_TRUE(e.preload_next_layer);
  EXPECT_EQ(e.gpu_bytes_per_rank, Gpu(0, 0) + 2 * 583483392LL + 256LL * 3 * 2048 * 7168 * 2);
  EXPECT_THAT(plan.notes, IsEmpty());
}

TEST_F(ChosenSettingsTest, SmallerDevicesTakeMorePassesThenMoreRounds) {
  const ResourceEstimate h200 = Plan(kH200).estimate;
  const ResourceEstimate smaller = Plan(k100GiB).estimate;
  // 128 x 4096 tokens do not fit an H200 in one pass and one round (the routed rows alone are
  // 2 x 8 x 524,288 x 7168 x 2 bytes = 120 GB at once).
  EXPECT_GT(h200.expert_passes * 1000 + h200.dispatch_rounds, 1001);
  ExpectFewestThatFit(h200, kH200);
  ExpectFewestThatFit(smaller, k100GiB);
  EXPECT_TRUE(smaller.expert_passes > h200.expert_passes ||
              (smaller.expert_passes == h200.expert_passes &&
               smaller.dispatch_rounds > h200.dispatch_rounds))
      << smaller.expert_passes << "/" << smaller.dispatch_rounds << " vs " << h200.expert_passes
      << "/" << h200.dispatch_rounds;
  std::cout << "chosen: H200 " << h200.experts_per_pass << " experts a pass (" << h200.expert_passes
            << " passes), " << h200.dispatch_tokens << " tokens a round (" << h200.dispatch_rounds
            << " rounds); 100 GiB " << smaller.experts_per_pass << " (" << smaller.expert_passes
            << "), " << smaller.dispatch_tokens << " (" << smaller.dispatch_rounds << ")\n";
  // Passes as even as possible: P = ceil(256 / passes).
  if (h200.expert_passes > 1) {
    EXPECT_EQ(h200.experts_per_pass, (256 + h200.expert_passes - 1) / h200.expert_passes);
  }
  // Tokens per round: ceil(T / rounds), and the plan's rounds are the pipeline's count.
  if (h200.dispatch_rounds > 1) {
    EXPECT_EQ(h200.dispatch_tokens, (kTokens + h200.dispatch_rounds - 1) / h200.dispatch_rounds);
  }
  EXPECT_EQ(DispatchRounds(kTokens, 128, h200.dispatch_tokens), h200.dispatch_rounds);
}

TEST_F(ChosenSettingsTest, TheChoiceIsDeterministic) {
  const ResourceEstimate a = Plan(kH200).estimate, b = Plan(kH200).estimate;
  EXPECT_EQ(a.experts_per_pass, b.experts_per_pass);
  EXPECT_EQ(a.dispatch_tokens, b.dispatch_tokens);
  EXPECT_EQ(a.gpu_bytes_per_rank, b.gpu_bytes_per_rank);
  EXPECT_EQ(a.host_bytes_per_rank, b.host_bytes_per_rank);
}

TEST_F(ChosenSettingsTest, GivenSettingsAreKeptEvenWhenTheyDoNotFit) {
  const JobPlan plan = Plan(kH100, 0, 0);
  const ResourceEstimate& e = plan.estimate;
  EXPECT_EQ(e.experts_per_pass, 0);
  EXPECT_EQ(e.dispatch_tokens, 0);
  EXPECT_FALSE(e.experts_per_pass_chosen);
  EXPECT_FALSE(e.dispatch_tokens_chosen);
  EXPECT_EQ(e.expert_passes, 1);
  EXPECT_EQ(e.dispatch_rounds, 1);
  EXPECT_GT(e.gpu_bytes_per_rank, kH100);
  ASSERT_EQ(plan.notes.size(), 1u);
  EXPECT_EQ(plan.notes[0].where, "estimate.gpu_bytes_per_rank");
  EXPECT_THAT(plan.notes[0].message,
              HasSubstr("per rank with experts_per_pass = 0 (all) (as given) and "
                        "dispatch_tokens = 0 (all) (as given) exceeds the 75.67 GiB a rank may "
                        "use of the 79.65 GiB device planned for (95%)"));
  // One given, the other chosen for it: 16 experts a pass, the fewest rounds that fit.
  const ResourceEstimate mixed = Plan(kH200, 16, kChooseSetting).estimate;
  EXPECT_EQ(mixed.experts_per_pass, 16);
  EXPECT_FALSE(mixed.experts_per_pass_chosen);
  EXPECT_TRUE(mixed.dispatch_tokens_chosen);
  EXPECT_EQ(mixed.expert_passes, 16);
  EXPECT_LE(mixed.gpu_bytes_per_rank, Budget(kH200));
  if (mixed.dispatch_rounds > 1) {
    const int64_t m = mixed.dispatch_rounds - 1;
    EXPECT_GT(Gpu(16, m == 1 ? 0 : (kTokens + m - 1) / m), Budget(kH200));
  }
}

TEST_F(ChosenSettingsTest, NothingFitsTakesTheLeastAndSaysSo) {
  const int64_t small = int64_t{16} << 30;  // less than the layer's weights and hidden states
  const JobPlan plan = Plan(small);
  const ResourceEstimate& e = plan.estimate;
  EXPECT_EQ(e.experts_per_pass, 1);
  EXPECT_EQ(e.expert_passes, 256);
  EXPECT_EQ(e.dispatch_tokens, 4096);  // one sequence a round
  EXPECT_EQ(e.dispatch_rounds, 128);
  ASSERT_EQ(plan.notes.size(), 1u);
  EXPECT_THAT(plan.notes[0].message,
              HasSubstr("with experts_per_pass = 1 (the least memory the plan can choose) and "
                        "dispatch_tokens = 4096 (the least memory the plan can choose) exceeds "
                        "the 15.20 GiB a rank may use of the 16.00 GiB device planned for"));
}

// The real calibration size on one 80 GB card: the MoE block's routed output is made one
// dispatch round at a time and routing holds its fp32 scores one segment at a time, so what
// grows with the tokens on the device is u (30 GB at 512 x 4096) and the rounds' routed rows,
// which the plan bounds with more rounds.
TEST_F(ChosenSettingsTest, TheRealCalibrationSizeFitsOneH100) {
  InspectRequest r = request_;
  r.num_calibration_samples = 512;
  r.device_memory_bytes = kH100;
  const JobPlan plan = PlanJob(config_, r, stored_);
  const ResourceEstimate& e = plan.estimate;
  EXPECT_TRUE(plan.notes.empty()) << plan.notes[0].message;
  EXPECT_LE(e.gpu_bytes_per_rank, Budget(kH100));
  EXPECT_GT(e.gpu_bytes_per_rank, int64_t{512} * 4096 * 7168 * 2);  // u, at least
  std::cout << "512 x 4096 on one H100: " << e.experts_per_pass << " experts a pass ("
            << e.expert_passes << " passes), " << e.dispatch_tokens << " tokens a round ("
            << e.dispatch_rounds << " rounds), " << e.gpu_bytes_per_rank / double(1 << 30)
            << " GiB\n";
}

TEST_F(ChosenSettingsTest, AnUnknownDeviceGetsTheFallback) {
  const JobPlan plan = Plan(0);
  EXPECT_EQ(plan.estimate.experts_per_pass, kFallbackExpertsPerPass);
  EXPECT_EQ(plan.estimate.dispatch_tokens, kFallbackDispatchTokens);
  EXPECT_TRUE(plan.estimate.experts_per_pass_chosen);
  EXPECT_EQ(plan.estimate.expert_passes, 16);
  EXPECT_EQ(plan.estimate.dispatch_rounds, 8);
  EXPECT_THAT(plan.notes, IsEmpty());
}

TEST_F(ChosenSettingsTest, OnTheCpuTheRestOfHostMemoryCounts) {
  // The same memory as host memory fits less: the host estimate shares it.
  request_.device_is_host = true;
  const JobPlan host = Plan(kH200);
  request_.device_is_host = false;
  const JobPlan device = Plan(kH200);
  EXPECT_TRUE(host.estimate.expert_passes > device.estimate.expert_passes ||
              host.estimate.dispatch_rounds > device.estimate.dispatch_rounds);
  EXPECT_LE(host.estimate.host_bytes_per_rank, kH200);
}

}  // namespace
}  // namespace mq::model
