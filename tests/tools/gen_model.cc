// mq-gen-model: writes a random DeepseekV3-architecture checkpoint in the real Hugging Face
// layout (config.json, model-XXXXX-of-YYYYY.safetensors shards, model.safetensors.index.json),
// FP8 block-quantized (F8_E4M3 + F32 weight_scale_inv, 128x128 blocks) or BF16, with optional
// defects for tests. The output depends only on the flags and --seed: every tensor draws from
// its own PRNG stream seeded by (seed, tensor name), so it is also independent of sharding.
//
// --kimi writes a Kimi-K2-shaped checkpoint instead: model_type kimi_k2 and Kimi-K2's config keys
// (384 experts, n_group = topk_group = 1, 8 experts per token, one dense layer, routed scaling
// 2.827, unless flags say otherwise) and its tokenizer files: tiktoken.model (the 256 bytes and
// 225 two-byte merges), tokenizer_config.json (special tokens from id 481) and a placeholder
// tokenization_kimi.py. --header-only writes every shard's real safetensors header but no tensor
// data: the file is extended to its full size as a sparse file (no disk used), so checkpoints
// of real dimensions (DeepSeek-V3, Kimi-K2) can be inspected and planned.
//
// Command-line tool: tensors are drawn on --threads threads (one tensor per thread at a time;
// the output does not depend on the thread count); all files are written from the main thread
// with the temp + fsync + rename protocol of worker/model/safetensors_writer.h.

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "worker/model/dtype.h"
#include "worker/model/numeric.h"
#include "worker/model/safetensors_writer.h"

