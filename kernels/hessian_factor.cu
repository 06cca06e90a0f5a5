// GPU factorisation of a damped, permuted Hessian into GPTQ's normalized upper factor of H⁻¹
// (see mq/kernels/hessian_factor.h): flip kernel, cuSOLVER potrf + trtri, one finishing kernel.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "kernels/cuda_image.h"
#include "kernels/hessian_factor_cuda.h"

namespace mq::kernels::detail {
namespace {

constexpr int kTile = 32;

std::string SolverError(const char* call, cusolverStatus_t s) {
  return std::string(call) + " failed with cusolverStatus_t " + std::to_string(static_cast<int>(s));
}

// Swaps element idx with element n²−1−idx: in a row-major n×n matrix that maps (i, j) to
// (n−1−i, n−1−j), i.e. J·A·J.
template <typename T>
__global__ void FlipKernel(T* __restrict__ a, int64_t total) {
  const int64_t half = total / 2;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < half;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t other = total - 1 - idx;
    const T x = a[idx];
    a[idx] = a[other];
    a[other] = x;
  }
}

// After potrf (lower) and trtri (lower) in column-major, inverse(r, c) = m[c·n + r] for r ≥ c.
// U[i][j] = inverse(n−1−i, n−1−j) / inverse(n−1−i, n−1−i) for j ≥ i, else 0. With i' = n−1−i and
// j' = n−1−j the read m[j'·n + i'] is coalesced along i' and the write u[i·n + j] along j, so a
// 32×33 shared tile transposes between them. Any non-finite value or non-positive diagonal sets
// *bad.
// kByColumn (the Cholesky-feedback form, m holding L itself): the same element divided by the
// diagonal of its COLUMN j instead of its row i.
template <typename T, bool kByColumn>
__global__ void FinishKernel(const T* __restrict__ m, int64_t n, float* __restrict__ u,
                             int32_t* __restrict__ bad) {
  __shared__ float tile[kTile][kTile + 1];
  // This CTA covers output rows i in [i0, i0+32) and columns j in [j0, j0+32).
  const int64_t i0 = int64_t{blockIdx.y} * kTile;
  const int64_t j0 = int64_t{blockIdx.x} * kTile;
  const int tx = threadIdx.x;  // 0..31
  bool flag = false;
  if (j0 + kTile - 1 >= i0) {  // tiles entirely below the diagonal are zeros
    // Read: column j' = n−1−(j0+jj), rows i' = n−1−(i0+ii) for ii = tx (coalesced in i').
    for (int jj = threadIdx.y; jj < kTile; jj += blockDim.y) {
      const int64_t j = j0 + jj;
      const int64_t i = i0 + tx;
      float v = 0.0f;
      if (i < n && j < n && j >= i) {
        const int64_t ip = n - 1 - i;
        const int64_t jp = n - 1 - j;
        const double x = static_cast<double>(m[jp * n + ip]);
        const double d = static_cast<double>(kByColumn ? m[jp * n + jp] : m[ip * n + ip]);
        const double r = x / d;
        if (!isfinite(x) || !(d > 0.0) || !isfinite(r)) flag = true;
        v = static_cast<float>(r);
      }
      tile[tx][jj] = v;  // tile[row ii][col jj]
    }
  }
  __syncthreads();
  for (int ii = threadIdx.y; ii < kTile; ii += blockDim.y) {
    const int64_t i = i0 + ii;
    const int64_t j = j0 + tx;
    if (i < n && j < n) u[i * n + j] = (j0 + kTile - 1 >= i0) ? tile[ii][tx] : 0.0f;
  }
  if (flag) atomicOr(bad, 4);
}

// Folds the two cuSOLVER info words and the finishing flag into the status code of the header.
__global__ void StatusKernel(const int* info_potrf, const int* info_trtri, const int32_t* bad,
                             int32_t* status) {
  int32_t s = 0;
  if (*info_potrf != 0) {
    s = 1;
  } else if (*info_trtri != 0) {
    s = 2;
  } else if (*bad != 0) {
    s = 3;
  }
  *status = s;
}

struct Context {
  cusolverDnHandle_t handle = nullptr;
  cusolverDnParams_t params = nullptr;
  std::vector<char> host;  // host workspace (cuSOLVER reports 0 bytes for these calls on GPUs)
};

// One handle per host thread and device, kept for the life of the thread.
std::string GetContext(Context** out) {
  thread_local std::map<int, Context> contexts;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) {
    return std::string("cudaGetDevice: ") + cudaGetErrorString(e);
  }
  Context& c = contexts[device];
  if (c.handle == nullptr) {
    if (cusolverStatus_t s = cusolverDnCreate(&c.handle); s != CUSOLVER_STATUS_SUCCESS) {
      c.handle = nullptr;
      return SolverError("cusolverDnCreate", s);
    }
    if (cusolverStatus_t s = cusolverDnCreateParams(&c.params); s != CUSOLVER_STATUS_SUCCESS) {
      return SolverError("cusolverDnCreateParams", s);
    }
  }
  *out = &c;
  return "";
}

cudaDataType DataType(bool fp64) { return fp64 ? CUDA_R_64F : CUDA_R_32F; }

struct Sizes {
  size_t potrf_device = 0, potrf_host = 0, trtri_device = 0, trtri_host = 0;
};

