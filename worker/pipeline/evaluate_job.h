// The worker's entry point into a job's evaluation (EVALUATING, DESIGN.md §9): the job's output
// (or an evaluation job's candidate) measured against the original model on held-out sequences,
// layer by layer (worker/eval/compare.h), and quality.json written into the output and added to
// its manifest. Plain types, so that the RPC layer never includes torch (DESIGN.md §7).
//
// The sequences: spec.eval_dataset's when set, otherwise the calibration dataset's sequences
// that calibration did not use, i.e. LoadCalibration with the calibration's seed and length
// filter, skipping its spec.num_samples (data/calibration.h); spec.eval_samples of them,
// truncated to spec.eval_max_sequence_length tokens.
//
// quality.json (format "mq-quality-1"): compare.h's QualityReportJson plus "source" (where the
// sequences came from), "reference" (the original's location) and "gate" ({"max_kl",
// "max_ppl_ratio", "verdict"} with verdict "passed" or the failure, or null without a gate). It
// holds no time and not the output's own location, so the same job measured again on the same
// device writes the same bytes, into any output directory.
//
// Threading: one assignment at a time per process; callbacks run on the calling thread.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "worker/eval/quality.h"
#include "worker/pipeline/quantize_job.h"

namespace mq::pipeline {

struct EvaluateAssignmentInput {
  QuantizeJobSpec spec;  // model_dir is the reference
  // The reference's and the sequences' dataset's locations as the job named them, recorded in
  // quality.json and the source line (a worker reads s3:// inputs from local staged copies,
  // whose paths mean nothing to the user). Empty: spec.model_dir and the dataset's path.
  std::string reference_name;
  std::string dataset_name;
  // A quantize job's: SHA-256 of the manifest finalization wrote (output.h CheckFinalizedOutput).
  // Empty for an evaluation job (spec.candidate_dir set), which writes nothing.
  std::string manifest_sha256;
  std::string device = "cpu";  // "cpu" or "cuda:N"
  int cpu_threads = 0;         // intra-op threads (0: 4 on CUDA, all cores on CPU)
  int64_t batch_size = 4;      // sequences per forward call
  std::function<void(const std::string&, double)> on_progress;
  std::function<bool()> cancelled;
};

struct EvaluateAssignmentResult {
  eval::QualityReport report;  // empty when not_measured is set
  std::string source;          // where the sequences came from
  std::string not_measured;    // why nothing was measured (no held-out sequence left), or empty
  std::string gate;            // "", "passed" or the failure (common/quality_gate.h)
  double seconds = 0;
  // Quantize jobs: the manifest with quality.json.
  std::string manifest_sha256;
  int files = 0;
  int64_t total_bytes = 0;
};

// Runs the evaluation. FailedPrecondition / DATA_LOSS when the output is not this job's
// finalized output (CheckFinalizedOutput) or a file it lists differs from its manifest entry
// (VerifyFinalizedFiles: DATA_LOSS naming the files, CorruptFilesOf); InvalidArgument for a dataset or candidate that does
// not fit (naming it); CANCELLED when `cancelled` returned true; the engine's errors otherwise.
// No sequence left to evaluate on is not an error: not_measured says why (and for a quantize job
// quality.json says so too).
absl::StatusOr<EvaluateAssignmentResult> RunEvaluateAssignment(const EvaluateAssignmentInput& in);

}  // namespace mq::pipeline
