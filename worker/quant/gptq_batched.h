// GPTQ of many weights at once (issue 6 "GPU speed"): every routed expert of a layer, with
// gate_proj/up_proj sharing their expert's Hessian and down_proj using its own.
//
// Semantics are QuantizeGptq's (gptq.h, steps 1–7: dead columns, damping and its retries, RTN
// fallback, act-order, grid from the original weight in original column order, error against the
// bf16-rounded dequantized value). On CUDA tensors the column loop runs in fused kernels
// (kernels/gptq.cu): one launch sequence of ceil(I/128) fused block kernels and batched GEMMs per
// shape class, for all weights of that shape together; elsewhere (CPU tensors, a build without
// CUDA kernels, a block_size other than 128, a pre-Hopper GPU) it loops QuantizeGptq and the
// results are identical to it. On CUDA the codes equal QuantizeGptq's except for a small fraction
// flipped by fp32 summation order in the lazy-update GEMM and by rounding in a different
// factorisation (the default kCholeskyFeedback solves GPTQ's left-looking form, which needs no
// inverse of the Cholesky factor); bench/RESULTS.md gives the measured fractions (~1e-4).
//
// For torch code only (includes ATen; never include together with a .pb.h, DESIGN.md §7).
// Threading: pure functions over immutable inputs, no shared state. Work runs on the current
// CUDA stream of the weights' device; results are on the weights' device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/quant/gptq.h"

namespace mq::quant {

// How PrepareHessiansBatched factorises a damped, permuted H on CUDA.
enum class HessianFactorization {
  // PrepareHessian's chain: Cholesky of H, its inverse, Cholesky of the inverse (4/3·I³ flops
  // for the two Cholesky plus the inverse's two triangular solves of I right-hand sides).
  kInverseCholesky,
  // The same factor from ONE Cholesky of the reversed matrix: with P the reversal and
  // P·H·P = L·Lᵀ, H⁻¹ = Uᵀ·U for U = P·L⁻¹·P (upper, positive diagonal). Cholesky + one
  // triangular inverse: about half the flops; equal to kInverseCholesky up to rounding.
  kReversedCholesky,
  // No inverse at all: one Cholesky of the reversed matrix gives the feedback matrix of the
  // Cholesky-feedback form of the solve (mq/kernels/gptq.h; PreparedHessian::feedback_form), the
  // same algorithm up to rounding. Needs the CUDA kernels (factorisation and fused solve) and
  // block_size 128; elsewhere kReversedCholesky is used instead.
  kCholeskyFeedback,
};

struct GptqBatchOptions {
  // Lazy-update GEMM in TF32 (tensor cores) instead of fp32. Off: the arithmetic of QuantizeGptq
  // with torch's default (TF32 off). Jobs turn it on unless asked not to (JobSpec.tf32_update,
  // normalized by the coordinator); this library default stays the reference arithmetic.
  bool tf32_update = false;
  HessianFactorization factorization = HessianFactorization::kCholeskyFeedback;
  // kReversedCholesky through kernels/hessian_factor.h (flip, cuSOLVER potrf + trtri, one
  // finishing kernel) instead of ATen's Cholesky and triangular solve against the identity.
  // Off by default: cuSOLVER's trtri measured slower than the solve on an H100 (bench/RESULTS.md).
  bool factor_kernels = false;
  // CUDA streams the factorisations of a batch are spread over (1 = the current stream only).
  int factor_streams = 4;
  // Device bytes the solve of one launch sequence may use for its weight copies (about 14 bytes
  // per weight element); larger batches are split. > 0.
  int64_t max_batch_bytes = int64_t{24} << 30;
  // false: always loop QuantizeGptq (the reference path), even on CUDA.
  bool use_kernels = true;
};

// PrepareHessian for each of `hessians` (results in the same order). CPU tensors: exactly
// PrepareHessian. CUDA tensors: the same validation, dead-column fix, damping schedule, retries
// and fallbacks, with the factorisations of all Hessians enqueued together (one host sync per
// damping round) and batch.factorization. InvalidArgument prefixed "hessians[k]: " for a bad H.
absl::StatusOr<std::vector<PreparedHessian>> PrepareHessiansBatched(
    const std::vector<at::Tensor>& hessians, const GptqOptions& options,
    const GptqBatchOptions& batch = {});

// GPTQ of every weights[k] ([O_k, I_k], any float dtype, finite) with the prepared Hessian
// prepared[hessian_of[k]] (several weights may name the same Hessian: gate/up of one expert).
// Weights of one shape on one device are solved together; results are in the order of
// `weights` and equal to QuantizeGptq(weights[k], prepared[hessian_of[k]], options) as described
// above. InvalidArgument prefixed "weights[k]: " for a bad weight, a hessian_of entry out of
// range, or I_k different from the Hessian's.
absl::StatusOr<std::vector<GptqResult>> QuantizeGptqBatched(
    const std::vector<at::Tensor>& weights, const std::vector<int64_t>& hessian_of,
    const std::vector<PreparedHessian>& prepared, const GptqOptions& options,
    const GptqBatchOptions& batch = {});

// PrepareHessiansBatched(hessians) then QuantizeGptqBatched.
absl::StatusOr<std::vector<GptqResult>> QuantizeGptqBatched(
    const std::vector<at::Tensor>& weights, const std::vector<int64_t>& hessian_of,
    const std::vector<at::Tensor>& hessians, const GptqOptions& options,
    const GptqBatchOptions& batch = {});

}  // namespace mq::quant