std::string QuerySizes(Context& c, int64_t n, bool fp64, Sizes& s) {
  const cudaDataType t = DataType(fp64);
  if (cusolverStatus_t r =
          cusolverDnXpotrf_bufferSize(c.handle, c.params, CUBLAS_FILL_MODE_LOWER, n, t, nullptr, n,
                                      t, &s.potrf_device, &s.potrf_host);
      r != CUSOLVER_STATUS_SUCCESS) {
    return SolverError("cusolverDnXpotrf_bufferSize", r);
  }
  if (cusolverStatus_t r =
          cusolverDnXtrtri_bufferSize(c.handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, t,
                                      nullptr, n, &s.trtri_device, &s.trtri_host);
      r != CUSOLVER_STATUS_SUCCESS) {
    return SolverError("cusolverDnXtrtri_bufferSize", r);
  }
  return "";
}

constexpr size_t kAlign = 256;
size_t Up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
// Workspace: [info potrf | info trtri | bad] in the first kAlign bytes, then cuSOLVER's buffer.
size_t Total(const Sizes& s) { return kAlign + Up(std::max(s.potrf_device, s.trtri_device)); }

template <typename T>
std::string Run(const InverseFactorRawArgs& args, void* workspace, const Sizes& sizes, Context& c,
                cudaStream_t stream) {
  const int64_t n = args.n;
  const bool fp64 = sizeof(T) == 8;
  const cudaDataType t = DataType(fp64);
  T* a = static_cast<T*>(args.a);
  char* ws = static_cast<char*>(workspace);
  int* info_potrf = reinterpret_cast<int*>(ws);
  int* info_trtri = info_potrf + 1;
  int32_t* bad = reinterpret_cast<int32_t*>(info_potrf + 2);
  void* buffer = ws + kAlign;
  const size_t buffer_bytes = Up(std::max(sizes.potrf_device, sizes.trtri_device));
  const size_t host_bytes = std::max(sizes.potrf_host, sizes.trtri_host);
  if (c.host.size() < host_bytes) c.host.resize(host_bytes);

  if (cudaError_t e = cudaMemsetAsync(ws, 0, 3 * sizeof(int), stream); e != cudaSuccess) {
    return std::string("cudaMemsetAsync: ") + cudaGetErrorString(e);
  }
  const int64_t total = n * n;
  const int threads = 256;
  const int64_t want = (total / 2 + threads - 1) / threads;
  const int blocks = static_cast<int>(std::min<int64_t>(std::max<int64_t>(want, 1), 65535));
  FlipKernel<T><<<blocks, threads, 0, stream>>>(a, total);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
    return std::string("flip kernel launch: ") + cudaGetErrorString(e);
  }
  if (cusolverStatus_t s = cusolverDnSetStream(c.handle, stream); s != CUSOLVER_STATUS_SUCCESS) {
    return SolverError("cusolverDnSetStream", s);
  }
  if (cusolverStatus_t s = cusolverDnXpotrf(
          c.handle, c.params, CUBLAS_FILL_MODE_LOWER, n, t, a, n, t, buffer, buffer_bytes,
          host_bytes ? c.host.data() : nullptr, sizes.potrf_host, info_potrf);
      s != CUSOLVER_STATUS_SUCCESS) {
    return SolverError("cusolverDnXpotrf", s);
  }
  // trtri on a failed factor would read garbage but stays in bounds; the status says potrf
  // failed first.
  if (args.feedback) {
    if (cudaError_t e = cudaMemsetAsync(info_trtri, 0, sizeof(int), stream); e != cudaSuccess) {
      return std::string("cudaMemsetAsync: ") + cudaGetErrorString(e);
    }
  } else if (cusolverStatus_t s = cusolverDnXtrtri(
                 c.handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, t, a, n, buffer,
                 buffer_bytes, host_bytes ? c.host.data() : nullptr, sizes.trtri_host, info_trtri);
             s != CUSOLVER_STATUS_SUCCESS) {
    return SolverError("cusolverDnXtrtri", s);
  }
  const dim3 grid(static_cast<unsigned>((n + kTile - 1) / kTile),
                  static_cast<unsigned>((n + kTile - 1) / kTile));
  if (args.feedback) {
    FinishKernel<T, true><<<grid, dim3(kTile, 8), 0, stream>>>(a, n, args.u, bad);
  } else {
    FinishKernel<T, false><<<grid, dim3(kTile, 8), 0, stream>>>(a, n, args.u, bad);
  }
  StatusKernel<<<1, 1, 0, stream>>>(info_potrf, info_trtri, bad, args.status);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
    return std::string("finish kernel launch: ") + cudaGetErrorString(e);
  }
  return "";
}

}  // namespace

std::string InverseFactorWorkspaceBytesRaw(int64_t n, bool fp64, size_t* bytes) {
  Context* c = nullptr;
  if (std::string err = GetContext(&c); !err.empty()) return err;
  Sizes s;
  if (std::string err = QuerySizes(*c, n, fp64, s); !err.empty()) return err;
  *bytes = Total(s);
  return "";
}

std::string LaunchInverseFactorRaw(const InverseFactorRawArgs& args, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream) {
  Context* c = nullptr;
  if (std::string err = GetContext(&c); !err.empty()) return err;
  Sizes s;
  if (std::string err = QuerySizes(*c, args.n, args.fp64, s); !err.empty()) return err;
  if (workspace_bytes < Total(s)) {
    return "workspace of " + std::to_string(workspace_bytes) + " bytes: needs " +
           std::to_string(Total(s));
  }
  return args.fp64 ? Run<double>(args, workspace, s, *c, stream)
                   : Run<float>(args, workspace, s, *c, stream);
}

cudaError_t CheckInverseFactorImage(int device) {
  return CheckKernelImages(device, {
                                       reinterpret_cast<const void*>(&FinishKernel<double, false>),
                                       reinterpret_cast<const void*>(&FinishKernel<double, true>),
                                       reinterpret_cast<const void*>(&FlipKernel<double>),
                                   });
}

}  // namespace mq::kernels::detail
