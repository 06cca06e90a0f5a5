// Next-token quality of a candidate model against a reference model on the same token
// sequences: the metric definitions of a job's evaluation (DESIGN.md §9), computed from the two
// models' logits. Used by CompareModels (compare.h) and, per rank, by the pipeline's evaluation.
//
// Definitions (every quantity in float64, natural logarithms):
//  * Positions. A sequence x_0..x_{n-1} (n >= 2) is scored at positions t = 0..n-2, each
//    predicting x_{t+1}; the last position n-1 predicts nothing and is not scored. Every metric
//    below uses exactly these N = Σ (n − 1) positions, in the order sequences were added and
//    then by t.
//  * log p = log_softmax over the vocabulary of the logits widened to float64 (the logits are
//    what the model computed, in its compute dtype; the softmax itself is float64).
//  * KL_t = KL(p_ref ‖ p_cand) = Σ_v p_ref(v) · (log p_ref(v) − log p_cand(v)); a term with
//    p_ref(v) = 0 (underflow) counts 0. kl_mean = (1/N) Σ_t KL_t. kl_p99 is the nearest-rank
//    99th percentile: the ⌈0.99·N⌉-th smallest KL_t (1-based; numpy's method="inverted_cdf").
//    kl_max = max_t KL_t. Identical logits give exactly 0.
//  * top1_agreement = (1/N) · #{t : argmax_v p_ref = argmax_v p_cand}, argmax over the float64
//    log-probs with ties to the lowest token id (torch.argmax).
//  * nll = −(1/N) Σ_t log p(x_{t+1}) per model; perplexity = exp(nll), so a uniform distribution
//    over V tokens has perplexity V.
//
// For engine code only (includes ATen; never together with a .pb.h, DESIGN.md §7). Threading:
// NextTokenAccumulator has one owner (not synchronised); the free functions are pure. Nothing
// here writes files.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/eval/quality.h"

namespace mq::eval {

// KL_t of each row of two logit matrices [N, V] (same shape, any float dtype, same device):
// float64 [N] on their device, as defined above.
at::Tensor PerTokenKl(const at::Tensor& reference_logits, const at::Tensor& candidate_logits);

// The ⌈q·n⌉-th smallest of `values` (1-based, clamped to [1, n]); q in (0, 1]. NaN when empty.
double NearestRankQuantile(std::vector<double> values, double q);

// Collects the per-position quantities of batches of logits; Finish computes the metrics.
class NextTokenAccumulator {
 public:
  // `reference_logits` and `candidate_logits`: [batch, seq, V], float, same shape and device;
  // `input_ids`: integer [batch, seq] (any device) with seq >= 2. Scores positions 0..seq-2 of
  // every row. InvalidArgument naming the argument for a wrong shape, dtype or device.
  // Memory: at most about 2^25 float64 values per temporary (rows are taken in chunks).
  absl::Status Add(const at::Tensor& reference_logits, const at::Tensor& candidate_logits,
                   const at::Tensor& input_ids);
  // Appends `other`'s positions after this one's (e.g. another rank's share of the sequences).
  void Merge(const NextTokenAccumulator& other);
  // FailedPrecondition when nothing was added.
  absl::StatusOr<NextTokenQuality> Finish() const;

  int64_t positions() const { return static_cast<int64_t>(kl_.size()); }
  const std::vector<double>& kl() const { return kl_; }

 private:
  std::vector<double> kl_;
  std::vector<double> logp_reference_;  // log p_ref(x_{t+1})
  std::vector<double> logp_candidate_;  // log p_cand(x_{t+1})
  std::vector<uint8_t> agree_;          // 1 when the argmaxes agree
};

}  // namespace mq::eval
