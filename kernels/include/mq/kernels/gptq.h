// Batched GPTQ column loop (worker/quant/gptq.h steps 6–7, "the solve") for B matrices of one
// shape [O, I], each with its own (or a shared) normalized inverse-Cholesky factor U.
//
// Layout (all row-major, no padding):
//   wt        fp32 [B, I, O]  each weight TRANSPOSED and in processing order (row t = original
//                             column perm[t]); dead columns already zeroed. Updated in place.
//   u[b]      fp32 [I, I]     upper Cholesky factor of the permuted, damped H⁻¹ with every row
//                             divided by its diagonal (PreparedHessian::u); matrices reading the
//                             same input may point at the same U.
//   perm[b]   int32 [I]       perm[t] = original column processed t-th.
//   scales_t  fp32 [B, G, O]  per-group scales (bf16-exact), TRANSPOSED: scales_t[b][g][o].
//   zeros_t   fp32 [B, G, O]  per-group zero points (asymmetric), or null (symmetric).
//   codes_t   int8 [B, I, O]  output codes in processing order.
//
// Per column t (in blocks of kGptqBlock = 128 columns), for each row o, with s, z the scale and
// zero point of the ORIGINAL group perm[t] / group_size:
//   q = clamp(rint(w / s + z), qmin, qmax)            (fp32, IEEE division, round half even)
//   e = w − bf16((q − z) · s)                          (error against what a loader rebuilds)
//   w[k] = fma(−U[t][k], e, w[k])  for later k in the block   (ATen's addr_ arithmetic)
// and after each block, for all later columns r: w[r] −= Σ_k U[k][r] · e[k] (one batched GEMM,
// fp32 or TF32, see GptqUpdateMath). This is exactly QuantizeGptq's loop; only the GEMM's
// summation order can differ from ATen's addmm.
//
// Cholesky-feedback form (w0 != null): the same algorithm without H⁻¹ (GPTQ written
// left-looking; equal to the loop above in exact arithmetic). With J the reversal and
// J·H·J = L·Lᵀ, V = J·L·J is upper triangular with H = V·Vᵀ, and u[b] holds R = V·diag(V)⁻¹
// (columns divided by their diagonal; only the strictly upper part is read). Per column:
//   d = w0 − bf16((q − z) · s)            (error against the ORIGINAL weight w0)
//   w[k] = fma(R[t][k], d, w[k])  for later k in the block; after each block
//   w[r] += Σ_k R[k][r] · d[k] for all later columns r,
// so column k is quantized at w0_k + Σ_{t<k} d_t·R[t][k]. (GPTQ quantizes X = W − E·(Ũ − I)
// with Ũ the row-normalized factor above; E = D·Ũ⁻¹ turns this into X = W + D·(Ũ⁻¹ − I), and
// Ũ⁻¹ = R.) Only a Cholesky factorisation is needed, no triangular inverse.
//
// This header compiles without CUDA: cudaStream_t is only forward-declared.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace mq::kernels {

// Columns per lazy-update block of the fused kernel (GptqOptions::block_size must equal it).
inline constexpr int64_t kGptqBlock = 128;

// Math of the trailing (lazy) update GEMM.
enum class GptqUpdateMath {
  kFp32,  // plain fp32 FMA (what ATen does with TF32 off, its default)
  kTf32,  // tensor-core TF32 inputs, fp32 accumulation (faster, ~1e-3 relative per product)
};

struct GptqSolveArgs {
  int64_t batch = 0;       // B >= 0
  int64_t rows = 0;        // O > 0
  int64_t cols = 0;        // I > 0
  int64_t group_size = 0;  // effective group size (> 0; per-channel = I)
  int bits = 4;            // 2..8
  float* wt = nullptr;
  // HOST arrays of B device pointers (entries may repeat for shared Hessians).
  const float* const* u = nullptr;
  const int32_t* const* perm = nullptr;
  const float* scales_t = nullptr;
  const float* zeros_t = nullptr;  // null = symmetric
  int8_t* codes_t = nullptr;
  GptqUpdateMath update_math = GptqUpdateMath::kFp32;
  // Cholesky-feedback form: fp32 [B, I, O] copy of wt before the solve (read only); u[b] then
  // holds R (see above). null: GPTQ's inverse-factor form.
  const float* w0 = nullptr;
};

// Bytes of device workspace LaunchGptqSolve needs for `args` (error block and pointer tables).
size_t GptqSolveWorkspaceBytes(const GptqSolveArgs& args);

// CPU reference of the whole solve (host pointers everywhere, the same element arithmetic; the
// trailing update sums over k in increasing order in fp32). Thread-safe: keeps no state.
// InvalidArgument naming the argument for bad sizes or null pointers.
absl::Status GptqSolveCpu(const GptqSolveArgs& args);

// True when this build contains the CUDA kernels (MQ_ENABLE_CUDA=ON).
bool GptqCudaBuilt();

// OK when the CUDA path can run on `device` (Hopper or newer, code for it in this binary);
// FailedPrecondition naming the device otherwise; Unimplemented without CUDA.
absl::Status GptqIsSupported(int device);

// Enqueues the whole solve on `stream` (device pointers except the host pointer tables of
// `args`; `workspace` device memory of GptqSolveWorkspaceBytes(args) bytes, 16-byte aligned).
// Returns after the launches (one fused kernel and one batched GEMM per block of 128 columns);
// the caller synchronizes before reading codes_t, and keeps every buffer alive until then.
// InvalidArgument for bad sizes or null pointers; Internal with the CUDA/cuBLAS error text when a
// launch fails; Unimplemented without CUDA.
absl::Status LaunchGptqSolve(const GptqSolveArgs& args, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

}  // namespace mq::kernels