namespace mq::tools {
namespace {

using model::DType;
using model::TensorData;

static_assert(std::endian::native == std::endian::little, "writes little-endian tensor data");

constexpr int64_t kBlock = 128;      // FP8 weight_block_size
constexpr float kWeightStd = 0.02f;  // initializer_range
constexpr float kNormStd = 0.02f;    // norms are 1 + N(0, kNormStd)
constexpr float kBiasStd = 0.01f;    // e_score_correction_bias ~ N(0, kBiasStd)

// ---------------------------------------------------------------------------------------------
// Command line.

enum class DefectKind { kMissing, kMissingScale, kWrongShape, kWrongDType };

struct Options {
  std::string output;
  bool fp8 = true;
  bool yarn = true;
  bool kimi = false;         // Kimi-K2 config keys and tiktoken tokenizer files
  bool header_only = false;  // headers + sparse files, no tensor data
  uint64_t seed = 0;
  int64_t layers = 3;
  int64_t dense_layers = 1;
  int64_t experts = 8;
  int64_t experts_per_tok = 2;
  int64_t groups = 2;
  int64_t topk_groups = 1;
  int64_t shared_experts = 1;
  int64_t hidden = 256;
  int64_t intermediate = 512;
  int64_t moe_intermediate = 128;
  int64_t heads = 4;
  int64_t q_lora_rank = 96;
  int64_t kv_lora_rank = 64;
  int64_t qk_nope_dim = 32;
  int64_t qk_rope_dim = 16;
  int64_t v_dim = 32;
  int64_t vocab = 512;
  int64_t mtp = 0;
  int64_t shards = 2;
  int64_t threads = 0;  // 0 = std::thread::hardware_concurrency()
  struct Defect {
    DefectKind kind;
    std::string text;  // as given, "KIND=TENSOR"
    std::string tensor;
  };
  std::vector<Defect> defects;  // in command-line order
};

struct IntFlag {
  const char* name;
  int64_t Options::*field;
  int64_t min;
  int64_t max;
  const char* help;
};

constexpr int64_t kMaxDim = int64_t{1} << 20;

const std::vector<IntFlag>& IntFlags() {
  static const std::vector<IntFlag> flags = {
      {"--layers", &Options::layers, 1, 1024, "num_hidden_layers (default 3)"},
      {"--dense-layers", &Options::dense_layers, 0, 1024,
       "first_k_dense_replace, <= --layers (default 1)"},
      {"--experts", &Options::experts, 1, 4096, "n_routed_experts (default 8)"},
      {"--experts-per-tok", &Options::experts_per_tok, 1, 4096, "num_experts_per_tok (default 2)"},
      {"--groups", &Options::groups, 1, 4096, "n_group, divides --experts (default 2)"},
      {"--topk-groups", &Options::topk_groups, 1, 4096, "topk_group, <= --groups (default 1)"},
      {"--shared-experts", &Options::shared_experts, 0, 64, "n_shared_experts (default 1)"},
      {"--hidden", &Options::hidden, 1, kMaxDim, "hidden_size (default 256)"},
      {"--intermediate", &Options::intermediate, 1, kMaxDim,
       "intermediate_size of dense layers (default 512)"},
      {"--moe-intermediate", &Options::moe_intermediate, 1, kMaxDim,
       "moe_intermediate_size (default 128)"},
      {"--heads", &Options::heads, 1, 1024, "num_attention_heads (default 4)"},
      {"--q-lora-rank", &Options::q_lora_rank, 0, kMaxDim,
       "q_lora_rank; 0 = null and a plain q_proj (default 96)"},
      {"--kv-lora-rank", &Options::kv_lora_rank, 1, kMaxDim, "kv_lora_rank (default 64)"},
      {"--qk-nope-dim", &Options::qk_nope_dim, 1, 4096, "qk_nope_head_dim (default 32)"},
      {"--qk-rope-dim", &Options::qk_rope_dim, 2, 4096, "qk_rope_head_dim, even (default 16)"},
      {"--v-dim", &Options::v_dim, 1, 4096, "v_head_dim (default 32)"},
      {"--vocab", &Options::vocab, 2, int64_t{1} << 24, "vocab_size (default 512)"},
      {"--mtp", &Options::mtp, 0, 16,
       "num_nextn_predict_layers; MTP layers at index num_hidden_layers.. (default 0)"},
      {"--shards", &Options::shards, 1, 1 << 16,
       "number of shard files, <= layers + mtp + 2 (default 2)"},
      {"--threads", &Options::threads, 0, 1024,
       "threads drawing tensors; the output does not depend on it (default 0: one per core)"},
  };
  return flags;
}

constexpr const char* kDefectKinds = "missing, missing-scale, wrong-shape or wrong-dtype";

std::string Usage() {
  std::string out =
      "usage: mq-gen-model --output DIR [flags]\n"
      "Writes a random DeepseekV3 checkpoint (config.json, shards, index) into DIR.\n"
      "  --output DIR            output directory (created if missing; stale\n"
      "                          model-XXXXX-of-YYYYY.safetensors files in it are removed)\n"
      "  --format fp8|bf16       fp8: F8_E4M3 + weight_scale_inv 128x128 (default); bf16\n"
      "  --seed N                PRNG seed, unsigned 64-bit (default 0)\n"
      "  --no-yarn               rope_scaling null (default: DeepSeek-V3 yarn block)\n"
      "  --kimi                  Kimi-K2: model_type kimi_k2, its config keys, tiktoken.model +\n"
      "                          tokenizer_config.json; defaults --experts 384 --groups 1\n"
      "                          --topk-groups 1 --experts-per-tok 8 --dense-layers 1\n"
      "                          --vocab 737 (the tokenizer's; a larger --vocab is allowed)\n"
      "  --header-only           real headers, no tensor data (sparse files of full size)\n";
  for (const IntFlag& f : IntFlags()) {
    out += absl::StrFormat("  %-23s %s\n", absl::StrCat(f.name, " N"), f.help);
  }
  out +=
      "  --defect KIND=TENSOR    repeatable; KIND: missing (leave TENSOR out of shard and\n"
      "                          index), missing-scale (drop TENSOR_scale_inv; TENSOR names an\n"
      "                          FP8 weight), wrong-shape (dim 0 + 1, extra row of zero bytes),\n"
      "                          wrong-dtype (store as F32; an F32 tensor is stored as BF16)\n"
      "  --help                  this text\n";
  return out;
}

[[noreturn]] void UsageError(const std::string& message) {
  std::cerr << "mq-gen-model: " << message << "\n";
  std::exit(2);
}

std::string AllowedFlags() {
  std::vector<std::string> names = {"--output", "--format", "--seed",        "--no-yarn",
                                    "--kimi",   "--defect", "--header-only", "--help"};
  for (const IntFlag& f : IntFlags()) names.push_back(f.name);
  return absl::StrJoin(names, ", ");
}

// Kimi-K2's tokenizer as written by --kimi: 256 single bytes, then every pair of kKimiMergeChars.
constexpr char kKimiMergeChars[] = " etaoinshrdlcum";
constexpr int64_t kKimiRanks = 256 + 15 * 15;
constexpr int64_t kKimiVocab = kKimiRanks + 256;  // + Kimi's 256 reserved special tokens

Options ParseArgs(int argc, char** argv) {
  Options opt;
  bool have_output = false;
  for (int i = 1; i < argc; ++i) {  // --kimi changes the defaults the other flags override
    if (std::string(argv[i]) == "--kimi") {
      opt.kimi = true;
      opt.experts = 384;
      opt.groups = 1;
      opt.topk_groups = 1;
      opt.experts_per_tok = 8;
      opt.dense_layers = 1;
      opt.vocab = kKimiVocab;
    }
  }
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_inline_value = false;
    if (size_t eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_inline_value = true;
    }
    auto take_value = [&]() -> std::string {
      if (has_inline_value) return value;
      if (i + 1 >= argc) UsageError(absl::StrCat(arg, " needs a value"));
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      std::cout << Usage();
      std::exit(0);
    } else if (arg == "--no-yarn") {
      if (has_inline_value) UsageError("--no-yarn takes no value");
      opt.yarn = false;
    } else if (arg == "--kimi") {
      if (has_inline_value) UsageError("--kimi takes no value");
    } else if (arg == "--header-only") {
      if (has_inline_value) UsageError("--header-only takes no value");
      opt.header_only = true;
    } else if (arg == "--output") {
      opt.output = take_value();
      if (opt.output.empty()) UsageError("--output is empty: need a directory path");
      have_output = true;
    } else if (arg == "--format") {
      const std::string v = take_value();
      if (v != "fp8" && v != "bf16") {
        UsageError(absl::StrCat("--format = \"", v, "\": must be fp8 or bf16"));
      }
      opt.fp8 = v == "fp8";
    } else if (arg == "--seed") {
      const std::string v = take_value();
      if (!absl::SimpleAtoi(v, &opt.seed) || v.empty() || v[0] == '-' || v[0] == '+') {
        UsageError(absl::StrCat("--seed = \"", v, "\": must be an integer in [0, 2^64-1]"));
      }
    } else if (arg == "--defect") {
      const std::string v = take_value();
      const size_t eq = v.find('=');
      const std::string kind = v.substr(0, eq);
      const std::string tensor = eq == std::string::npos ? "" : v.substr(eq + 1);
      static const std::map<std::string, DefectKind> kKinds = {
          {"missing", DefectKind::kMissing},
          {"missing-scale", DefectKind::kMissingScale},
          {"wrong-shape", DefectKind::kWrongShape},
          {"wrong-dtype", DefectKind::kWrongDType}};
      auto it = kKinds.find(kind);
      if (eq == std::string::npos || it == kKinds.end() || tensor.empty()) {
        UsageError(
            absl::StrCat("--defect = \"", v, "\": must be KIND=TENSOR with KIND ", kDefectKinds));
      }
      opt.defects.push_back({it->second, v, tensor});
    } else {
      const IntFlag* flag = nullptr;
      for (const IntFlag& f : IntFlags()) {
        if (arg == f.name) flag = &f;
      }
      if (flag == nullptr) {
        UsageError(absl::StrCat("unknown flag ", arg, " (allowed: ", AllowedFlags(), ")"));
      }
      const std::string v = take_value();
      int64_t n;
      if (!absl::SimpleAtoi(v, &n) || n < flag->min || n > flag->max) {
        UsageError(absl::StrCat(flag->name, " = \"", v, "\": must be an integer in [", flag->min,
                                ", ", flag->max, "]"));
      }
      opt.*(flag->field) = n;
    }
  }
  if (!have_output) UsageError("--output DIR is required (see --help)");
  if (opt.kimi && opt.vocab < kKimiVocab) {
    UsageError(absl::StrCat("--vocab = ", opt.vocab, ": must be >= ", kKimiVocab,
                            " with --kimi (the tokenizer's ", kKimiRanks,
                            " ranks + 256 specials)"));
  }
  if (opt.header_only && !opt.defects.empty()) {
    UsageError("--defect cannot be combined with --header-only (no tensor data is written)");
  }

