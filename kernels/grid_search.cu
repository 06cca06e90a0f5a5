// CUDA MSE scale (grid) search (see mq/kernels/grid_search.h).
//
// One (row, group) set per warp (groups of up to 256 columns: 8 sets per 256-thread CTA) or per
// CTA (longer groups). Each thread loads its columns once (lane-strided, so the loads coalesce)
// and keeps them in registers (kV per thread, a compile-time bucket: 1, 2, 4, 8 per lane of a
// warp; 4, 16, 32 per thread of a CTA); groups longer than 8192 columns are re-read from memory
// (L1/L2) for every candidate. mn and mx come from one min/max reduction. Candidates are handled
// 32 at a time: lane j computes candidate k0 + j's (scale, zero point), and the loop over the 32
// broadcasts each one with a shuffle, so the per-candidate overhead is two shuffles instead of a
// double-precision division and two fp32 divisions on every lane. Per candidate each thread sums
// its columns' terms in fp32 in column order, then a butterfly (xor) warp reduction gives every
// lane the same total (fp32 addition is commutative, so partners compute identical sums); a CTA
// adds the 8 warp totals from shared memory in warp order, every thread identically. Every
// thread therefore tracks the same best candidate (strictly smaller loss wins, so ties keep the
// earlier one), and thread 0 of the set writes it. The CTA path synchronizes once per candidate,
// with the warp totals double-buffered in shared memory.
//
// Arithmetic is spelled with the _rn intrinsics (IEEE division, no FMA contraction) so that the
// candidates are bit-identical to the CPU reference's; never build with --use_fast_math or
// -ftz=true (subnormal weights would flush). The loss term |e|^norm for norm != 2 is
// e^⌊norm⌋ · 2^(f·log2 e) with f = norm − ⌊norm⌋ from the hardware's base-2 logarithm and
// exponential (lg2/ex2.approx): powf computes its logarithm in extended precision and was most
// of the kernel's instructions (norm 2.4: f = 0.4, so the approximation's error is scaled by 0.4;
// under 1e-6 relative per term, against powf's 2 ulp).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda_image.h"
#include "kernels/grid_search_cuda.h"

