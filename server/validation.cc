#include "server/validation.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <regex>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/names.h"
#include "common/path_policy.h"
#include "common/path_policy_proto.h"
#include "common/s3/s3_config.h"

namespace mq::server {
namespace {

using mq::v1::JobSpec;

absl::Status Invalid(const std::string& field, const std::string& value,
                     const std::string& allowed) {
  return absl::InvalidArgumentError(absl::StrCat(field, " = ", value, ": ", allowed));
}

std::string Quote(std::string_view s) {
  constexpr size_t kMax = 80;
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F) {
      out += absl::StrCat("\\x", absl::Hex(c, absl::kZeroPad2));
    } else if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMax) out += "...";
  return out + "\"";
}

absl::Status CheckInt(const std::string& field, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    return Invalid(field, absl::StrCat(value), absl::StrCat("must be between ", lo, " and ", hi));
  }
  return absl::OkStatus();
}

absl::Status CheckGroupSize(const std::string& field, int64_t value) {
  if (value == 32 || value == 64 || value == 128 || value == -1) return absl::OkStatus();
  return Invalid(field, absl::StrCat(value), "must be 32, 64, 128 or -1 (per channel)");
}

bool IsSha256(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

// Each (field suffix, count) must be >= 0; the field is named `prefix` + suffix.
absl::Status CheckCounts(const std::string& prefix,
                         std::initializer_list<std::pair<const char*, int64_t>> counts) {
  for (const auto& [name, value] : counts) {
    if (value < 0) return Invalid(prefix + name, absl::StrCat(value), "must be >= 0");
  }
  return absl::OkStatus();
}

absl::Status CheckFiniteNonNegative(const std::string& field, double value) {
  if (!std::isfinite(value) || value < 0) {
    return Invalid(field, absl::StrCat(value), "must be a finite number >= 0");
  }
  return absl::OkStatus();
}

bool IsAwq(mq::v1::Method method) {
  return method == mq::v1::METHOD_AWQ || method == mq::v1::METHOD_AWQ_GPTQ;
}

// spec.awq of a spec whose method is set: defaults for awq and awq-gptq, refused when set for
// the other methods (and cleared when not).
absl::Status NormalizeAwqSpec(JobSpec& spec) {
  mq::v1::AwqSpec* awq = spec.mutable_awq();
  if (!IsAwq(spec.method())) {
    if (awq->has_grid() || awq->max_tokens() != 0) {
      std::vector<std::string> set;
      if (awq->has_grid()) set.push_back(absl::StrCat("grid: ", awq->grid()));
      if (awq->max_tokens() != 0) set.push_back(absl::StrCat("max_tokens: ", awq->max_tokens()));
      return Invalid("spec.awq", absl::StrCat("{", absl::StrJoin(set, ", "), "}"),
                     absl::StrCat("applies to methods awq and awq-gptq only (spec.method is ",
                                  MethodName(spec.method()), ")"));
    }
    spec.clear_awq();
    return absl::OkStatus();
  }
  if (!awq->has_grid()) awq->set_grid(20);
  if (awq->grid() < 0 || awq->grid() > 100) {
    return Invalid("spec.awq.grid", absl::StrCat(awq->grid()),
                   "must be in [0, 100] (0 keeps only s = 1)");
  }
  if (awq->max_tokens() == 0) awq->set_max_tokens(32768);
  if (awq->max_tokens() < 1 || awq->max_tokens() > 16777216) {
    return Invalid("spec.awq.max_tokens", absl::StrCat(awq->max_tokens()),
                   "must be in [1, 16777216] (0 means 32768)");
  }
  return absl::OkStatus();
}

// One AWQ mapping of a layer report, fields named under `field` ("stats.awq[2]").
absl::Status ValidateAwqMapping(const std::string& field, const mq::v1::AwqMapping& m) {
  if (m.smooth().size() > 512) {
    return Invalid(field + ".smooth", Quote(m.smooth()), "at most 512 characters");
  }
  if (absl::Status s = CheckCounts(field, {{".balance_layers", m.balance_layers()},
                                           {".mappings", m.mappings()},
                                           {".identity_chosen", m.identity_chosen()},
                                           {".rows", m.rows()},
                                           {".routing_changed_tokens", m.routing_changed_tokens()},
                                           {".routing_tokens", m.routing_tokens()}});
      !s.ok()) {
    return s;
  }
  if (m.identity_chosen() > m.mappings()) {
    return Invalid(field + ".identity_chosen", absl::StrCat(m.identity_chosen()),
                   absl::StrCat("must be <= mappings (", m.mappings(), ")"));
  }
  if (m.routing_changed_tokens() > m.routing_tokens()) {
    return Invalid(field + ".routing_changed_tokens", absl::StrCat(m.routing_changed_tokens()),
                   absl::StrCat("must be <= routing_tokens (", m.routing_tokens(), ")"));
  }
  if (!std::isfinite(m.alpha()) || m.alpha() < 0 || m.alpha() > 1) {
    return Invalid(field + ".alpha", absl::StrCat(m.alpha()), "must be in [0, 1]");
  }
  if (absl::Status s = CheckFiniteNonNegative(field + ".loss_identity", m.loss_identity());
      !s.ok()) {
    return s;
  }
  return CheckFiniteNonNegative(field + ".loss_chosen", m.loss_chosen());
}

}  // namespace

