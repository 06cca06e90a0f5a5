// The factors GPTQ's column loop needs from a damped, permuted Hessian H (n×n, symmetric
// positive definite), both from ONE Cholesky of the reversed matrix: with J the reversal (J·H·J
// flips both axes), J·H·J = L·Lᵀ and V = J·L·J (upper, H = V·Vᵀ).
//  * kInverseUpper: U = the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ·U), every row divided by its
//    diagonal (PreparedHessian::u in worker/quant/gptq.h). U = J·L⁻¹·J, so this needs L⁻¹:
//    cuSOLVER's trtri after potrf.
//  * kCholeskyFeedback: R = V·diag(V)⁻¹ (columns divided by their diagonal), the feedback matrix
//    of the Cholesky-feedback form of the solve (mq/kernels/gptq.h); R = U⁻¹, so no inverse.
// On the GPU: an in-place flip kernel, cuSOLVER's potrf (n³/3 flops), trtri (n³/3, inverse form
// only), and one kernel that reverses, transposes to row-major, divides by the diagonal,
// converts to fp32 and checks the result. The CPU reference does the same steps with plain loops
// in the input's precision.
//
// Layout: `a` row-major n×n (symmetric, so row- and column-major agree), fp64 or fp32; it is
// OVERWRITTEN (used as the factorisation's work matrix). `u` fp32 row-major n×n, strictly lower
// part zero, unit diagonal.
//
// This header compiles without CUDA: cudaStream_t is only forward-declared.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace mq::kernels {

enum class FactorDtype { kFloat64, kFloat32 };

// Which factor to produce (both upper triangular, fp32, row-major, unit diagonal):
enum class FactorForm {
  // U: the upper Cholesky factor of H⁻¹ with rows divided by their diagonal (potrf + trtri).
  kInverseUpper,
  // R = V·diag(V)⁻¹ with V = J·L·J, J·H·J = L·Lᵀ: the feedback matrix of the Cholesky-feedback
  // form of the GPTQ solve (mq/kernels/gptq.h), columns divided by their diagonal (potrf only).
  kCholeskyFeedback,
};

struct InverseFactorArgs {
  int64_t n = 0;  // > 0, < 2^31
  FactorDtype dtype = FactorDtype::kFloat64;
  FactorForm form = FactorForm::kInverseUpper;
  void* a = nullptr;   // n×n of `dtype`, destroyed
  float* u = nullptr;  // n×n output
  // GPU only: one device int32 set to 0 when U is valid, otherwise a nonzero code: 1 = not
  // positive definite (Cholesky failed), 2 = the triangular inverse is singular, 3 = a
  // non-finite value or a non-positive diagonal in the result. Written by the last kernel, so
  // the caller reads it after its own synchronisation (the launcher never synchronises).
  int32_t* status = nullptr;
};

// CPU reference (host pointers; `status` unused). Returns OK with the factor, FailedPrecondition
// "not positive definite" (codes 1-3 above, as text) when the matrix has no factor, or
// InvalidArgument for bad sizes / null pointers.
absl::Status InverseFactorCpu(const InverseFactorArgs& args);

// OK when the GPU factorisation can run on `device` (a visible device, code for it in this
// binary); FailedPrecondition naming the device otherwise; Unimplemented in a build without CUDA.
absl::Status InverseFactorIsSupported(int device);

// Bytes of device workspace LaunchInverseFactor needs for n and dtype on the current device
// (cuSOLVER's buffers plus two info words). Internal error text from cuSOLVER on failure.
absl::Status InverseFactorWorkspaceBytes(int64_t n, FactorDtype dtype, size_t* bytes);

// Enqueues the factorisation on `stream` (current device = the pointers' device). Uses one
// cuSOLVER handle per host thread and device, created on first use and kept for the life of the
// process. Returns after the launches; errors are launch/cuSOLVER API errors only, a matrix
// without a factor is reported through args.status.
absl::Status LaunchInverseFactor(const InverseFactorArgs& args, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream);

}  // namespace mq::kernels