namespace mq::kernels::detail {
namespace {

constexpr int kThreads = 256;  // threads per CTA (both kernels)
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // CTAs; the kernels grid-stride beyond
// Longest group (columns) of each path: warp with the group in registers, CTA with the group in
// registers; longer groups are re-read per candidate.
constexpr int64_t kMaxWarpGroup = 32 * 8;
constexpr int64_t kMaxRegisterGroup = int64_t{kThreads} * 32;

struct Params {
  const float* w;
  float* scales;
  float* zero_points;
  int64_t rows, cols, group_size, groups;
  double min_shrink;
  int n_points;
  float qmin, qmax;
  float half_range;  // (qmax - qmin) / 2, exact
  float range;       // qmax - qmin, exact
  int norm_int;      // ⌊norm⌋
  float norm_frac;   // norm − ⌊norm⌋, in [0, 1)
};

struct Candidate {
  float s, z;
  float inv;  // 1 / s, rounded: the loss quantizes x·inv (see Term)
};

// bf16 round-to-nearest-even of a finite float, back to float.
__device__ __forceinline__ float RoundBf16(float x) {
  uint32_t bits = __float_as_uint(x);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return __uint_as_float(bits & 0xFFFF0000u);
}

// A raw scale rounded to bf16; a zero or subnormal result becomes bf16 eps (2^-7).
__device__ __forceinline__ float RoundScale(float raw) {
  const float s = RoundBf16(raw);
  return (__float_as_uint(s) & 0x7F800000u) == 0 ? 0.0078125f : s;
}

// Candidate k of a group with min mn <= 0 and max mx >= 0.
template <bool kSym>
__device__ __forceinline__ Candidate MakeCandidate(const Params& p, int k, float mn, float mx) {
  const double shrink_d =
      __dsub_rn(1.0, __ddiv_rn(__dmul_rn(static_cast<double>(k), __dsub_rn(1.0, p.min_shrink)),
                               static_cast<double>(p.n_points - 1)));
  const float shrink = __double2float_rn(shrink_d);
  Candidate c;
  if constexpr (kSym) {
    const float raw = __fdiv_rn(fmaxf(-mn, mx), p.half_range);
    c.s = RoundScale(__fmul_rn(raw, shrink));
    c.z = 0.0f;
  } else {
    const float lo = __fmul_rn(mn, shrink);
    const float hi = __fmul_rn(mx, shrink);
    c.s = RoundScale(__fdiv_rn(__fsub_rn(hi, lo), p.range));
    c.z = fminf(fmaxf(rintf(__fsub_rn(p.qmin, __fdiv_rn(lo, c.s))), p.qmin), p.qmax);
  }
  c.inv = __frcp_rn(c.s);
  return c;
}

// e^norm for e >= 0 (0 for e = 0): e^⌊norm⌋ exactly multiplied out, times 2^(f·log2 e) from the
// approximate base-2 log and exponential (both handle subnormals without -ftz).
__device__ __forceinline__ float Power(float e, const Params& p) {
  float r = 1.0f;
  if (p.norm_frac != 0.0f) {
    float l, x;
    asm("lg2.approx.f32 %0, %1;" : "=f"(l) : "f"(e));  // -inf for e = 0
    const float t = __fmul_rn(p.norm_frac, l);
    asm("ex2.approx.f32 %0, %1;" : "=f"(x) : "f"(t));  // 0 for -inf
    r = x;
  }
  for (int i = 0; i < p.norm_int; ++i) r = __fmul_rn(r, e);
  return r;
}

// |bf16((q - z)·s) - x|^norm for q = clamp(rint(x·(1/s) + z), qmin, qmax). x·(1/s) differs from
// x / s by at most an ulp, so q differs from the reference's only where x / s is within an ulp of
// a rounding midpoint, and there both codes are half a step from x: the term changes by rounding.
template <bool kSym, bool kNorm2>
__device__ __forceinline__ float Term(float x, const Candidate& c, const Params& p) {
  float q = __fmul_rn(x, c.inv);
  if constexpr (!kSym) q = __fadd_rn(q, c.z);
  q = fminf(fmaxf(rintf(q), p.qmin), p.qmax);
  const float d = kSym ? q : __fsub_rn(q, c.z);
  const float e = fabsf(__fsub_rn(RoundBf16(__fmul_rn(d, c.s)), x));
  if constexpr (kNorm2) {
    return __fmul_rn(e, e);
  } else {
    return Power(e, p);
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ __forceinline__ void WarpMinMax(float& mn, float& mx) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(kFullMask, mn, off));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
  }
}

// Candidate k0 + lane (clamped to the last one), for broadcasting with BroadcastCandidate.
template <bool kSym>
__device__ __forceinline__ Candidate LaneCandidate(const Params& p, int k0, int lane, float mn,
                                                   float mx) {
  const int k = k0 + lane < p.n_points ? k0 + lane : p.n_points - 1;
  return MakeCandidate<kSym>(p, k, mn, mx);
}

template <bool kSym>
__device__ __forceinline__ Candidate BroadcastCandidate(const Candidate& mine, int j) {
  Candidate c;
  c.s = __shfl_sync(kFullMask, mine.s, j);
  c.z = kSym ? 0.0f : __shfl_sync(kFullMask, mine.z, j);
  c.inv = __shfl_sync(kFullMask, mine.inv, j);
  return c;
}

__device__ __forceinline__ int64_t GroupLength(const Params& p, int64_t c0) {
  const int64_t left = p.cols - c0;
  return left < p.group_size ? left : p.group_size;
}

// One warp per (row, group); group length <= 32·kV.
template <int kV, bool kSym, bool kNorm2>
__global__ void __launch_bounds__(kThreads) GridSearchWarpKernel(const Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t tasks = p.rows * p.groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; task < tasks;
       task += stride) {
    const int64_t row = task / p.groups;
    const int64_t c0 = (task - row * p.groups) * p.group_size;
    const int len = static_cast<int>(GroupLength(p, c0));
    const float* __restrict__ src = p.w + row * p.cols + c0;
    float x[kV];
    float mn = 0.0f, mx = 0.0f;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int c = lane + 32 * i;
      x[i] = c < len ? src[c] : 0.0f;
      mn = fminf(mn, x[i]);
      mx = fmaxf(mx, x[i]);
    }
    WarpMinMax(mn, mx);