std::string LocationPath(const std::string& value) {
  std::string path = absl::StartsWith(value, "file://") ? value.substr(7) : value;
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

std::string NormalLocationPath(const std::string& value) {
  const std::string path = absl::StartsWith(value, "file://") ? value.substr(7) : value;
  std::vector<std::string> parts;
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      if (!parts.empty()) parts.pop_back();  // "/.." is "/"
      continue;
    }
    parts.emplace_back(part);
  }
  return "/" + absl::StrJoin(parts, "/");
}

PathOverlap ComparePaths(const std::string& path, const std::string& other) {
  if (path == other) return PathOverlap::kSame;
  auto within = [](const std::string& inner, const std::string& outer) {
    if (outer == "/") return true;
    return absl::StartsWith(inner, outer) && inner.size() > outer.size() &&
           inner[outer.size()] == '/';
  };
  if (within(path, other)) return PathOverlap::kInside;
  if (within(other, path)) return PathOverlap::kContains;
  return PathOverlap::kNone;
}

absl::StatusOr<mq::v1::PathPolicy> MakePathPolicy(const std::vector<std::string>& read_roots,
                                                  const std::vector<std::string>& write_roots) {
  PathPolicy policy;
  policy.enforced = !read_roots.empty() || !write_roots.empty();
  for (const std::string& root : read_roots) {
    absl::StatusOr<std::string> r = NormalizeRoot("--allow-read", root);
    if (!r.ok()) return r.status();
    policy.read_roots.push_back(*std::move(r));
  }
  for (const std::string& root : write_roots) {
    absl::StatusOr<std::string> r = NormalizeRoot("--allow-write", root);
    if (!r.ok()) return r.status();
    policy.write_roots.push_back(*std::move(r));
  }
  return ToProto(policy);
}

