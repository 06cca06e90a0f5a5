// CUDA GPTQ solve for a batch of matrices (see mq/kernels/gptq.h).
//
// Per block of 128 columns: one fused kernel, one CTA per (matrix, 128-row tile), one thread per
// weight row. The thread keeps its row's 128 block values in registers (fully unrolled, so every
// index is a compile-time constant), the block's 128x128 slice of U sits in shared memory (64 KB,
// read as broadcast float4), and the quantize / error / in-block propagation of every column runs
// without leaving registers; the thread writes its codes (int8) and errors (fp32) for the block.
// Then one cuBLAS batched GEMM (pointer arrays, so matrices sharing a Hessian share U) applies
// the lazy update to all later columns. Work per block: 128·127/2 FMAs per row in the kernel,
// 2·O·128·(I − end) flops in the GEMM (the GEMM dominates: O·I² flops per matrix in total).
//
// Arithmetic mirrors QuantizeGptq's ATen ops exactly: IEEE division (never build with
// --use_fast_math), rint (half even), clamp, product, bf16 round trip, and fma(−u, e, w) for
// ATen's addr_(u, e, beta=1, alpha=-1).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda_image.h"
#include "kernels/gptq_cuda.h"

namespace mq::kernels::detail {
namespace {

constexpr int kBlock = 128;  // columns per block (mq::kernels::kGptqBlock)
constexpr int kRows = 128;   // rows (threads) per CTA
constexpr size_t kUBytes = sizeof(float) * kBlock * kBlock;

struct KernelParams {
  int64_t rows, cols, group_size, groups;
  float qmin, qmax;
  const float* wt;
  const float* const* u;       // [B] device table
  const int32_t* const* perm;  // [B] device table
  const float* scales_t;
  const float* zeros_t;
  int8_t* codes_t;
  float* err;       // [B, 128, O]
  const float* w0;  // Cholesky-feedback form: the original weights [B, I, O]
};

template <bool kAsym, bool kFeedback>
__global__ void __launch_bounds__(kRows)
    GptqBlockKernel(const KernelParams p, const int64_t begin) {
  extern __shared__ float4 smem[];
  float* u_s = reinterpret_cast<float*>(smem);  // [kBlock][kBlock]
  __shared__ int g_s[kBlock];
  const int64_t b = blockIdx.y;
  const int64_t I = p.cols;
  const int64_t O = p.rows;
  const int n = static_cast<int>(min(static_cast<int64_t>(kBlock), I - begin));
  const float* __restrict__ u = p.u[b];
  const int32_t* __restrict__ perm = p.perm[b];

  // The block's U slice, zero-padded to 128x128 for a short last block.
  if ((I & 3) == 0 && n == kBlock && (reinterpret_cast<uintptr_t>(u) & 15) == 0) {
    for (int idx = threadIdx.x; idx < kBlock * kBlock / 4; idx += kRows) {
      const int r = idx / (kBlock / 4);
      const int c4 = idx % (kBlock / 4);
      smem[idx] = __ldg(reinterpret_cast<const float4*>(u + (begin + r) * I + begin) + c4);
    }
  } else {
    for (int idx = threadIdx.x; idx < kBlock * kBlock; idx += kRows) {
      const int r = idx / kBlock;
      const int c = idx % kBlock;
      u_s[idx] = (r < n && c < n) ? __ldg(u + (begin + r) * I + begin + c) : 0.0f;
    }
  }
  for (int i = threadIdx.x; i < kBlock; i += kRows) {
    g_s[i] = i < n ? static_cast<int>(__ldg(perm + begin + i) / p.group_size) : -1;
  }
  __syncthreads();

  const int64_t o = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x;
  if (o >= O) return;
  const float* __restrict__ wt = p.wt + (b * I + begin) * O + o;
  const float* __restrict__ scales = p.scales_t + b * p.groups * O + o;
  const float* __restrict__ zeros = kAsym ? p.zeros_t + b * p.groups * O + o : nullptr;
  int8_t* __restrict__ codes = p.codes_t + (b * I + begin) * O + o;
  float* __restrict__ err = p.err + b * kBlock * O + o;
  const float* __restrict__ w0 = kFeedback ? p.w0 + (b * I + begin) * O + o : nullptr;

  float w[kBlock];
#pragma unroll
  for (int i = 0; i < kBlock; ++i) w[i] = i < n ? wt[i * O] : 0.0f;

#pragma unroll
  for (int i = 0; i < kBlock; ++i) {
    const int g = g_s[i];
    float s = 1.0f;
    float z = 0.0f;
    if (g >= 0) {
      s = __ldg(scales + g * O);
      if constexpr (kAsym) z = __ldg(zeros + g * O);
    }
    float q = __fdiv_rn(w[i], s);
    if constexpr (kAsym) q = __fadd_rn(q, z);
    q = fminf(fmaxf(rintf(q), p.qmin), p.qmax);
    float dq = kAsym ? __fmul_rn(__fsub_rn(q, z), s) : __fmul_rn(q, s);
    dq = __bfloat162float(__float2bfloat16_rn(dq));
    // GPTQ form: e = w − dq, applied with −U. Feedback form: d = w0 − dq, applied with +R.
    const float e = kFeedback ? __fsub_rn(i < n ? w0[i * O] : 0.0f, dq) : __fsub_rn(w[i], dq);
    const float f = kFeedback ? e : -e;
    if (i < n) {
      codes[i * O] = static_cast<int8_t>(static_cast<int>(q));
      err[i * O] = e;
    }
    const float4* urow = reinterpret_cast<const float4*>(u_s + i * kBlock);
#pragma unroll
    for (int k4 = (i + 1) / 4; k4 < kBlock / 4; ++k4) {
      const float4 uu = urow[k4];
      if (4 * k4 + 0 > i) w[4 * k4 + 0] = __fmaf_rn(uu.x, f, w[4 * k4 + 0]);
      if (4 * k4 + 1 > i) w[4 * k4 + 1] = __fmaf_rn(uu.y, f, w[4 * k4 + 1]);
      if (4 * k4 + 2 > i) w[4 * k4 + 2] = __fmaf_rn(uu.z, f, w[4 * k4 + 2]);
      if (4 * k4 + 3 > i) w[4 * k4 + 3] = __fmaf_rn(uu.w, f, w[4 * k4 + 3]);
    }
  }
}

// One cuBLAS handle per (thread, device), created on first use and kept for the thread's life.
cublasHandle_t Handle(int device, cublasStatus_t* status) {
  thread_local std::vector<cublasHandle_t> handles;
  if (static_cast<int>(handles.size()) <= device) handles.resize(device + 1, nullptr);
  if (handles[device] == nullptr) {
    *status = cublasCreate(&handles[device]);
    if (*status != CUBLAS_STATUS_SUCCESS) {
      handles[device] = nullptr;
      return nullptr;
    }
  }
  *status = CUBLAS_STATUS_SUCCESS;
  return handles[device];
}

std::string CudaText(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

std::string CublasText(const char* what, cublasStatus_t st) {
  return std::string(what) + ": " + cublasGetStatusName(st) + ": " + cublasGetStatusString(st);
}

int64_t GemmBlocks(int64_t cols) { return cols > kBlock ? (cols - 1) / kBlock : 0; }

size_t Align16(size_t n) { return (n + 15) & ~size_t{15}; }

}  // namespace

size_t GptqWorkspaceBytesRaw(int64_t batch, int64_t rows, int64_t cols) {
  const size_t err = Align16(sizeof(float) * batch * kBlock * rows);
  const size_t tables = sizeof(void*) * batch * (2 + 3 * GemmBlocks(cols));
  return err + Align16(tables);
}

std::string LaunchGptqSolveRaw(const GptqRawArgs& a, void* workspace, cudaStream_t stream) {
  const int64_t B = a.batch, O = a.rows, I = a.cols;
  const int64_t nb = GemmBlocks(I);
  char* ws = static_cast<char*>(workspace);
  float* err = reinterpret_cast<float*>(ws);
  void** tables = reinterpret_cast<void**>(ws + Align16(sizeof(float) * B * kBlock * O));
  // Host copy of the tables: [u B][perm B] then per GEMM block [A B][B B][C B].
  std::vector<void*> host(static_cast<size_t>(B * (2 + 3 * nb)));
  for (int64_t b = 0; b < B; ++b) {
    host[b] = const_cast<float*>(a.u_host[b]);
    host[B + b] = const_cast<int32_t*>(a.perm_host[b]);
  }
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t begin = blk * kBlock, end = begin + kBlock;
    void** t = host.data() + 2 * B + 3 * B * blk;
    for (int64_t b = 0; b < B; ++b) {
      t[b] = err + b * kBlock * O;
      t[B + b] = const_cast<float*>(a.u_host[b]) + begin * I + end;
      t[2 * B + b] = a.wt + (b * I + end) * O;
    }
  }
  // Pageable source: returns once the bytes are staged, so `host` may go out of scope.
  if (cudaError_t e = cudaMemcpyAsync(tables, host.data(), sizeof(void*) * host.size(),
                                      cudaMemcpyHostToDevice, stream);
      e != cudaSuccess) {
    return CudaText("cudaMemcpyAsync(pointer tables)", e);
  }

  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return CudaText("cudaGetDevice", e);
  cublasStatus_t st;
  cublasHandle_t handle = Handle(device, &st);
  if (handle == nullptr) return CublasText("cublasCreate", st);
  if ((st = cublasSetStream(handle, stream)) != CUBLAS_STATUS_SUCCESS) {
    return CublasText("cublasSetStream", st);
  }