  // Cross-flag constraints.
  if (opt.dense_layers > opt.layers) {
    UsageError(absl::StrCat("--dense-layers = ", opt.dense_layers, ": must be <= --layers (",
                            opt.layers, ")"));
  }
  if (opt.experts % opt.groups != 0) {
    UsageError(
        absl::StrCat("--groups = ", opt.groups, ": must divide --experts (", opt.experts, ")"));
  }
  if (opt.topk_groups > opt.groups) {
    UsageError(absl::StrCat("--topk-groups = ", opt.topk_groups, ": must be <= --groups (",
                            opt.groups, ")"));
  }
  const int64_t selectable = opt.topk_groups * (opt.experts / opt.groups);
  if (opt.experts_per_tok > selectable) {
    UsageError(absl::StrCat("--experts-per-tok = ", opt.experts_per_tok,
                            ": must be <= --topk-groups x experts per group (", selectable, ")"));
  }
  if (opt.qk_rope_dim % 2 != 0) {
    UsageError(
        absl::StrCat("--qk-rope-dim = ", opt.qk_rope_dim, ": must be even (rope rotates pairs)"));
  }
  const int64_t units = opt.layers + opt.mtp + 2;
  if (opt.shards > units) {
    UsageError(absl::StrCat("--shards = ", opt.shards, ": must be <= layers + mtp + 2 (", units,
                            "); each shard holds whole layers"));
  }
  return opt;
}

// ---------------------------------------------------------------------------------------------
// Tensor inventory.

enum class Kind {
  kLinear,  // projection weight: FP8 + weight_scale_inv in fp8 format, BF16 otherwise
  kDense,   // BF16 N(0, 0.02) in both formats (embeddings, lm_head, router, MTP eh_proj/head)
  kNorm,    // BF16 1 + N(0, 0.02)
  kBias,    // F32 N(0, 0.01) (e_score_correction_bias)
};

struct Spec {
  std::string name;
  Kind kind;
  std::vector<int64_t> shape;
  int unit;  // shard unit: 0 = embed_tokens, 1..T = layer unit-1, T+1 = model.norm + lm_head
};

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::vector<Spec> Inventory(const Options& o) {
  std::vector<Spec> specs;
  const int64_t h = o.hidden;
  const int64_t qk_head = o.qk_nope_dim + o.qk_rope_dim;
  const int total_layers = static_cast<int>(o.layers + o.mtp);
  auto add = [&](std::string name, Kind kind, std::vector<int64_t> shape, int unit) {
    specs.push_back({std::move(name), kind, std::move(shape), unit});
  };
  auto add_mlp = [&](const std::string& p, int64_t width, int unit) {
    add(p + "gate_proj.weight", Kind::kLinear, {width, h}, unit);
    add(p + "up_proj.weight", Kind::kLinear, {width, h}, unit);
    add(p + "down_proj.weight", Kind::kLinear, {h, width}, unit);
  };

  add("model.embed_tokens.weight", Kind::kDense, {o.vocab, h}, 0);
  for (int layer = 0; layer < total_layers; ++layer) {
    const int unit = layer + 1;
    const std::string p = absl::StrCat("model.layers.", layer, ".");
    add(p + "input_layernorm.weight", Kind::kNorm, {h}, unit);
    add(p + "post_attention_layernorm.weight", Kind::kNorm, {h}, unit);
    if (o.q_lora_rank > 0) {
      add(p + "self_attn.q_a_proj.weight", Kind::kLinear, {o.q_lora_rank, h}, unit);
      add(p + "self_attn.q_a_layernorm.weight", Kind::kNorm, {o.q_lora_rank}, unit);
      add(p + "self_attn.q_b_proj.weight", Kind::kLinear, {o.heads * qk_head, o.q_lora_rank}, unit);
    } else {
      add(p + "self_attn.q_proj.weight", Kind::kLinear, {o.heads * qk_head, h}, unit);
    }
    add(p + "self_attn.kv_a_proj_with_mqa.weight", Kind::kLinear,
        {o.kv_lora_rank + o.qk_rope_dim, h}, unit);
    add(p + "self_attn.kv_a_layernorm.weight", Kind::kNorm, {o.kv_lora_rank}, unit);
    add(p + "self_attn.kv_b_proj.weight", Kind::kLinear,
        {o.heads * (o.qk_nope_dim + o.v_dim), o.kv_lora_rank}, unit);
    add(p + "self_attn.o_proj.weight", Kind::kLinear, {h, o.heads * o.v_dim}, unit);
    if (layer < o.dense_layers) {
      add_mlp(p + "mlp.", o.intermediate, unit);
    } else {
      add(p + "mlp.gate.weight", Kind::kDense, {o.experts, h}, unit);
      add(p + "mlp.gate.e_score_correction_bias", Kind::kBias, {o.experts}, unit);
      for (int64_t e = 0; e < o.experts; ++e) {
        add_mlp(absl::StrCat(p, "mlp.experts.", e, "."), o.moe_intermediate, unit);
      }
      if (o.shared_experts > 0) {
        add_mlp(p + "mlp.shared_experts.", o.moe_intermediate * o.shared_experts, unit);
      }
    }
    if (layer >= o.layers) {  // MTP module extras
      add(p + "embed_tokens.weight", Kind::kDense, {o.vocab, h}, unit);
      add(p + "enorm.weight", Kind::kNorm, {h}, unit);
      add(p + "hnorm.weight", Kind::kNorm, {h}, unit);
      add(p + "eh_proj.weight", Kind::kDense, {h, 2 * h}, unit);
      add(p + "shared_head.norm.weight", Kind::kNorm, {h}, unit);
      add(p + "shared_head.head.weight", Kind::kDense, {o.vocab, h}, unit);
    }
  }
  add("model.norm.weight", Kind::kNorm, {h}, total_layers + 1);
  add("lm_head.weight", Kind::kDense, {o.vocab, h}, total_layers + 1);
  return specs;
}

int64_t Elements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Data bytes the spec produces without defects (weight + scale for FP8 linears).
int64_t NominalBytes(const Spec& s, bool fp8) {
  const int64_t n = Elements(s.shape);
  switch (s.kind) {
    case Kind::kLinear:
      return fp8 ? n + 4 * CeilDiv(s.shape[0], kBlock) * CeilDiv(s.shape[1], kBlock) : 2 * n;
    case Kind::kDense:
    case Kind::kNorm:
      return 2 * n;
    case Kind::kBias:
      return 4 * n;
  }
  return 0;
}

// Contiguous partition of the units into `shards` non-empty shards, balanced by bytes: a unit
// goes to the shard its byte midpoint falls in, clamped so that no shard is skipped or left
// empty. Unit 0 (embed_tokens) therefore always lands in the first shard and the last unit
// (model.norm, lm_head) in the last, as in HF checkpoints.
std::vector<int> AssignShards(const std::vector<int64_t>& unit_bytes, int shards) {
  const int units = static_cast<int>(unit_bytes.size());
  long double total = 0;
  for (int64_t b : unit_bytes) total += static_cast<long double>(b);
  std::vector<int> shard_of(units);
  long double before = 0;
  int prev = -1;
  for (int k = 0; k < units; ++k) {
    const long double mid = before + static_cast<long double>(unit_bytes[k]) / 2;
    before += static_cast<long double>(unit_bytes[k]);
    int proposed = total > 0 ? static_cast<int>(mid * shards / total) : 0;
    const int lo = std::max(prev, shards - units + k);
    const int hi = prev + 1;
    shard_of[k] = std::clamp(proposed, lo, hi);
    prev = shard_of[k];
  }
  return shard_of;
}

// ---------------------------------------------------------------------------------------------
// Random data: splitmix64 to seed, xoshiro256** to draw, Box-Muller for normals (our own code,
// so the stream is identical across standard libraries).

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One random stream (xoshiro256** seeded through splitmix64). Not thread-safe; the generator
// makes one per tensor.
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (uint64_t& word : s_) word = SplitMix64(seed);
  }

  uint64_t Next() {
    const uint64_t result = std::rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = std::rotl(s_[3], 45);
    return result;
  }

  // Standard normal samples, two per Box-Muller step.
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = (static_cast<double>(Next() >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(Next() >> 11) * 0x1.0p-53;          // [0, 1)
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 2.0 * 3.14159265358979323846 * u2;
    spare_ = r * std::sin(theta);
    has_spare_ = true;
    return r * std::cos(theta);
  }

 private:
  uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0;
};

