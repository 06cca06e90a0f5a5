// Single-process W4A16 quantization of a DeepSeek-V3 checkpoint into a compressed-tensors
// `pack-quantized` checkpoint (FORMATS.md §4), layer by layer:
//
//   embed the calibration ids; for each decoder layer (MTP layers last, fed per FORMATS.md §3.6
//   when quantized): load it, run the calibration hidden states through it with a hook that
//   accumulates one Hessian per quantized linear (gate_proj and up_proj of an MLP share one),
//   quantize (GPTQ, or RTN), re-run the layer with the dequantized weights to get the next
//   layer's input (quantized propagation), write the layer's shard and drop the layer.
//
// Output: model-XXXXX-of-YYYYY.safetensors (one shard per layer, the last one holds the
// globals and anything outside model.layers.*), model.safetensors.index.json, config.json (the
// input's, with `quantization_config` replaced and torch_dtype/dtype "bfloat16"), the
// tokenizer/generation/remote-code files copied, and optionally a per-linear JSON report.
// Quantized linears get weight_packed (I32) / weight_scale (BF16) / weight_shape (I64); every
// other tensor is BF16 (FP8 dequantized), except e_score_correction_bias which keeps F32.
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: one call at a time per output directory. Durability: every file is written
// atomically (temp + fsync + rename); the config.json is written last, so a directory with a
// config.json holding `compressed-tensors` is complete. Memory: one layer's weights, its
// Hessians (bounded by experts_per_pass) and the calibration hidden states.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/quant/compressed_tensors.h"
#include "worker/quant/gptq.h"

namespace mq::quant {

// kAwq: AWQ scales folded into the checkpoint, then RTN of the scaled weights; kAwqGptq: the
// same scales, then GPTQ. The AWQ methods run in the gang pipeline only (gang_pipeline.h).
enum class QuantMethod { kGptq, kRtn, kAwq, kAwqGptq };
inline bool UsesHessians(QuantMethod m) {
  return m == QuantMethod::kGptq || m == QuantMethod::kAwqGptq;
}
inline bool UsesAwq(QuantMethod m) { return m == QuantMethod::kAwq || m == QuantMethod::kAwqGptq; }
// "gptq", "rtn", "awq", "awq-gptq"; InvalidArgument naming the value and the allowed ones.
absl::StatusOr<QuantMethod> ParseQuantMethod(const std::string& name);

struct LocalQuantizeOptions {
  std::string model_dir;
  std::string output_dir;  // created if missing; existing files of the same names replaced
  at::Tensor input_ids;    // int64 [n, seq] calibration token ids (CPU)
  QuantMethod method = QuantMethod::kGptq;
  CompressedTensorsOptions format;  // group size, targets, ignore, MTP
  GptqOptions gptq;                 // grid.group_size is overwritten by format.group_size
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // compute dtype: kFloat or kBFloat16
  int64_t batch_size = 8;             // sequences per forward call (> 0)
  // Routed experts whose Hessians are held at once (0 = all of a layer's): each further group
  // costs one more forward pass of the layer over the calibration set.
  int64_t experts_per_pass = 0;
  std::string report_path;            // empty = no report file
};

// One quantized linear's outcome.
struct LinearReport {
  std::string name;
  int64_t tokens = 0;           // calibration tokens its input saw
  std::string method;           // "gptq" or "rtn" (requested)
  std::string fallback;         // FallbackName; "rtn" also when tokens == 0
  std::string fallback_reason;  // empty when none
  double damping = 0;
  double rel_damp = 0;
  // ‖(W − Q)Xᵀ‖² / ‖WXᵀ‖² on the calibration inputs (through the Hessian); NaN without tokens.
  double relative_output_error = 0;
  double seconds = 0;
};

struct LocalQuantizeReport {
  std::vector<LinearReport> linears;
  int64_t calibration_tokens = 0;
  double seconds = 0;
};

// Runs the pipeline. InvalidArgument naming the field for bad options (ids shape/dtype, group
// size, method), FailedPrecondition for an inconsistent selection (CheckSelectionConsistent),
// and the reader's, engine's and writer's errors.
absl::StatusOr<LocalQuantizeReport> QuantizeLocal(const LocalQuantizeOptions& options);

// The report as JSON text (one object per linear, plus totals).
std::string ReportJson(const LocalQuantizeReport& report);

}  // namespace mq::quant