absl::Status CheckJobPaths(const JobSpec& spec, const mq::v1::PathPolicy& proto) {
  const PathPolicy policy = FromProto(proto);
  const std::pair<const char*, const std::string*> reads[] = {
      {"spec.model_uri", &spec.model_uri()},
      {"spec.calibration.dataset_uri", &spec.calibration().dataset_uri()},
      {"spec.calibration.tokenizer_uri", &spec.calibration().tokenizer_uri()}};
  for (const auto& [field, value] : reads) {
    if (absl::Status s = CheckPathLexical(policy, PathAccess::kRead, field, *value); !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = CheckPathLexical(policy, PathAccess::kRead, "spec.eval.dataset_uri",
                                        spec.eval().dataset_uri());
      !s.ok()) {
    return s;
  }
  if (!spec.eval().candidate_uri().empty()) {  // an evaluation job writes nothing
    return CheckPathLexical(policy, PathAccess::kRead, "spec.eval.candidate_uri",
                            spec.eval().candidate_uri());
  }
  return CheckPathLexical(policy, PathAccess::kWrite, "spec.output_uri", spec.output_uri());
}

absl::Status CheckInspectPaths(const mq::v1::InspectModelRequest& request,
                               const mq::v1::PathPolicy& policy) {
  return CheckPathLexical(FromProto(policy), PathAccess::kRead, "model_uri", request.model_uri());
}

absl::StatusOr<EndedJobRetention> ParseEndedJobRetention(const std::string& value) {
  const std::string allowed =
      "must be a number of ended jobs (e.g. 1000) or a duration such as 3600s, 30m, 24h or 7d";
  std::string digits = value;
  int64_t unit_ms = 0;
  if (!value.empty()) {
    switch (value.back()) {
      case 's':
        unit_ms = 1000;
        break;
      case 'm':
        unit_ms = 60 * 1000;
        break;
      case 'h':
        unit_ms = 3600 * 1000;
        break;
      case 'd':
        unit_ms = 86400 * 1000;
        break;
      default:
        break;
    }
  }
  if (unit_ms > 0) digits.pop_back();
  int64_t n = 0;
  if (digits.empty() || digits.size() > 9 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      !absl::SimpleAtoi(digits, &n)) {
    return Invalid("--retain-ended-jobs", Quote(value), allowed);
  }
  EndedJobRetention r;
  if (unit_ms > 0) {
    if (n == 0) return Invalid("--retain-ended-jobs", Quote(value), "a duration must be > 0");
    r.ms = n * unit_ms;
  } else {
    r.jobs = n;
  }
  return r;
}

absl::Status ValidateLocation(const std::string& field, const std::string& value, bool required) {
  if (value.empty()) {
    if (!required) return absl::OkStatus();
    return Invalid(field, "\"\"", "is required: an absolute path or file:// URI");
  }
  if (value.size() > 4096) {
    return Invalid(field, Quote(value), "is longer than 4096 characters");
  }
  for (char c : value) {
    if (c == '\0' || c == '\n' || c == '\r') {
      return Invalid(field, Quote(value), "must not contain NUL or line breaks");
    }
  }
  if (absl::StartsWith(value, "s3://")) {
    // An S3 store (path-style s3://bucket/prefix): the worker stages inputs and mirrors outputs.
    absl::StatusOr<s3::S3Uri> uri = s3::ParseS3Uri(field, value);
    if (!uri.ok()) return uri.status();
    return absl::OkStatus();
  }
  const std::string path = absl::StartsWith(value, "file://") ? value.substr(7) : value;
  if (path.empty() || path.front() != '/') {
    return Invalid(field, Quote(value), "must be an absolute path or a file:// URI");
  }
  if (absl::StrContains(value, "://") && !absl::StartsWith(value, "file://")) {
    return Invalid(field, Quote(value), "unknown scheme; allowed: an absolute path or file://");
  }
  return absl::OkStatus();
}

namespace {

// spec.eval of a spec whose calibration is normalized: defaults, ranges, the gate.
absl::Status NormalizeEvalSpec(JobSpec& spec) {
  mq::v1::EvalSpec* e = spec.mutable_eval();
  const bool eval_job = !e->candidate_uri().empty();
  if (!e->has_num_samples()) e->set_num_samples(16);
  if (absl::Status s = CheckInt("spec.eval.num_samples", e->num_samples(), eval_job ? 1 : 0,
                                100000);
      !s.ok()) {
    return eval_job ? Invalid("spec.eval.num_samples", absl::StrCat(e->num_samples()),
                              "an evaluation job needs between 1 and 100000 sequences")
                    : s;
  }
  if (absl::Status s = ValidateLocation("spec.eval.dataset_uri", e->dataset_uri(), eval_job);
      !s.ok()) {
    return eval_job && e->dataset_uri().empty()
               ? Invalid("spec.eval.dataset_uri", "\"\"",
                         "an evaluation job needs a dataset (it has no calibration to hold out "
                         "from)")
               : s;
  }
  if (e->max_sequence_length() == 0) {
    e->set_max_sequence_length(spec.calibration().max_sequence_length());
  }
  if (absl::Status s =
          CheckInt("spec.eval.max_sequence_length", e->max_sequence_length(), 2, 1 << 20);
      !s.ok()) {
    return s;
  }
  if (e->has_max_kl() && !(std::isfinite(e->max_kl()) && e->max_kl() >= 0)) {
    return Invalid("spec.eval.max_kl", absl::StrCat(e->max_kl()),
                   "must be a finite number >= 0 (nats of mean per-token KL)");
  }
  if (e->has_max_ppl_ratio() && !(std::isfinite(e->max_ppl_ratio()) && e->max_ppl_ratio() > 0)) {
    return Invalid("spec.eval.max_ppl_ratio", absl::StrCat(e->max_ppl_ratio()),
                   "must be a finite number > 0 (perplexity of the output over the original's)");
  }
  if (e->num_samples() == 0 && (e->has_max_kl() || e->has_max_ppl_ratio())) {
    return Invalid("spec.eval.num_samples", "0",
                   "a quality gate (max_kl, max_ppl_ratio) needs the evaluation: give it "
                   "sequences or drop the gate");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<JobSpec> NormalizeJobSpec(const JobSpec& in) {
  JobSpec spec = in;
  if (absl::Status s = ValidateLocation("spec.model_uri", spec.model_uri(), true); !s.ok())
    return s;
  const std::string model = LocationPath(spec.model_uri());
  if (!spec.eval().candidate_uri().empty()) {
    // An evaluation job: a candidate against spec.model_uri; nothing is written.
    if (absl::Status s = ValidateLocation("spec.eval.candidate_uri", spec.eval().candidate_uri(),
                                          true);
        !s.ok()) {
      return s;
    }
    if (!spec.output_uri().empty()) {
      return Invalid("spec.output_uri", Quote(spec.output_uri()),
                     "must be empty for an evaluation job (it writes no files; its results are "
                     "in the job's status)");
    }
  } else {
    if (absl::Status s = ValidateLocation("spec.output_uri", spec.output_uri(), true); !s.ok()) {
      return s;
    }
    const std::string output = LocationPath(spec.output_uri());
    if (output == model || absl::StartsWith(output, model + "/")) {
      return Invalid("spec.output_uri", Quote(spec.output_uri()),
                     "must not be the model directory or inside it");
    }
  }

  if (!mq::v1::Method_IsValid(spec.method())) {
    return Invalid("spec.method", absl::StrCat(spec.method()),
                   "must be gptq, awq, awq-gptq or rtn");
  }
  if (spec.method() == mq::v1::METHOD_UNSPECIFIED) spec.set_method(mq::v1::METHOD_GPTQ);

  if (spec.bits() == 0) spec.set_bits(4);
  if (spec.bits() != 4) return Invalid("spec.bits", absl::StrCat(spec.bits()), "must be 4");

  if (spec.group_size() == 0) spec.set_group_size(128);
  if (absl::Status s = CheckGroupSize("spec.group_size", spec.group_size()); !s.ok()) return s;

  if (!spec.has_symmetric()) spec.set_symmetric(true);
  if (!spec.symmetric()) {
    return Invalid("spec.symmetric", "false",
                   "must be true (asymmetric quantization is not implemented yet)");
  }
  // Act-order is a GPTQ column order; RTN and AWQ (RTN of the scaled weights) have none.
  const bool gptq_solve =
      spec.method() == mq::v1::METHOD_GPTQ || spec.method() == mq::v1::METHOD_AWQ_GPTQ;
  if (!spec.has_act_order()) spec.set_act_order(gptq_solve);
  if (!gptq_solve) spec.set_act_order(false);
  // TF32 lazy update: on by default for GPTQ solves (on the trained test model its KL, top-1
  // agreement and perplexity stay within the evaluation's noise of the fp32 update's, at ~0.6×
  // the update's time: bench/RESULTS.md); RTN and AWQ have no GPTQ solve.
  if (!spec.has_tf32_update()) spec.set_tf32_update(gptq_solve);
  if (!gptq_solve) spec.set_tf32_update(false);

  if (absl::Status s = NormalizeAwqSpec(spec); !s.ok()) return s;

  if (!mq::v1::ScaleSearch_IsValid(spec.scale_search())) {
    return Invalid("spec.scale_search", absl::StrCat(spec.scale_search()), "must be minmax or mse");
  }
  if (spec.scale_search() == mq::v1::SCALE_SEARCH_UNSPECIFIED) {
    // MSE: on the trained test model it more than halves the held-out perplexity cost of
    // both GPTQ and RTN against min-max scales (bench/RESULTS.md).
    spec.set_scale_search(mq::v1::SCALE_SEARCH_MSE);
  }

  if (spec.damping() == 0) spec.set_damping(0.01);
  if (!std::isfinite(spec.damping()) || spec.damping() <= 0 || spec.damping() > 1) {
    return Invalid("spec.damping", absl::StrCat(spec.damping()), "must be in (0, 1]");
  }

  if (!mq::v1::TargetSet_IsValid(spec.targets())) {
    return Invalid("spec.targets", absl::StrCat(spec.targets()),
                   "must be routed_experts or all_linear");
  }
  if (spec.targets() == mq::v1::TARGET_SET_UNSPECIFIED) {
    spec.set_targets(mq::v1::TARGET_SET_ROUTED_EXPERTS);
  }

  if (spec.ignore_size() > 256) {
    return Invalid("spec.ignore", absl::StrCat(spec.ignore_size(), " patterns"),
                   "at most 256 patterns are allowed");
  }
  for (int i = 0; i < spec.ignore_size(); ++i) {
    const std::string field = absl::StrCat("spec.ignore[", i, "]");
    const std::string& pattern = spec.ignore(i);
    if (pattern.empty() || pattern.size() > 1024) {
      return Invalid(field, Quote(pattern), "must be a regular expression of 1..1024 characters");
    }
    try {
      std::regex re(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      return Invalid(field, Quote(pattern),
                     absl::StrCat("is not a valid regular expression (", e.what(), ")"));
    }
  }

  mq::v1::CalibrationSpec* cal = spec.mutable_calibration();
  if (absl::Status s = ValidateLocation("spec.calibration.dataset_uri", cal->dataset_uri(), false);
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          ValidateLocation("spec.calibration.tokenizer_uri", cal->tokenizer_uri(), false);
      !s.ok()) {
    return s;
  }
  if (cal->num_samples() == 0) cal->set_num_samples(512);
  if (absl::Status s = CheckInt("spec.calibration.num_samples", cal->num_samples(), 1, 1000000);
      !s.ok()) {
    return s;
  }
  if (cal->min_expert_tokens() == 0) cal->set_min_expert_tokens(16);
  if (cal->min_expert_tokens() < -1 || cal->min_expert_tokens() > 1000000000) {
    return Invalid("spec.calibration.min_expert_tokens", absl::StrCat(cal->min_expert_tokens()),
                   "must be -1 (no rare-expert treatment), 0 (the default, 16) or between 1 and "
                   "1000000000");
  }
  if (cal->rare_expert_rtn() && cal->min_expert_tokens() == -1) {
    return Invalid("spec.calibration.rare_expert_rtn", "true",
                   "needs rare experts: spec.calibration.min_expert_tokens is -1 (none are rare)");
  }
  if (cal->max_sequence_length() == 0) cal->set_max_sequence_length(4096);
  if (absl::Status s =
          CheckInt("spec.calibration.max_sequence_length", cal->max_sequence_length(), 1, 1 << 20);
      !s.ok()) {
    return s;
  }

  if (absl::Status s = NormalizeEvalSpec(spec); !s.ok()) return s;

  if (spec.gang_size() == 0) spec.set_gang_size(1);
  if (absl::Status s = CheckInt("spec.gang_size", spec.gang_size(), 1, 1024); !s.ok()) return s;
  if (absl::Status s = CheckInt("spec.priority", spec.priority(), -1000, 1000); !s.ok()) return s;
  if (spec.max_attempts() == 0) spec.set_max_attempts(3);
  if (absl::Status s = CheckInt("spec.max_attempts", spec.max_attempts(), 1, 100); !s.ok()) {
    return s;
  }
  return spec;
}

absl::Status ValidateJobId(const std::string& field, const std::string& value) {
  static const std::regex kJobId("j-[0-9A-HJKMNP-TV-Z]{26}");
  if (value.empty()) return Invalid(field, "\"\"", "is required (a job id like j-01J...)");
  if (value.size() != 28 || !std::regex_match(value.begin(), value.end(), kJobId)) {
    return Invalid(field, Quote(value), "is not a job id: \"j-\" followed by 26 base32 characters");
  }
  return absl::OkStatus();
}

absl::Status ValidateIdempotencyKey(const std::string& value) {
  static const std::regex kKey("[A-Za-z0-9._:-]{1,128}");
  if (value.empty()) return absl::OkStatus();
  if (!std::regex_match(value.begin(), value.end(), kKey)) {
    return Invalid("idempotency_key", Quote(value), "must be 1..128 characters of [A-Za-z0-9._:-]");
  }
  return absl::OkStatus();
}

absl::Status ValidateWorkerName(const std::string& value) {
  static const std::regex kName("[A-Za-z0-9._-]{1,64}");
  if (!std::regex_match(value.begin(), value.end(), kName)) {
    return Invalid("name", Quote(value), "must be 1..64 characters of [A-Za-z0-9._-]");
  }
  return absl::OkStatus();
}

absl::Status ValidateInspectRequest(const mq::v1::InspectModelRequest& r) {
  if (absl::Status s = ValidateLocation("model_uri", r.model_uri(), true); !s.ok()) return s;
  if (r.gang_size() != 0) {
    if (absl::Status s = CheckInt("gang_size", r.gang_size(), 1, 1024); !s.ok()) return s;
  }
  if (r.bits() != 0 && r.bits() != 4) return Invalid("bits", absl::StrCat(r.bits()), "must be 4");
  if (r.group_size() != 0) {
    if (absl::Status s = CheckGroupSize("group_size", r.group_size()); !s.ok()) return s;
  }
  if (!mq::v1::TargetSet_IsValid(r.targets())) {
    return Invalid("targets", absl::StrCat(r.targets()), "must be routed_experts or all_linear");
  }
  if (r.num_samples() != 0) {
    if (absl::Status s = CheckInt("num_samples", r.num_samples(), 1, 1000000); !s.ok()) return s;
  }
  if (r.max_sequence_length() != 0) {
    if (absl::Status s = CheckInt("max_sequence_length", r.max_sequence_length(), 1, 1 << 20);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateOutputFile(const std::string& field, const mq::v1::OutputFile& f) {
  const std::string& name = f.name();
  if (name.empty() || name.size() > 255) {
    return Invalid(field + ".name", Quote(name), "must be 1..255 characters");
  }
  if (name == "." || name == "..") {
    return Invalid(field + ".name", Quote(name), "must be a file name, not \".\" or \"..\"");
  }
  for (char c : name) {
    if (c == '/' || c == '\0' || c == '\n' || c == '\r') {
      return Invalid(field + ".name", Quote(name),
                     "must be a plain file name (no '/', NUL or line breaks)");
    }
  }
  if (!IsSha256(f.sha256())) {
    return Invalid(field + ".sha256", Quote(f.sha256()), "must be 64 lowercase hex characters");
  }
  if (f.size_bytes() < 0) {
    return Invalid(field + ".size_bytes", absl::StrCat(f.size_bytes()), "must be >= 0");
  }
  if (f.verified().mtime_ns() < 0 || f.verified().ctime_ns() < 0) {
    return Invalid(
        field + ".verified",
        absl::StrCat("mtime_ns ", f.verified().mtime_ns(), ", ctime_ns ", f.verified().ctime_ns()),
        "times must be >= 0 (nanoseconds since the epoch)");
  }
  return absl::OkStatus();
}

absl::Status ValidateReportLayer(const mq::v1::ReportLayerRequest& r) {
  if (r.step() < 0) return Invalid("step", absl::StrCat(r.step()), "must be >= 0");
  if (r.layer() < 0) return Invalid("layer", absl::StrCat(r.layer()), "must be >= 0");
  if (r.rank() < 0) return Invalid("rank", absl::StrCat(r.rank()), "must be >= 0");
  if (r.files_size() > 4096) {
    return Invalid("files", absl::StrCat(r.files_size(), " files"), "at most 4096 are allowed");
  }
  for (int i = 0; i < r.files_size(); ++i) {
    if (absl::Status s = ValidateOutputFile(absl::StrCat("files[", i, "]"), r.files(i)); !s.ok()) {
      return s;
    }
    for (int j = 0; j < i; ++j) {
      if (r.files(j).name() == r.files(i).name()) {
        return Invalid(absl::StrCat("files[", i, "].name"), Quote(r.files(i).name()),
                       absl::StrCat("is listed twice (also files[", j, "])"));
      }
    }
  }
  const mq::v1::LayerStats& st = r.stats();
  const std::pair<const char*, double> seconds[] = {
      {"stats.load_seconds", st.load_seconds()},
      {"stats.forward_seconds", st.forward_seconds()},
      {"stats.hessian_seconds", st.hessian_seconds()},
      {"stats.solve_seconds", st.solve_seconds()},
      {"stats.propagate_seconds", st.propagate_seconds()},
      {"stats.write_seconds", st.write_seconds()},
      {"stats.exchange_seconds", st.exchange_seconds()},
      {"stats.mean_relative_error", st.mean_relative_error()}};
  for (const auto& [field, value] : seconds) {
    if (absl::Status s = CheckFiniteNonNegative(field, value); !s.ok()) return s;
  }
  if (absl::Status s =
          CheckCounts("stats.", {{"expert_tokens_min", st.expert_tokens_min()},
                                 {"expert_tokens_median", st.expert_tokens_median()},
                                 {"expert_tokens_max", st.expert_tokens_max()},
                                 {"quantized_linears", st.quantized_linears()},
                                 {"fallbacks", st.fallbacks()},
                                 {"rare_experts", st.rare_experts()},
                                 {"dispatch_rounds", st.dispatch_rounds()},
                                 {"expert_passes", st.expert_passes()},
                                 {"device_peak_allocated_bytes", st.device_peak_allocated_bytes()},
                                 {"device_peak_reserved_bytes", st.device_peak_reserved_bytes()},
                                 {"device_alloc_retries", st.device_alloc_retries()}});
      !s.ok()) {
    return s;
  }
  if (st.rare_size() > 65536) {
    return Invalid("stats.rare", absl::StrCat(st.rare_size(), " entries"),
                   "at most 65536 are allowed");
  }
  for (int i = 0; i < st.rare_size(); ++i) {
    const mq::v1::RareExpert& e = st.rare(i);
    if (e.expert() < 0 || e.routed_tokens() < 0) {
      return Invalid(absl::StrCat("stats.rare[", i, "]"),
                     absl::StrCat("expert ", e.expert(), ", ", e.routed_tokens(), " tokens"),
                     "expert and routed_tokens must be >= 0");
    }
    if (e.treatment().size() > 64) {
      return Invalid(absl::StrCat("stats.rare[", i, "].treatment"), Quote(e.treatment()),
                     "at most 64 characters");
    }
  }
  if (st.awq_size() > 64) {
    return Invalid("stats.awq", absl::StrCat(st.awq_size(), " entries"), "at most 64 are allowed");
  }
  for (int i = 0; i < st.awq_size(); ++i) {
    if (absl::Status s = ValidateAwqMapping(absl::StrCat("stats.awq[", i, "]"), st.awq(i));
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateEvaluateResult(const mq::v1::EvaluateResult& r, bool writes_output) {
  if (writes_output != !r.manifest_sha256().empty() ||
      (writes_output && !IsSha256(r.manifest_sha256()))) {
    return Invalid("evaluated.manifest_sha256", Quote(r.manifest_sha256()),
                   writes_output ? "must be 64 lowercase hex characters (the output's manifest)"
                                 : "must be empty for an evaluation job (it writes no files)");
  }
  if (r.files() < 0 || r.total_bytes() < 0) {
    return Invalid("evaluated.files", absl::StrCat(r.files(), " files, ", r.total_bytes(), " bytes"),
                   "must be >= 0");
  }
  const mq::v1::QualityReport& q = r.quality();
  if (absl::Status s = CheckCounts("evaluated.quality.", {{"sequences", q.sequences()},
                                                          {"sequence_length", q.sequence_length()},
                                                          {"positions", q.positions()}});
      !s.ok()) {
    return s;
  }
  for (const auto& [name, value] :
       {std::pair<const char*, double>{"kl_mean", q.kl_mean()}, {"kl_p99", q.kl_p99()},
        {"kl_max", q.kl_max()}, {"top1_agreement", q.top1_agreement()},
        {"perplexity_reference", q.perplexity_reference()},
        {"perplexity_candidate", q.perplexity_candidate()}, {"seconds", q.seconds()}}) {
    // A broken model may have an infinite perplexity; NaN or a negative value is a bad report.
    if (std::isnan(value) || value < 0) {
      return Invalid(absl::StrCat("evaluated.quality.", name), absl::StrCat(value),
                     "must be a number >= 0");
    }
  }
  if (q.layers_size() > 100000) {
    return Invalid("evaluated.quality.layers", absl::StrCat(q.layers_size()), "at most 100000");
  }
  for (int i = 0; i < q.layers_size(); ++i) {
    if (std::isnan(q.layers(i).relative_error()) || q.layers(i).relative_error() < 0) {
      return Invalid(absl::StrCat("evaluated.quality.layers[", i, "].relative_error"),
                     absl::StrCat(q.layers(i).relative_error()), "must be a number >= 0");
    }
  }
  for (const auto& [name, value] :
       {std::pair<const char*, const std::string*>{"source", &q.source()},
        {"not_measured", &q.not_measured()}, {"gate", &q.gate()}}) {
    if (value->size() > 4096) {
      return Invalid(absl::StrCat("evaluated.quality.", name), Quote(*value),
                     "at most 4096 characters");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateFinalizeResult(const mq::v1::FinalizeResult& r) {
  if (!IsSha256(r.manifest_sha256())) {
    return Invalid("finalized.manifest_sha256", Quote(r.manifest_sha256()),
                   "must be 64 lowercase hex characters");
  }
  if (r.files() < 0) return Invalid("finalized.files", absl::StrCat(r.files()), "must be >= 0");
  if (r.total_bytes() < 0) {
    return Invalid("finalized.total_bytes", absl::StrCat(r.total_bytes()), "must be >= 0");
  }
  if (r.removed_files() < 0) {
    return Invalid("finalized.removed_files", absl::StrCat(r.removed_files()), "must be >= 0");
  }
  return absl::OkStatus();
}

}  // namespace mq::server