uint64_t TensorSeed(uint64_t seed, std::string_view name) {
  uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a
  for (char c : name) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001B3ull;
  }
  uint64_t state = seed ^ h;
  return SplitMix64(state);
}

std::vector<float> Sample(const Spec& s, uint64_t seed) {
  Rng rng(TensorSeed(seed, s.name));
  std::vector<float> v(static_cast<size_t>(Elements(s.shape)));
  const double mean = s.kind == Kind::kNorm ? 1.0 : 0.0;
  const double stddev = s.kind == Kind::kNorm   ? kNormStd
                        : s.kind == Kind::kBias ? kBiasStd
                                                : kWeightStd;
  for (float& x : v) x = static_cast<float>(mean + stddev * rng.Normal());
  return v;
}

template <typename T>
void AppendLe(std::vector<uint8_t>* out, T value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out->insert(out->end(), p, p + sizeof(T));
}

std::vector<uint8_t> ToBf16Bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out;
  out.reserve(v.size() * 2);
  for (float x : v) AppendLe(&out, model::FloatToBf16(x));
  return out;
}

std::vector<uint8_t> ToF32Bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out;
  out.reserve(v.size() * 4);
  for (float x : v) AppendLe(&out, x);
  return out;
}

// FP8 128x128 block quantization of a row-major [m, n] weight (FORMATS.md §2.3 inverse):
// scale_inv = amax/448 per block (1 when amax is 0), code = e4m3_rne(w / scale_inv). Edge
// blocks are partial; their amax covers only the real elements.
void QuantizeFp8(const std::vector<float>& w, int64_t m, int64_t n, std::vector<uint8_t>* codes,
                 std::vector<float>* scale_inv) {
  const int64_t mb = CeilDiv(m, kBlock);
  const int64_t nb = CeilDiv(n, kBlock);
  codes->assign(static_cast<size_t>(m * n), 0);
  scale_inv->assign(static_cast<size_t>(mb * nb), 1.0f);
  for (int64_t bi = 0; bi < mb; ++bi) {
    const int64_t r0 = bi * kBlock, r1 = std::min(m, r0 + kBlock);
    for (int64_t bj = 0; bj < nb; ++bj) {
      const int64_t c0 = bj * kBlock, c1 = std::min(n, c0 + kBlock);
      float amax = 0;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * n + c]));
      }
      const float scale = amax > 0 ? amax / model::kFp8E4M3Max : 1.0f;
      (*scale_inv)[bi * nb + bj] = scale;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) {
          (*codes)[r * n + c] = model::FloatToFp8E4M3(w[r * n + c] / scale);
        }
      }
    }
  }
}

