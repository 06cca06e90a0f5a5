#include "worker/pipeline/evaluate_job.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/quality_gate.h"
#include "worker/eval/compare.h"
#include "worker/pipeline/output.h"

namespace mq::pipeline {
namespace {

// The sequences to evaluate and where they came from (EvaluateAssignmentResult::source), or
// not_measured when none is left.
struct Sequences {
  std::vector<at::Tensor> ids;
  std::string source;
  std::string not_measured;
};

absl::StatusOr<Sequences> LoadSequences(const QuantizeJobSpec& spec, int64_t vocab_size,
                                        const std::string& dataset_name) {
  QuantizeJobSpec eval = spec;
  const bool held_out = spec.eval_dataset.empty();
  if (!held_out) eval.dataset = spec.eval_dataset;
  absl::StatusOr<data::CalibrationSpec> c = JobCalibrationSpec(eval);
  if (!c.ok()) return c.status();
  c->num_samples = spec.eval_samples;
  c->max_sequence_length = spec.eval_max_sequence_length > 0 ? spec.eval_max_sequence_length
                                                             : spec.max_sequence_length;
  c->skip_samples = held_out ? spec.num_samples : 0;
  absl::StatusOr<data::CalibrationSet> set = data::LoadCalibration(*c, vocab_size);
  if (!set.ok()) return set.status();
  Sequences out;
  for (const std::vector<int32_t>& s : set->samples) {
    out.ids.push_back(at::tensor(s, at::TensorOptions(at::kInt)).to(at::kLong));
  }
  const int64_t n = static_cast<int64_t>(out.ids.size());
  const std::string& dataset = dataset_name.empty() ? c->dataset_path : dataset_name;
  const std::string fewer =
      n < spec.eval_samples ? absl::StrCat(" (", spec.eval_samples, " asked for)") : "";
  if (held_out) {
    if (n == 0) {
      out.not_measured = absl::StrCat(
          "no held-out sequence: calibration used ", std::min(spec.num_samples, set->available),
          " of the ", set->available, " usable sequences of ", dataset,
          "; give the evaluation its own dataset (--eval-dataset) or calibrate on fewer "
          "sequences than the dataset has");
      return out;
    }
    out.source = absl::StrCat(n, " held-out sequence", n == 1 ? "" : "s", fewer, " of ",
                              dataset, " (shuffled positions ", spec.num_samples, "..",
                              spec.num_samples + n - 1, "; calibration used 0..",
                              spec.num_samples - 1, ")");
  } else {
    out.source = absl::StrCat(n, " sequence", n == 1 ? "" : "s", fewer, " of ", dataset);
  }
  absl::StrAppend(&out.source, ", at most ", c->max_sequence_length, " tokens each");
  return out;
}

nlohmann::json GateJson(const QualityGate& gate, const std::string& verdict) {
  if (!gate.active()) return nullptr;
  nlohmann::json j = {{"verdict", verdict}};
  j["max_kl"] = gate.max_kl ? nlohmann::json(*gate.max_kl) : nlohmann::json(nullptr);
  j["max_ppl_ratio"] =
      gate.max_ppl_ratio ? nlohmann::json(*gate.max_ppl_ratio) : nlohmann::json(nullptr);
  return j;
}

}  // namespace

absl::StatusOr<EvaluateAssignmentResult> RunEvaluateAssignment(const EvaluateAssignmentInput& in) {
  const auto start = std::chrono::steady_clock::now();
  const QuantizeJobSpec& spec = in.spec;
  const bool job_output = spec.candidate_dir.empty();
  const std::string candidate = job_output ? spec.output_dir : spec.candidate_dir;
  // Before the long part: the output must still be what finalization wrote.
  if (job_output) {
    if (absl::Status s = CheckFinalizedOutput(spec.output_dir, spec.job_id, in.manifest_sha256);
        !s.ok()) {
      return s;
    }
    // A file changed since finalization would be measured as it is now: every file is checked
    // against the manifest first (DATA_LOSS names them; the coordinator recomputes their layers).
    if (in.on_progress) in.on_progress("evaluating: verifying the output's files", 0);
    if (absl::Status s = VerifyFinalizedFiles(spec.output_dir); !s.ok()) return s;
  }
  absl::StatusOr<model::DeepseekV3Config> config =
      model::LoadDeepseekV3Config(spec.model_dir + "/config.json");
  if (!config.ok()) return config.status();
  absl::StatusOr<Sequences> seqs = LoadSequences(spec, config->vocab_size, in.dataset_name);
  if (!seqs.ok()) return seqs.status();

  EvaluateAssignmentResult result;
  result.source = seqs->source;
  result.not_measured = seqs->not_measured;
  QualityGate gate{spec.max_kl, spec.max_ppl_ratio};
  nlohmann::json quality;
  if (result.not_measured.empty()) {
    eval::CompareOptions options;
    options.batch_size = in.batch_size;
    if (in.device.rfind("cuda", 0) == 0) {
      options.device = at::Device(in.device);
      options.dtype = at::kBFloat16;
    }
    const int threads = in.cpu_threads > 0 ? in.cpu_threads : (options.device.is_cuda() ? 4 : 0);
    if (threads > 0) at::set_num_threads(threads);
    options.on_layer = [&](int done, int total) -> absl::Status {
      if (in.cancelled && in.cancelled()) return absl::CancelledError("evaluation cancelled");
      if (in.on_progress) {
        in.on_progress(absl::StrCat("evaluating: layer ", done, " of ", total), double(done) / total);
      }
      return absl::OkStatus();
    };
    if (in.on_progress) in.on_progress("evaluating: embedding", 0);
    absl::StatusOr<eval::QualityReport> report =
        eval::CompareCheckpoints(spec.model_dir, candidate, seqs->ids, options);
    if (!report.ok()) return report.status();
    result.report = *std::move(report);
    const eval::NextTokenQuality& q = result.report.next_token;
    if (gate.active()) {
      result.gate = QualityGateFailure(gate, q.kl_mean, q.perplexity_reference,
                                       q.perplexity_candidate);
      if (result.gate.empty()) result.gate = "passed";
    }
    quality = eval::QualityReportJson(result.report);
  } else {
    quality = {{"not_measured", result.not_measured}};
    if (gate.active()) result.gate = "nothing measured: " + result.not_measured;
  }
  quality["format"] = "mq-quality-1";
  quality["source"] = result.source;
  quality["reference"] = in.reference_name.empty() ? spec.model_dir : in.reference_name;
  quality["gate"] = GateJson(gate, result.gate);
  if (job_output) {
    absl::StatusOr<FinalizeOutput> out =
        AddToManifest(spec.output_dir, spec.job_id, in.manifest_sha256, kQualityFileName,
                      quality.dump(2) + "\n");
    if (!out.ok()) return out.status();
    result.manifest_sha256 = out->manifest_sha256;
    result.files = out->files;
    result.total_bytes = out->total_bytes;
  }
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace mq::pipeline
