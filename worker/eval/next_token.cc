#include "worker/eval/next_token.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mq::eval {
namespace {

constexpr int64_t kMaxChunkValues = int64_t{1} << 25;  // float64 values per temporary

std::string Describe(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  return absl::StrCat(c10::toString(t.scalar_type()), " [", absl::StrJoin(t.sizes(), ", "), "] on ",
                      t.device().str());
}

template <typename T>
void AppendTensor(const at::Tensor& t, std::vector<T>* out) {
  const at::Tensor c = t.to(at::kCPU).contiguous();
  const T* p = c.data_ptr<T>();
  out->insert(out->end(), p, p + c.numel());
}

// KL_t of float64 log-probs [N, V] -> [N]; terms with p_ref = 0 count 0.
at::Tensor KlOfLogProbs(const at::Tensor& lp_ref, const at::Tensor& lp_cand) {
  const at::Tensor p_ref = lp_ref.exp();
  return at::where(p_ref > 0, p_ref * (lp_ref - lp_cand), at::zeros_like(p_ref)).sum(-1);
}

}  // namespace

at::Tensor PerTokenKl(const at::Tensor& reference_logits, const at::Tensor& candidate_logits) {
  return KlOfLogProbs(at::log_softmax(reference_logits.to(at::kDouble), -1),
                      at::log_softmax(candidate_logits.to(at::kDouble), -1));
}

double NearestRankQuantile(std::vector<double> values, double q) {
  if (values.empty()) return std::numeric_limits<double>::quiet_NaN();
  const int64_t n = static_cast<int64_t>(values.size());
  int64_t rank = static_cast<int64_t>(std::ceil(q * static_cast<double>(n)));
  rank = std::clamp<int64_t>(rank, 1, n);
  std::nth_element(values.begin(), values.begin() + (rank - 1), values.end());
  return values[rank - 1];
}

absl::Status NextTokenAccumulator::Add(const at::Tensor& reference_logits,
                                       const at::Tensor& candidate_logits,
                                       const at::Tensor& input_ids) {
  if (!reference_logits.defined() || reference_logits.dim() != 3 ||
      !at::isFloatingType(reference_logits.scalar_type()) || reference_logits.size(1) < 2) {
    return absl::InvalidArgumentError(absl::StrCat("reference_logits ", Describe(reference_logits),
                                                   ": must be float [batch, seq >= 2, vocab]"));
  }
  if (!candidate_logits.defined() || candidate_logits.sizes() != reference_logits.sizes() ||
      !at::isFloatingType(candidate_logits.scalar_type()) ||
      candidate_logits.device() != reference_logits.device()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "candidate_logits ", Describe(candidate_logits),
        ": must be float, shaped and placed like reference_logits ", Describe(reference_logits)));
  }
  if (!input_ids.defined() || input_ids.dim() != 2 ||
      !at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false) ||
      input_ids.size(0) != reference_logits.size(0) ||
      input_ids.size(1) != reference_logits.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat("input_ids ", Describe(input_ids),
                                                   ": must be integer [", reference_logits.size(0),
                                                   ", ", reference_logits.size(1), "]"));
  }
  const int64_t vocab = reference_logits.size(2);
  const int64_t scored = reference_logits.size(1) - 1;
  // Row-major over (sequence, position): the order of the definitions.
  const at::Tensor ref = reference_logits.narrow(1, 0, scored).reshape({-1, vocab});
  const at::Tensor cand = candidate_logits.narrow(1, 0, scored).reshape({-1, vocab});
  const at::Tensor next =
      input_ids.narrow(1, 1, scored).reshape({-1}).to(ref.device(), at::kLong).unsqueeze(1);
  if (next.numel() > 0 && (next.min().item<int64_t>() < 0 || next.max().item<int64_t>() >= vocab)) {
    return absl::InvalidArgumentError(
        absl::StrCat("input_ids: token ids must be in [0, ", vocab, ") (the vocabulary)"));
  }
  const int64_t rows = ref.size(0);
  const int64_t chunk = std::max<int64_t>(1, kMaxChunkValues / std::max<int64_t>(vocab, 1));
  for (int64_t begin = 0; begin < rows; begin += chunk) {
    const int64_t len = std::min(chunk, rows - begin);
    const at::Tensor lp_ref = at::log_softmax(ref.narrow(0, begin, len).to(at::kDouble), -1);
    const at::Tensor lp_cand = at::log_softmax(cand.narrow(0, begin, len).to(at::kDouble), -1);
    const at::Tensor kl = KlOfLogProbs(lp_ref, lp_cand);
    const at::Tensor target = next.narrow(0, begin, len);
    AppendTensor<double>(kl, &kl_);
    AppendTensor<double>(lp_ref.gather(1, target).squeeze(1), &logp_reference_);
    AppendTensor<double>(lp_cand.gather(1, target).squeeze(1), &logp_candidate_);
    AppendTensor<uint8_t>(lp_ref.argmax(-1).eq(lp_cand.argmax(-1)).to(at::kByte), &agree_);
  }
  return absl::OkStatus();
}

void NextTokenAccumulator::Merge(const NextTokenAccumulator& other) {
  kl_.insert(kl_.end(), other.kl_.begin(), other.kl_.end());
  logp_reference_.insert(logp_reference_.end(), other.logp_reference_.begin(),
                         other.logp_reference_.end());
  logp_candidate_.insert(logp_candidate_.end(), other.logp_candidate_.begin(),
                         other.logp_candidate_.end());
  agree_.insert(agree_.end(), other.agree_.begin(), other.agree_.end());
}

absl::StatusOr<NextTokenQuality> NextTokenAccumulator::Finish() const {
  if (kl_.empty()) {
    return absl::FailedPreconditionError("no scored positions: add logits of sequences first");
  }
  const double n = static_cast<double>(kl_.size());
  NextTokenQuality q;
  q.positions = static_cast<int64_t>(kl_.size());
  double kl_sum = 0, ref_sum = 0, cand_sum = 0;
  int64_t agree = 0;
  q.kl_max = -std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < kl_.size(); ++i) {  // in position order: deterministic
    kl_sum += kl_[i];
    q.kl_max = std::max(q.kl_max, kl_[i]);
    ref_sum += logp_reference_[i];
    cand_sum += logp_candidate_[i];
    agree += agree_[i];
  }
  q.kl_mean = kl_sum / n;
  q.kl_p99 = NearestRankQuantile(kl_, 0.99);
  q.top1_agreement = static_cast<double>(agree) / n;
  q.nll_reference = -ref_sum / n;
  q.nll_candidate = -cand_sum / n;
  q.perplexity_reference = std::exp(q.nll_reference);
  q.perplexity_candidate = std::exp(q.nll_candidate);
  return q;
}

}  // namespace mq::eval