// The tensors one spec produces, before defects.
std::vector<TensorData> Materialize(const Spec& s, const Options& o) {
  std::vector<float> values = Sample(s, o.seed);
  std::vector<TensorData> out;
  if (s.kind == Kind::kLinear && o.fp8) {
    std::vector<uint8_t> codes;
    std::vector<float> scale_inv;
    QuantizeFp8(values, s.shape[0], s.shape[1], &codes, &scale_inv);
    out.push_back({s.name, DType::kF8E4M3, s.shape, std::move(codes)});
    out.push_back({s.name + "_scale_inv",
                   DType::kF32,
                   {CeilDiv(s.shape[0], kBlock), CeilDiv(s.shape[1], kBlock)},
                   ToF32Bytes(scale_inv)});
  } else if (s.kind == Kind::kBias) {
    out.push_back({s.name, DType::kF32, s.shape, ToF32Bytes(values)});
  } else {
    out.push_back({s.name, DType::kBF16, s.shape, ToBf16Bytes(values)});
  }
  return out;
}

// wrong-dtype: a non-F32 tensor is rewritten as F32 with the same element values (FP8 codes
// decoded without their scale, BF16 widened exactly); an F32 tensor becomes BF16 (RNE).
void ChangeDType(TensorData* t) {
  const size_t n = static_cast<size_t>(Elements(t->shape));
  std::vector<float> values(n);
  for (size_t i = 0; i < n; ++i) {
    switch (t->dtype) {
      case DType::kF8E4M3:
        values[i] = model::Fp8E4M3ToFloat(t->bytes[i]);
        break;
      case DType::kBF16:
        values[i] =
            model::Bf16ToFloat(static_cast<uint16_t>(t->bytes[2 * i] | (t->bytes[2 * i + 1] << 8)));
        break;
      default:  // kF32
        std::memcpy(&values[i], &t->bytes[4 * i], 4);
    }
  }
  if (t->dtype == DType::kF32) {
    t->dtype = DType::kBF16;
    t->bytes = ToBf16Bytes(values);
  } else {
    t->dtype = DType::kF32;
    t->bytes = ToF32Bytes(values);
  }
}

