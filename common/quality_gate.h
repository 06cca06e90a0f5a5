// The quality gate of a job (--max-kl, --max-ppl-ratio): whether measured quality passes it,
// decided the same way by the coordinator (the job's verdict) and the worker (quality.json).
// No protobuf or torch here. Pure functions; thread-safe.
#pragma once

#include <optional>
#include <string>

namespace mq {

struct QualityGate {
  std::optional<double> max_kl;         // mean per-token KL(reference ‖ candidate), nats
  std::optional<double> max_ppl_ratio;  // perplexity(candidate) / perplexity(reference)
  bool active() const { return max_kl.has_value() || max_ppl_ratio.has_value(); }
};

// Empty when every limit of `gate` holds; otherwise each limit exceeded, with the measured value
// and the limit, e.g. "mean KL 0.4123 > max_kl 0.05; perplexity ratio 1.218 (12.31 / 10.11) >
// max_ppl_ratio 1.1". A measure that is not finite exceeds every limit on it.
std::string QualityGateFailure(const QualityGate& gate, double kl_mean,
                               double perplexity_reference, double perplexity_candidate);

// perplexity_candidate / perplexity_reference (infinite when the reference's is 0).
double PerplexityRatio(double perplexity_reference, double perplexity_candidate);

}  // namespace mq
