#include "worker/pipeline/quantize_job.h"

#include <ATen/Parallel.h>

#include "absl/strings/str_cat.h"
#include "common/path_policy.h"
#include "worker/data/calibration.h"
#include "worker/data/tokenizer.h"
#include "worker/model/config.h"
#include "worker/pipeline/gang_pipeline.h"
#include "worker/pipeline/output.h"
#include "worker/quant/compressed_tensors.h"

namespace mq::pipeline {
namespace {

absl::StatusOr<quant::CompressedTensorsOptions> Format(const QuantizeJobSpec& spec) {
  quant::CompressedTensorsOptions f;
  f.group_size = spec.group_size < 0 ? 0 : spec.group_size;
  absl::StatusOr<quant::TargetSet> t =
      quant::ParseTargetSet(spec.targets == "all_linear" ? "all-linear" : "routed-experts");
  if (!t.ok()) return t.status();
  f.targets = *t;
  f.mtp = spec.include_mtp ? quant::MtpMode::kQuantize : quant::MtpMode::kIgnore;
  f.ignore_regexes = spec.ignore;
  absl::Status s = quant::ValidateCompressedTensorsOptions(f);
  if (!s.ok()) return s;
  return f;
}

// The model directory's config.json, read through ModelDirFile (never a symlink leading out).
absl::StatusOr<model::DeepseekV3Config> LoadConfig(const std::string& model_dir) {
  absl::StatusOr<std::string> path = ModelDirFile(model_dir, "config.json");
  if (!path.ok()) return path.status();
  return model::LoadDeepseekV3Config(*path);
}

// The tokenizer path calibration loads. Every file data::LoadTokenizer will read, other than the
// given path itself (checked against the path policy already), goes through ModelDirFile in its
// directory: a symlink leading out of the model directory, a --tokenizer directory or the
// directory of a tiktoken.model is refused. Without spec.tokenizer the model directory's
// tokenizer is used: its tokenizer.json, else its tiktoken.model (Kimi-K2) with the
// tokenizer_config.json beside it. When no tokenizer is found, the path is returned unchanged
// (the model directory's tokenizer.json), so that only a dataset that needs one fails.
absl::StatusOr<std::string> TokenizerPath(const QuantizeJobSpec& spec) {
  const std::string path = spec.tokenizer.empty() ? spec.model_dir : spec.tokenizer;
  absl::StatusOr<std::vector<std::string>> files = data::TokenizerFiles(path);
  if (!files.ok()) {
    if (!spec.tokenizer.empty()) return spec.tokenizer;
    return ModelDirFile(spec.model_dir, "tokenizer.json");
  }
  for (const std::string& f : *files) {
    if (f == path) continue;
    const size_t slash = f.find_last_of('/');
    absl::StatusOr<std::string> checked = ModelDirFile(f.substr(0, slash), f.substr(slash + 1));
    if (!checked.ok()) return checked.status();
  }
  return files->front();
}

absl::StatusOr<data::CalibrationSpec> Calibration(const QuantizeJobSpec& spec) {
  data::CalibrationSpec c;
  c.dataset_path = spec.dataset;
  absl::StatusOr<std::string> tokenizer = TokenizerPath(spec);
  if (!tokenizer.ok()) return tokenizer.status();
  c.tokenizer_path = *std::move(tokenizer);
  c.num_samples = spec.num_samples;
  c.max_sequence_length = spec.max_sequence_length;
  c.min_sequence_length = 2;
  c.seed = spec.seed;
  return c;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> CheckQuantizeInputs(const QuantizeJobSpec& spec) {
  std::vector<std::pair<std::string, std::string>> problems;
  if (!spec.symmetric) {
    problems.emplace_back("request.symmetric",
                          "asymmetric quantization is not supported by the pipeline; use "
                          "symmetric (the vLLM Marlin kernels' format)");
  }
  if (absl::StatusOr<quant::QuantMethod> m = quant::ParseQuantMethod(spec.method); !m.ok()) {
    problems.emplace_back("request.method", std::string(m.status().message()));
  }
  if (spec.awq_grid < 0 || spec.awq_grid > 100) {
    problems.emplace_back("request.awq.grid",
                          absl::StrCat("awq grid ", spec.awq_grid, ": must be in [0, 100]"));
  }
  if (spec.awq_max_tokens < 1) {
    problems.emplace_back("request.awq.max_tokens",
                          absl::StrCat("awq max_tokens ", spec.awq_max_tokens, ": must be >= 1"));
  }
  absl::StatusOr<quant::CompressedTensorsOptions> f = Format(spec);
  if (!f.ok()) problems.emplace_back("request.format", std::string(f.status().message()));
  if (spec.dataset.empty()) {
    problems.emplace_back("request.calibration.dataset_uri",
                          "a calibration dataset is required (JSONL or safetensors)");
  } else if (absl::StatusOr<data::CalibrationSpec> c = Calibration(spec); !c.ok()) {
    problems.emplace_back("request.calibration.tokenizer_uri", std::string(c.status().message()));
  } else if (absl::Status s = data::CheckCalibrationSource(*c); !s.ok()) {
    problems.emplace_back("request.calibration.dataset_uri", std::string(s.message()));
  }
  if (absl::Status s = CheckOutputLocation(spec.model_dir, spec.output_dir, spec.job_id); !s.ok()) {
    problems.emplace_back("request.output_uri", std::string(s.message()));
  }
  return problems;
}

absl::StatusOr<data::CalibrationSpec> JobCalibrationSpec(const QuantizeJobSpec& spec) {
  return Calibration(spec);
}

absl::StatusOr<int64_t> DatasetSamples(const QuantizeJobSpec& spec) {
  data::CalibrationSpec c;
  c.dataset_path = spec.dataset;
  return data::CountCalibrationSamples(c);
}

absl::Status ClaimOutput(const QuantizeJobSpec& spec) {
  return ClaimOutputLocation(spec.model_dir, spec.output_dir, spec.job_id);
}

absl::StatusOr<QuantizeAssignmentResult> RunQuantizeAssignment(const QuantizeAssignmentInput& in) {
  // Before anything is written: the directory must be this job's.
  if (absl::Status s = ClaimOutput(in.spec); !s.ok()) return s;
  absl::StatusOr<quant::CompressedTensorsOptions> format = Format(in.spec);
  if (!format.ok()) return format.status();
  absl::StatusOr<model::DeepseekV3Config> config = LoadConfig(in.spec.model_dir);
  if (!config.ok()) return config.status();
  absl::StatusOr<data::CalibrationSpec> cal_spec = Calibration(in.spec);
  if (!cal_spec.ok()) return cal_spec.status();
  absl::StatusOr<data::CalibrationSet> cal = data::LoadCalibration(*cal_spec, config->vocab_size);
  if (!cal.ok()) return cal.status();

  GangPipelineOptions o;
  o.model_dir = in.spec.model_dir;
  o.output_dir = in.spec.output_dir;
  o.scratch_dir = in.scratch_dir;
  o.gang.rank = in.rank;
  o.gang.world_size = in.world_size;
  o.gang.rendezvous = in.rendezvous;
  o.gang.local_host = in.local_host;
  o.gang.key = in.gang_key;
  o.gang.secret = in.rendezvous_secret;
  o.gang.join_timeout = std::chrono::milliseconds(in.join_timeout_ms);
  o.start_step = in.start_step;
  o.total_steps = in.total_steps;
  o.committed_files = in.committed_files;
  o.samples = std::move(cal->samples);
  absl::StatusOr<quant::QuantMethod> method = quant::ParseQuantMethod(in.spec.method);
  if (!method.ok()) return method.status();
  o.method = *method;
  o.awq.grid = in.spec.awq_grid;
  o.awq.max_tokens = in.spec.awq_max_tokens;
  o.format = *format;
  o.gptq.act_order = in.spec.act_order;
  o.gptq.rel_damp = in.spec.damping;
  o.gptq_batch.tf32_update = in.spec.tf32_update;
  absl::StatusOr<quant::ScaleSearch> search = quant::ParseScaleSearch(in.spec.scale_search);
  if (!search.ok()) return search.status();
  o.gptq.grid.scale_search = *search;
  o.min_expert_tokens = in.spec.min_expert_tokens;
  o.max_experts_per_pass = in.experts_per_pass;
  o.max_dispatch_tokens = in.dispatch_tokens;
  o.checkpoint_every = in.checkpoint_every;
  o.rare_expert_rtn = in.spec.rare_expert_rtn;
  if (in.device.rfind("cuda", 0) == 0) {
    o.device = at::Device(in.device);
    o.dtype = at::kBFloat16;
  }
  // The host-side work of a GPU worker is small (routing bookkeeping, index building); with one
  // worker per GPU, each using every core, the workers' thread pools contend and that work
  // stalls (a gang of 2 on one host: the dispatch rounds' overhead went from 4.3 to 1.5 s per
  // layer with 4 threads each, bench/RESULTS.md).
  const int threads = in.cpu_threads > 0 ? in.cpu_threads : (o.device.is_cuda() ? 4 : 0);
  if (threads > 0) at::set_num_threads(threads);
  o.overlap_writes = in.overlap_writes;
  o.prefetch_next_layer = in.prefetch_next_layer;
  o.stage_next_layer = in.stage_next_layer ? GangPipelineOptions::Staging::kAuto
                                           : GangPipelineOptions::Staging::kOff;
  o.overlap_transfers = in.overlap_transfers;
  o.preload_next_layer = in.preload_next_layer;
  o.profile_layers.insert(in.profile_layers.begin(), in.profile_layers.end());
  o.profile_prefix = absl::StrCat(in.profile_dir, "/mq-profile-", in.spec.job_id);
  o.on_step = in.on_step;
  o.on_progress = in.on_progress;
  o.on_warning = in.on_warning;
  o.cancelled = in.cancelled;
  absl::StatusOr<GangPipelineResult> r = RunGangPipeline(o);
  if (!r.ok()) return r.status();
  return QuantizeAssignmentResult{r->steps_run, r->steps_replayed, r->resumed_from_step,
                                  r->checkpoint_every};
}

void RemoveScratchExcept(const std::string& scratch_dir, const std::string& keep_job) {
  bool exists = false;
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(scratch_dir, &exists);
  if (!names.ok()) return;
  for (const std::string& n : *names) {
    if (n.rfind("j-", 0) == 0 && n != keep_job) RemoveHiddenCheckpoints(scratch_dir + "/" + n);
  }
}

absl::StatusOr<FinalizeAssignmentResult> RunFinalizeAssignment(
    const QuantizeJobSpec& spec, const std::vector<OutputFileInfo>& committed_files,
    int total_steps, std::function<absl::Status()> publish) {
  absl::StatusOr<quant::CompressedTensorsOptions> format = Format(spec);
  if (!format.ok()) return format.status();
  absl::StatusOr<model::DeepseekV3Config> config = LoadConfig(spec.model_dir);
  if (!config.ok()) return config.status();
  const std::vector<int> layers = PipelineLayers(*config, *format);
  if (static_cast<int>(layers.size()) != total_steps) {
    return absl::FailedPreconditionError(
        absl::StrCat("the job has ", total_steps, " steps but the model gives ", layers.size()));
  }
  FinalizeOptions f;
  f.job_id = spec.job_id;
  f.model_dir = spec.model_dir;
  f.output_dir = spec.output_dir;
  f.committed_files = committed_files;
  // Steps cover layers [0, L) (+ MTP when quantized): everything else goes to the globals file.
  f.num_pipeline_layers = layers.empty() ? 0 : layers.back() + 1;
  f.format = *format;
  f.publish = std::move(publish);
  absl::StatusOr<FinalizeOutput> out = FinalizeOutputDir(f);
  if (!out.ok()) return out.status();
  return FinalizeAssignmentResult{out->manifest_sha256, out->files, out->total_bytes,
                                  out->removed_files, out->verified};
}

}  // namespace mq::pipeline