// wrong-shape: dim 0 grows by one; the extra row (or element, for 1-D) is zero bytes.
void GrowDim0(TensorData* t) {
  const int64_t row_elements = Elements(t->shape) / t->shape[0];
  t->shape[0] += 1;
  t->bytes.resize(t->bytes.size() + row_elements * model::DTypeBits(t->dtype) / 8, 0);
}

std::string ShardName(int i, int n) {
  return absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, n);
}

nlohmann::json Config(const Options& o) {
  nlohmann::json c;  // std::map-backed: keys sorted, like the hub config.json
  c["architectures"] = {"DeepseekV3ForCausalLM"};
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["aux_loss_alpha"] = 0.001;
  c["bos_token_id"] = 0;
  c["eos_token_id"] = 1;
  c["ep_size"] = 1;
  c["first_k_dense_replace"] = o.dense_layers;
  c["hidden_act"] = "silu";
  c["hidden_size"] = o.hidden;
  c["initializer_range"] = 0.02;
  c["intermediate_size"] = o.intermediate;
  c["kv_lora_rank"] = o.kv_lora_rank;
  c["max_position_embeddings"] = o.yarn ? 163840 : 4096;
  c["model_type"] = o.kimi ? "kimi_k2" : "deepseek_v3";
  c["moe_intermediate_size"] = o.moe_intermediate;
  c["moe_layer_freq"] = 1;
  c["n_group"] = o.groups;
  c["n_routed_experts"] = o.experts;
  c["n_shared_experts"] = o.shared_experts;
  c["norm_topk_prob"] = true;
  c["num_attention_heads"] = o.heads;
  c["num_experts_per_tok"] = o.experts_per_tok;
  c["num_hidden_layers"] = o.layers;
  c["num_key_value_heads"] = o.heads;
  c["num_nextn_predict_layers"] = o.mtp;
  c["pretraining_tp"] = 1;
  c["q_lora_rank"] = o.q_lora_rank > 0 ? nlohmann::json(o.q_lora_rank) : nlohmann::json(nullptr);
  c["qk_nope_head_dim"] = o.qk_nope_dim;
  c["qk_rope_head_dim"] = o.qk_rope_dim;
  if (o.fp8) {
    c["quantization_config"] = {{"activation_scheme", "dynamic"},
                                {"fmt", "e4m3"},
                                {"quant_method", "fp8"},
                                {"weight_block_size", {kBlock, kBlock}}};
  }
  c["rms_norm_eps"] = 1e-06;
  if (o.yarn) {
    c["rope_scaling"] = {{"beta_fast", 32},       {"beta_slow", 1},
                         {"factor", 40},          {"mscale", 1.0},
                         {"mscale_all_dim", 1.0}, {"original_max_position_embeddings", 4096},
                         {"type", "yarn"}};
  } else {
    c["rope_scaling"] = nullptr;
  }
  c["rope_theta"] = 10000;
  c["routed_scaling_factor"] = o.kimi ? 2.827 : 2.5;
  c["scoring_func"] = "sigmoid";
  c["seq_aux"] = true;
  c["tie_word_embeddings"] = false;
  c["topk_group"] = o.topk_groups;
  c["topk_method"] = "noaux_tc";
  c["torch_dtype"] = "bfloat16";
  c["transformers_version"] = "4.33.1";
  c["use_cache"] = true;
  c["v_head_dim"] = o.v_dim;
  c["vocab_size"] = o.vocab;
  if (o.kimi) {  // Kimi-K2's config.json values where they differ from DeepSeek-V3's
    c["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV3Config"},
                     {"AutoModel", "modeling_deepseek.DeepseekV3Model"},
                     {"AutoModelForCausalLM", "modeling_deepseek.DeepseekV3ForCausalLM"}};
    c["bos_token_id"] = kKimiRanks;
    c["eos_token_id"] = kKimiRanks + 1;
    c["rope_theta"] = 50000.0;
    if (o.yarn) {
      c["max_position_embeddings"] = 131072;
      c["rope_scaling"]["beta_fast"] = 1.0;
      c["rope_scaling"]["factor"] = 32.0;
    }
    c["transformers_version"] = "4.48.3";
  }
  return c;
}

