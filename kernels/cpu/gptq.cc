// CPU reference of the batched GPTQ solve (mq/kernels/gptq.h): the same element arithmetic as the
// CUDA kernel, in plain loops. Slow (O·I² multiply-adds per matrix): for tests on small shapes.
#include "mq/kernels/gptq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "kernels/gptq_internal.h"

namespace mq::kernels {

namespace {

// bf16 round-to-nearest-even of a finite float, back to float.
float RoundBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  bits &= 0xFFFF0000u;
  float y;
  std::memcpy(&y, &bits, sizeof(y));
  return y;
}

}  // namespace

absl::Status GptqSolveCpu(const GptqSolveArgs& a) {
  if (absl::Status s = ValidateGptqSolveArgs(a); !s.ok()) return s;
  if (a.batch == 0) return absl::OkStatus();
  const int64_t O = a.rows, I = a.cols, B = a.batch, K = kGptqBlock;
  const int64_t groups = (I + a.group_size - 1) / a.group_size;
  const float qmin = static_cast<float>(-(1 << (a.bits - 1)));
  const float qmax = static_cast<float>((1 << (a.bits - 1)) - 1);
  std::vector<float> err(static_cast<size_t>(K * O));
  for (int64_t b = 0; b < B; ++b) {
    const float* u = a.u[b];
    const int32_t* perm = a.perm[b];
    float* wt = a.wt + b * I * O;
    const float* w0 = a.w0 != nullptr ? a.w0 + b * I * O : nullptr;
    const float* scales = a.scales_t + b * groups * O;
    const float* zeros = a.zeros_t != nullptr ? a.zeros_t + b * groups * O : nullptr;
    int8_t* codes = a.codes_t + b * I * O;
    for (int64_t begin = 0; begin < I; begin += K) {
      const int64_t n = std::min(K, I - begin);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = begin + i;
        const int64_t g = perm[t] / a.group_size;
        for (int64_t o = 0; o < O; ++o) {
          const float s = scales[g * O + o];
          const float z = zeros != nullptr ? zeros[g * O + o] : 0.0f;
          const float w = wt[t * O + o];
          float q = w / s;
          if (zeros != nullptr) q = q + z;
          q = std::min(std::max(std::nearbyint(q), qmin), qmax);
          const float dq = RoundBf16(zeros != nullptr ? (q - z) * s : q * s);
          // GPTQ form: e = w − dq, applied with −U; feedback form: d = w0 − dq, applied with +R.
          const float e = w0 != nullptr ? w0[t * O + o] - dq : w - dq;
          const float f = w0 != nullptr ? e : -e;
          codes[t * O + o] = static_cast<int8_t>(static_cast<int>(q));
          err[i * O + o] = e;
          for (int64_t k = i + 1; k < n; ++k) {
            float& x = wt[(begin + k) * O + o];
            x = std::fma(u[t * I + begin + k], f, x);
          }
        }
      }
      const int64_t end = begin + n;
      for (int64_t r = end; r < I; ++r) {
        for (int64_t o = 0; o < O; ++o) {
          float acc = 0.0f;
          for (int64_t k = 0; k < n; ++k)
            acc = std::fma(u[(begin + k) * I + r], err[k * O + o], acc);
          if (w0 != nullptr) {
            wt[r * O + o] += acc;
          } else {
            wt[r * O + o] -= acc;
          }
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace mq::kernels
