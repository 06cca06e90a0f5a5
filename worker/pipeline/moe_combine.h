// The MoE block's last step: the routed experts' output rows, weighted by the router, summed into
// their tokens' rows. Two ways with the same sums, roundings and order (ascending expert per
// token, each product rounded to the rows' dtype, each sum rounded to out's), so that their
// results are equal bit for bit: expert by expert (the reference, one scatter-add per expert) and
// token by token (gathers and adds of whole rows, no atomic scatter-add on a GPU).
//
// Layout of the sent rows (the dispatch's send order): by ascending expert, each expert's rows in
// token order; row i belongs to token tokens[i] with routing weight weights[i] (fp32).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mq::pipeline {

// Token t's j-th routed expert is experts[t * k + j] (int64 [T * k], a token's experts distinct);
// send_order[p] is the entry sent at position p (int64 [T * k], experts ascending, tokens in
// order within each). Returns int64 [k, T] on the CPU: for each token, the send positions of its
// k entries by ascending expert.
at::Tensor CombineEntries(const at::Tensor& experts, const at::Tensor& send_order, int64_t k);

// out[tokens[i]] += (rows[i] * weights[i]) for every sent row, one expert at a time in ascending
// order (expert_counts[e] rows each).
void CombinePerExpert(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& tokens,
                      const std::vector<int64_t>& expert_counts, at::Tensor& out);

// The same result as CombinePerExpert, token by token. Column t of `entries` (CombineEntries, on
// rows' device) holds the rows of token column_tokens[t]. bf16 on a CUDA device that runs it: one
// kernel (mq/kernels/moe_combine.h), `rows` unchanged. Otherwise torch: `rows` (of out's dtype)
// is weighted in place and the gathered rows take at most about 2 * chunk_bytes at once.
void CombinePerToken(at::Tensor& rows, const at::Tensor& weights, const at::Tensor& column_tokens,
                     const at::Tensor& entries, at::Tensor& out, int64_t chunk_bytes);

}  // namespace mq::pipeline
