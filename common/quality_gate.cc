#include "common/quality_gate.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mq {

double PerplexityRatio(double perplexity_reference, double perplexity_candidate) {
  if (perplexity_reference == 0) return std::numeric_limits<double>::infinity();
  return perplexity_candidate / perplexity_reference;
}

std::string QualityGateFailure(const QualityGate& gate, double kl_mean,
                               double perplexity_reference, double perplexity_candidate) {
  std::vector<std::string> over;
  if (gate.max_kl && !(std::isfinite(kl_mean) && kl_mean <= *gate.max_kl)) {
    over.push_back(absl::StrCat("mean KL ", absl::SixDigits(kl_mean), " > max_kl ",
                                absl::SixDigits(*gate.max_kl)));
  }
  const double ratio = PerplexityRatio(perplexity_reference, perplexity_candidate);
  if (gate.max_ppl_ratio && !(std::isfinite(ratio) && ratio <= *gate.max_ppl_ratio)) {
    over.push_back(absl::StrCat("perplexity ratio ", absl::SixDigits(ratio), " (",
                                absl::SixDigits(perplexity_candidate), " / ",
                                absl::SixDigits(perplexity_reference), ") > max_ppl_ratio ",
                                absl::SixDigits(*gate.max_ppl_ratio)));
  }
  return absl::StrJoin(over, "; ");
}

}  // namespace mq