// Materialize(specs[i]) for i in [begin, end), on opt.threads threads (each tensor has its own
// random stream, so the result is the same for any thread count).
std::vector<std::vector<TensorData>> MaterializeAll(const std::vector<Spec>& specs, size_t begin,
                                                    size_t end, const Options& opt) {
  std::vector<std::vector<TensorData>> out(end - begin);
  const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t threads =
      std::min(end - begin, opt.threads > 0 ? static_cast<size_t>(opt.threads) : hw);
  std::atomic<size_t> next{begin};
  auto work = [&] {
    for (size_t i = next++; i < end; i = next++) out[i - begin] = Materialize(specs[i], opt);
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  return out;
}

// The tensors Materialize would write for `s`, with empty bytes (for --header-only).
std::vector<TensorData> Shapes(const Spec& s, const Options& o) {
  if (s.kind == Kind::kLinear && o.fp8) {
    return {{s.name, DType::kF8E4M3, s.shape, {}},
            {s.name + "_scale_inv",
             DType::kF32,
             {CeilDiv(s.shape[0], kBlock), CeilDiv(s.shape[1], kBlock)},
             {}}};
  }
  return {{s.name, s.kind == Kind::kBias ? DType::kF32 : DType::kBF16, s.shape, {}}};
}

// A safetensors file with the header of `tensors` and a data buffer of zeros left as a hole
// (ftruncate), so it has its full size without using disk. Returns the data bytes.
absl::StatusOr<int64_t> WriteHeaderOnly(const std::string& path,
                                        const std::vector<TensorData>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  int64_t offset = 0;
  for (const TensorData& t : tensors) {
    const int64_t bytes = Elements(t.shape) * model::DTypeBits(t.dtype) / 8;
    header[t.name] = {{"dtype", std::string(model::DTypeName(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string file(8, '\0');
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  file += text;
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(file.data(), static_cast<std::streamsize>(file.size()));
    if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  }
  std::error_code ec;
  std::filesystem::resize_file(path, file.size() + static_cast<uint64_t>(offset), ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": cannot extend: ", ec.message()));
  return offset;
}

// tiktoken.model, tokenizer_config.json and a placeholder tokenization_kimi.py (--kimi).
absl::Status WriteKimiTokenizer(const std::filesystem::path& dir) {
  std::string ranks;
  int64_t rank = 0;
  for (int b = 0; b < 256; ++b) {
    absl::StrAppend(&ranks, absl::Base64Escape(std::string(1, static_cast<char>(b))), " ", rank++,
                    "\n");
  }
  for (char a : std::string_view(kKimiMergeChars)) {
    for (char b : std::string_view(kKimiMergeChars)) {
      absl::StrAppend(&ranks, absl::Base64Escape(std::string{a, b}), " ", rank++, "\n");
    }
  }
  if (absl::Status s = model::WriteFileAtomic((dir / "tiktoken.model").string(), ranks); !s.ok()) {
    return s;
  }
  // Kimi-K2's named special tokens (tokenizer_config.json), as offsets from the first id.
  const std::vector<std::pair<int, std::string>> named = {{0, "[BOS]"},
                                                          {1, "[EOS]"},
                                                          {2, "<|im_end|>"},
                                                          {3, "<|im_user|>"},
                                                          {4, "<|im_assistant|>"},
                                                          {6, "<|start_header_id|>"},
                                                          {7, "<|end_header_id|>"},
                                                          {9, "[EOT]"},
                                                          {10, "<|im_system|>"},
                                                          {21, "<|im_middle|>"}};
  nlohmann::json decoder = nlohmann::json::object();
  for (const auto& [k, content] : named) {
    decoder[std::to_string(kKimiRanks + k)] = {{"content", content},   {"lstrip", false},
                                               {"normalized", false},  {"rstrip", false},
                                               {"single_word", false}, {"special", true}};
  }
  nlohmann::json config = {
      {"added_tokens_decoder", decoder},
      {"additional_special_tokens",
       {"<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>",
        "[EOT]", "<|im_system|>", "<|im_middle|>"}},
      {"auto_map", {{"AutoTokenizer", {"tokenization_kimi.TikTokenTokenizer", nullptr}}}},
      {"bos_token", "[BOS]"},
      {"clean_up_tokenization_spaces", false},
      {"eos_token", "[EOS]"},
      {"extra_special_tokens", nlohmann::json::object()},
      {"model_max_length", 1048576},
      {"pad_token", "[EOS]"},
      {"tokenizer_class", "TikTokenTokenizer"},
      {"unk_token", "[EOS]"}};
  if (absl::Status s =
          model::WriteFileAtomic((dir / "tokenizer_config.json").string(), config.dump(2) + "\n");
      !s.ok()) {
    return s;
  }
  return model::WriteFileAtomic(
      (dir / "tokenization_kimi.py").string(),
      "# Placeholder written by mq-gen-model for tests: Kimi-K2 ships the real\n"
      "# tokenization_kimi.py (TikTokenTokenizer over tiktoken.model); mq copies this file\n"
      "# into its outputs unchanged and reads the tokenizer itself (worker/data).\n");
}

[[noreturn]] void Fail(const absl::Status& status) {
  std::cerr << "mq-gen-model: " << status << "\n";
  std::exit(1);
}

int Run(int argc, char** argv) {
  const Options opt = ParseArgs(argc, argv);
  const std::vector<Spec> specs = Inventory(opt);

  // Resolve defects against the inventory (weights and, in fp8, their _scale_inv tensors).
  std::map<std::string, const Spec*> linear_fp8;  // FP8 weight name -> spec
  std::set<std::string> all_names;
  for (const Spec& s : specs) {
    all_names.insert(s.name);
    if (s.kind == Kind::kLinear && opt.fp8) {
      linear_fp8[s.name] = &s;
      all_names.insert(s.name + "_scale_inv");
    }
  }
  std::set<std::string> drop, grow, retype;
  for (const auto& [kind, text, tensor] : opt.defects) {
    if (kind == DefectKind::kMissingScale) {
      if (!linear_fp8.contains(tensor)) {
        UsageError(absl::StrCat("--defect = \"", text, "\"",
                                ": TENSOR must name an FP8 weight of this model (one with a "
                                "_scale_inv; none in --format bf16)"));
      }
      drop.insert(tensor + "_scale_inv");
      continue;
    }
    if (!all_names.contains(tensor)) {
      UsageError(absl::StrCat("--defect = \"", text, "\": no tensor named \"", tensor,
                              "\" in this model (check the flags that shape it)"));
    }
    (kind == DefectKind::kMissing      ? drop
     : kind == DefectKind::kWrongShape ? grow
                                       : retype)
        .insert(tensor);
  }

  std::error_code ec;
  std::filesystem::create_directories(opt.output, ec);
  if (ec) {
    Fail(absl::InvalidArgumentError(
        absl::StrCat("--output = \"", opt.output, "\": cannot create directory: ", ec.message())));
  }
  const std::filesystem::path dir(opt.output);

  const int num_units = static_cast<int>(opt.layers + opt.mtp + 2);
  std::vector<int64_t> unit_bytes(num_units, 0);
  for (const Spec& s : specs) unit_bytes[s.unit] += NominalBytes(s, opt.fp8);
  const int shards = static_cast<int>(opt.shards);
  const std::vector<int> shard_of = AssignShards(unit_bytes, shards);

  std::map<std::string, std::string> weight_map;
  std::set<std::string> written_files;
  int64_t total_bytes = 0;
  int64_t num_tensors = 0;
  size_t next_spec = 0;  // specs are in unit order, and units in shard order
  for (int shard = 0; shard < shards; ++shard) {
    const std::string file = ShardName(shard, shards);
    const size_t first_spec = next_spec;
    while (next_spec < specs.size() && shard_of[specs[next_spec].unit] == shard) ++next_spec;
    if (opt.header_only) {
      std::vector<TensorData> shapes;
      for (size_t i = first_spec; i < next_spec; ++i) {
        for (TensorData& t : Shapes(specs[i], opt)) {
          weight_map[t.name] = file;
          ++num_tensors;
          shapes.push_back(std::move(t));
        }
      }
      absl::StatusOr<int64_t> bytes = WriteHeaderOnly((dir / file).string(), shapes);
      if (!bytes.ok()) Fail(bytes.status());
      total_bytes += *bytes;
      written_files.insert(file);
      continue;
    }
    std::vector<std::vector<TensorData>> drawn = MaterializeAll(specs, first_spec, next_spec, opt);
    std::vector<TensorData> tensors;
    for (std::vector<TensorData>& spec_tensors : drawn) {
      for (TensorData& t : spec_tensors) {
        if (drop.contains(t.name)) continue;
        if (retype.contains(t.name)) ChangeDType(&t);
        if (grow.contains(t.name)) GrowDim0(&t);
        weight_map[t.name] = file;
        total_bytes += static_cast<int64_t>(t.bytes.size());
        ++num_tensors;
        tensors.push_back(std::move(t));
      }
    }
    if (absl::Status s = model::WriteSafetensors((dir / file).string(), std::move(tensors));
        !s.ok()) {
      Fail(s);
    }
    written_files.insert(file);
  }

  if (absl::Status s = model::WriteShardedIndex((dir / "model.safetensors.index.json").string(),
                                                total_bytes, weight_map);
      !s.ok()) {
    Fail(s);
  }
  if (absl::Status s =
          model::WriteFileAtomic((dir / "config.json").string(), Config(opt).dump(2) + "\n");
      !s.ok()) {
    Fail(s);
  }
  if (opt.kimi) {
    if (absl::Status s = WriteKimiTokenizer(dir); !s.ok()) Fail(s);
  }

  // Remove shards of an earlier run with a different --shards, so that every *.safetensors in
  // the directory is listed in the index.
  static const std::regex kShardPattern(R"(model-\d{5}-of-\d{5}\.safetensors)");
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, kShardPattern) && !written_files.contains(name)) {
      std::filesystem::remove(entry.path(), ec);
    }
  }

  std::cout << "mq-gen-model: wrote " << num_tensors << " tensors, " << total_bytes
            << " bytes of tensor data in " << shards << " shards to " << opt.output << " ("
            << (opt.fp8 ? "fp8" : "bf16") << (opt.kimi ? ", kimi_k2" : "")
            << (opt.header_only ? ", headers only" : "") << ", seed " << opt.seed << ")\n";
  return 0;
}

}  // namespace
}  // namespace mq::tools

int main(int argc, char** argv) { return mq::tools::Run(argc, argv); }