  KernelParams p;
  p.rows = O;
  p.cols = I;
  p.group_size = a.group_size;
  p.groups = (I + a.group_size - 1) / a.group_size;
  p.qmin = static_cast<float>(-(1 << (a.bits - 1)));
  p.qmax = static_cast<float>((1 << (a.bits - 1)) - 1);
  p.wt = a.wt;
  p.u = reinterpret_cast<const float* const*>(tables);
  p.perm = reinterpret_cast<const int32_t* const*>(tables + B);
  p.scales_t = a.scales_t;
  p.zeros_t = a.zeros_t;
  p.codes_t = a.codes_t;
  p.err = err;
  p.w0 = a.w0;
  const bool asym = a.zeros_t != nullptr;
  const bool feedback = a.w0 != nullptr;
  auto kernel = asym ? (feedback ? GptqBlockKernel<true, true> : GptqBlockKernel<true, false>)
                     : (feedback ? GptqBlockKernel<false, true> : GptqBlockKernel<false, false>);
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kUBytes));
      e != cudaSuccess) {
    return CudaText("cudaFuncSetAttribute", e);
  }
  const dim3 grid(static_cast<unsigned>((O + kRows - 1) / kRows), static_cast<unsigned>(B));
  const float alpha = feedback ? 1.0f : -1.0f, beta = 1.0f;
  const cublasComputeType_t compute = a.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  for (int64_t begin = 0, blk = 0; begin < I; begin += kBlock, ++blk) {
    kernel<<<grid, kRows, kUBytes, stream>>>(p, begin);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
      return CudaText("GPTQ block kernel launch", e);
    }
    const int64_t end = begin + kBlock;
    if (end >= I) break;
    void** t = tables + 2 * B + 3 * B * blk;
    st = cublasGemmBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(O),
                             static_cast<int>(I - end), kBlock, &alpha, t, CUDA_R_32F,
                             static_cast<int>(O), t + B, CUDA_R_32F, static_cast<int>(I), &beta,
                             t + 2 * B, CUDA_R_32F, static_cast<int>(O), static_cast<int>(B),
                             compute, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) return CublasText("cublasGemmBatchedEx(lazy update)", st);
  }
  return std::string();
}

cudaError_t CheckGptqImage(int device) {
  return CheckKernelImages(device,
                           {
                               reinterpret_cast<const void*>(&GptqBlockKernel<false, false>),
                               reinterpret_cast<const void*>(&GptqBlockKernel<true, false>),
                               reinterpret_cast<const void*>(&GptqBlockKernel<false, true>),
                               reinterpret_cast<const void*>(&GptqBlockKernel<true, true>),
                           });
}

}  // namespace mq::kernels::detail
