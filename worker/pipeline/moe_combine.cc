#include "worker/pipeline/moe_combine.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "kernels/torch/combine_ops.h"
#include "mq/kernels/moe_combine.h"

namespace mq::pipeline {

at::Tensor CombineEntries(const at::Tensor& experts, const at::Tensor& send_order, int64_t k) {
  const at::Tensor e = experts.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor o = send_order.to(at::kCPU, at::kLong).contiguous();
  const int64_t n = e.numel(), t_count = k > 0 ? n / k : 0;
  std::vector<int64_t> position(static_cast<size_t>(n));
  const int64_t* op = o.data_ptr<int64_t>();
  for (int64_t p = 0; p < n; ++p) position[op[p]] = p;
  at::Tensor entries = at::empty({k, t_count}, at::kLong);
  int64_t* out = entries.data_ptr<int64_t>();
  const int64_t* ep = e.data_ptr<int64_t>();
  std::vector<int64_t> slots(static_cast<size_t>(k));
  for (int64_t t = 0; t < t_count; ++t) {
    const int64_t* mine = ep + t * k;
    std::iota(slots.begin(), slots.end(), int64_t{0});
    std::sort(slots.begin(), slots.end(), [&](int64_t a, int64_t b) { return mine[a] < mine[b]; });
    for (int64_t j = 0; j < k; ++j) out[j * t_count + t] = position[t * k + slots[j]];
  }
  return entries;
}

void CombinePerExpert(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& tokens,
                      const std::vector<int64_t>& expert_counts, at::Tensor& out) {
  int64_t offset = 0;
  for (const int64_t n : expert_counts) {
    if (n == 0) continue;
    at::Tensor y = rows.narrow(0, offset, n) * weights.narrow(0, offset, n).unsqueeze(1);
    out.index_add_(0, tokens.narrow(0, offset, n), y.to(out.scalar_type()));
    offset += n;
  }
}

void CombinePerToken(at::Tensor& rows, const at::Tensor& weights, const at::Tensor& column_tokens,
                     const at::Tensor& entries, at::Tensor& out, int64_t chunk_bytes) {
  // One pass over the rows instead of a weighting, k gathers and k adds of whole rows per chunk.
  if (rows.is_cuda() && rows.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
      out.is_contiguous() && entries.size(0) <= kernels::kMaxCombineExperts &&
      entries.size(0) > 0 && kernels::MoeCombineTorchSupported(rows.device()).ok()) {
    const absl::Status s =
        kernels::MoeCombineCuda(rows.contiguous(), weights.to(at::kFloat).contiguous(),
                                entries.contiguous(), column_tokens.contiguous(), out);
    if (s.ok()) return;
    TORCH_CHECK(false, "MoE combine: ", std::string(s.message()));
  }
  // fp32 arithmetic stored in rows' dtype: the rounding of CombinePerExpert's product and cast.
  rows.mul_(weights.unsqueeze(1));
  const int64_t t_count = column_tokens.size(0);
  const int64_t row_bytes = std::max<int64_t>(1, out.size(1) * out.element_size());
  const int64_t chunk = std::max<int64_t>(1, chunk_bytes / row_bytes);
  for (int64_t t0 = 0; t0 < t_count; t0 += chunk) {
    const int64_t n = std::min(chunk, t_count - t0);
    const at::Tensor tokens = column_tokens.narrow(0, t0, n);
    at::Tensor sum = out.index_select(0, tokens);
    for (int64_t j = 0; j < entries.size(0); ++j) {
      sum.add_(rows.index_select(0, entries[j].narrow(0, t0, n)));
    }
    out.index_copy_(0, tokens, sum);
  }
}

}  // namespace mq::pipeline