    Candidate best{0.0f, 0.0f, 0.0f};
    float best_loss = 0.0f;
    for (int k0 = 0; k0 < p.n_points; k0 += 32) {
      const Candidate mine = LaneCandidate<kSym>(p, k0, lane, mn, mx);
      const int count = p.n_points - k0 < 32 ? p.n_points - k0 : 32;
      for (int j = 0; j < count; ++j) {
        const Candidate c = BroadcastCandidate<kSym>(mine, j);
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < kV; ++i) {
          if (lane + 32 * i < len) acc = __fadd_rn(acc, Term<kSym, kNorm2>(x[i], c, p));
        }
        acc = WarpSum(acc);
        if (k0 + j == 0 || acc < best_loss) {
          best_loss = acc;
          best = c;
        }
      }
    }
    if (lane == 0) {
      p.scales[task] = best.s;
      if constexpr (!kSym) p.zero_points[task] = best.z;
    }
  }
}

// One CTA per (row, group); group length <= kThreads·kV, or any length for kV == 0 (columns
// re-read from memory per candidate).
template <int kV, bool kSym, bool kNorm2>
__global__ void __launch_bounds__(kThreads) GridSearchBlockKernel(const Params p) {
  constexpr int kSlots = kV > 0 ? kV : 1;
  __shared__ float loss_s[2][kWarps];  // warp totals, double-buffered by candidate parity
  __shared__ float mn_s[kWarps], mx_s[kWarps];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t tasks = p.rows * p.groups;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t row = task / p.groups;
    const int64_t c0 = (task - row * p.groups) * p.group_size;
    const int len = static_cast<int>(GroupLength(p, c0));
    const float* __restrict__ src = p.w + row * p.cols + c0;
    float x[kSlots];
    float mn = 0.0f, mx = 0.0f;
    if constexpr (kV > 0) {
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const int c = tid + kThreads * i;
        x[i] = c < len ? src[c] : 0.0f;
        mn = fminf(mn, x[i]);
        mx = fmaxf(mx, x[i]);
      }
    } else {
      x[0] = 0.0f;
      for (int c = tid; c < len; c += kThreads) {
        const float v = src[c];
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
      }
    }
    WarpMinMax(mn, mx);
    if (lane == 0) {
      mn_s[warp] = mn;
      mx_s[warp] = mx;
    }
    __syncthreads();
    mn = mn_s[0];
    mx = mx_s[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      mn = fminf(mn, mn_s[w]);
      mx = fmaxf(mx, mx_s[w]);
    }

    Candidate best{0.0f, 0.0f, 0.0f};
    float best_loss = 0.0f;
    for (int k0 = 0; k0 < p.n_points; k0 += 32) {
      const Candidate mine = LaneCandidate<kSym>(p, k0, lane, mn, mx);
      const int count = p.n_points - k0 < 32 ? p.n_points - k0 : 32;
      for (int j = 0; j < count; ++j) {
        const int k = k0 + j;
        const Candidate c = BroadcastCandidate<kSym>(mine, j);
        float acc = 0.0f;
        if constexpr (kV > 0) {
#pragma unroll
          for (int i = 0; i < kV; ++i) {
            if (tid + kThreads * i < len) acc = __fadd_rn(acc, Term<kSym, kNorm2>(x[i], c, p));
          }
        } else {
          for (int col = tid; col < len; col += kThreads) {
            acc = __fadd_rn(acc, Term<kSym, kNorm2>(src[col], c, p));
          }
        }
        acc = WarpSum(acc);
        // Buffer k & 1 was last read in candidate k - 2, before every thread passed the barrier
        // of candidate k - 1, so writing it here cannot race with those reads.
        if (lane == 0) loss_s[k & 1][warp] = acc;
        __syncthreads();
        float total = loss_s[k & 1][0];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) total = __fadd_rn(total, loss_s[k & 1][w]);
        if (k == 0 || total < best_loss) {
          best_loss = total;
          best = c;
        }
      }
    }
    if (tid == 0) {
      p.scales[task] = best.s;
      if constexpr (!kSym) p.zero_points[task] = best.z;
    }
    // The next set's writes of mn_s / mx_s and loss_s must wait for every thread's reads.
    __syncthreads();
  }
}

int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <bool kSym, bool kNorm2>
cudaError_t LaunchTyped(const Params& p, cudaStream_t stream) {
  const int64_t tasks = p.rows * p.groups;
  const int64_t len = Min64(p.group_size, p.cols);
  if (len <= kMaxWarpGroup) {
    const unsigned grid = static_cast<unsigned>(Min64((tasks + kWarps - 1) / kWarps, kMaxGrid));
    if (len <= 32) {
      GridSearchWarpKernel<1, kSym, kNorm2><<<grid, kThreads, 0, stream>>>(p);
    } else if (len <= 64) {
      GridSearchWarpKernel<2, kSym, kNorm2><<<grid, kThreads, 0, stream>>>(p);
    } else if (len <= 128) {
      GridSearchWarpKernel<4, kSym, kNorm2><<<grid, kThreads, 0, stream>>>(p);
    } else {
      GridSearchWarpKernel<8, kSym, kNorm2><<<grid, kThreads, 0, stream>>>(p);
    }
  } else {
    const unsigned grid = static_cast<unsigned>(Min64(tasks, kMaxGrid));
    if (len <= kThreads * 4) {
      GridSearchBlockKernel<4, kSym, kNorm2><<<grid, kThreads, 0, stream>>>(p);
    } else if (len <= kThreads * 16) {
      GridSearchBlockKernel<16, kSym, kNorm2><<<grid, kThreads, 0, stream>>>(p);
    } else if (len <= kMaxRegisterGroup) {
      GridSearchBlockKernel<32, kSym, kNorm2><<<grid, kThreads, 0, stream>>>(p);
    } else {
      GridSearchBlockKernel<0, kSym, kNorm2><<<grid, kThreads, 0, stream>>>(p);
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchGridSearchRaw(const GridSearchRawArgs& a, cudaStream_t stream) {
  Params p;
  p.w = a.w;
  p.scales = a.scales;
  p.zero_points = a.zero_points;
  p.rows = a.rows;
  p.cols = a.cols;
  p.group_size = a.group_size;
  p.groups = (a.cols + a.group_size - 1) / a.group_size;
  p.min_shrink = a.min_shrink;
  p.n_points = a.n_points;
  p.qmin = static_cast<float>(-(1 << (a.bits - 1)));
  p.qmax = static_cast<float>((1 << (a.bits - 1)) - 1);
  p.half_range = static_cast<float>((static_cast<double>(p.qmax) - p.qmin) / 2.0);
  p.range = p.qmax - p.qmin;
  p.norm_int = static_cast<int>(std::floor(a.norm));
  p.norm_frac = static_cast<float>(a.norm - std::floor(a.norm));
  const bool norm2 = a.norm == 2.0;
  if (a.symmetric) {
    return norm2 ? LaunchTyped<true, true>(p, stream) : LaunchTyped<true, false>(p, stream);
  }
  return norm2 ? LaunchTyped<false, true>(p, stream) : LaunchTyped<false, false>(p, stream);
}

cudaError_t CheckGridSearchImage(int device) {
  return CheckKernelImages(
      device, {
                  reinterpret_cast<const void*>(&GridSearchWarpKernel<4, true, false>),
                  reinterpret_cast<const void*>(&GridSearchBlockKernel<0, false, true>),
              });
}

}  // namespace mq::kernels::detail
