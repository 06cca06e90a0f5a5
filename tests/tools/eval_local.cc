// mq-eval-local: quality of a checkpoint against a reference checkpoint of the same DeepSeek-V3
// architecture on token sequences (worker/eval/compare.h), as JSON: per-layer relative hidden
// state error, KL(reference ‖ model) mean / p99 / max, top-1 agreement, NLL and perplexity of
// both. Either checkpoint may be FP8, BF16/F32 or compressed-tensors pack-quantized (W4A16,
// mq's or another tool's).
//
//   mq-eval-local --reference DIR --model DIR --input IDS.safetensors [--output quality.json]
//                 [--device cpu|cuda|cuda:N] [--dtype float32|bfloat16] [--batch-size N]
//
// IDS.safetensors holds "input_ids", I64 or I32 [n, seq] (seq >= 2). The JSON goes to stdout
// and, with --output, to that file (written atomically). Single-threaded command-line tool.

#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "worker/eval/compare.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/safetensors_writer.h"
#include "worker/model/tensor_io.h"
#include "tests/tools/tool_args.h"

namespace mq::tools {
namespace {

constexpr const char* kUsage =
    "usage: mq-eval-local --reference DIR --model DIR --input IDS.safetensors\n"
    "                     [--output quality.json] [--device cpu|cuda|cuda:N]\n"
    "                     [--dtype float32|bfloat16] [--batch-size N]\n"
    "Runs both checkpoints layer by layer on \"input_ids\" (I64 or I32 [n, seq]) and prints\n"
    "KL(reference || model), top-1 agreement, perplexities and per-layer errors as JSON.\n";

struct Options {
  std::string reference;
  std::string model;
  std::string input;
  std::string output;
  std::string device = "cpu";
  std::string dtype = "float32";
  std::string batch_size = "8";
};

absl::StatusOr<Options> ParseArgs(int argc, char** argv) {
  Options o;
  absl::Status s = ParseToolFlags(
      argc, argv,
      {{"--reference", &o.reference}, {"--model", &o.model}, {"--input", &o.input},
       {"--output", &o.output}, {"--device", &o.device}, {"--dtype", &o.dtype},
       {"--batch-size", &o.batch_size}},
      {"--reference", "--model", "--input"}, kUsage);
  if (!s.ok()) return s;
  return o;
}

absl::Status Run(const Options& o) {
  eval::CompareOptions options;
  if (o.dtype == "float32") {
    options.dtype = at::kFloat;
  } else if (o.dtype == "bfloat16") {
    options.dtype = at::kBFloat16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype = ", o.dtype, ": must be float32 or bfloat16"));
  }
  if (!absl::SimpleAtoi(o.batch_size, &options.batch_size) || options.batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--batch-size = ", o.batch_size, ": must be an integer >= 1"));
  }
  std::optional<at::Device> device;
  try {
    device = at::Device(o.device);
  } catch (const c10::Error&) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device = ", o.device, ": must be cpu, cuda or cuda:N"));
  }
  if (device->is_cuda()) {
    const int64_t visible = at::hasCUDA() ? at::detail::getCUDAHooks().deviceCount() : 0;
    if (visible == 0 || device->index() >= visible) {
      return absl::FailedPreconditionError(
          absl::StrCat("--device = ", o.device, ": ", visible, " CUDA device(s) visible"));
    }
  } else if (!device->is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device = ", o.device, ": must be cpu, cuda or cuda:N"));
  }
  options.device = *device;
  absl::StatusOr<at::Tensor> ids = ReadInputIds(o.input);
  if (!ids.ok()) return ids.status();
  absl::StatusOr<eval::QualityReport> report =
      eval::CompareCheckpoints(o.reference, o.model, *ids, options);
  if (!report.ok()) return report.status();
  nlohmann::json j = eval::QualityReportJson(*report);
  j["reference"] = o.reference;
  j["model"] = o.model;
  j["device"] = o.device;
  j["dtype"] = o.dtype;
  const std::string text = j.dump(2) + "\n";
  std::cout << text;
  if (!o.output.empty()) return model::WriteFileAtomic(o.output, text);
  return absl::OkStatus();
}

}  // namespace
}  // namespace mq::tools

int main(int argc, char** argv) {
  absl::StatusOr<mq::tools::Options> options = mq::tools::ParseArgs(argc, argv);
  if (!options.ok()) {
    std::cerr << "mq-eval-local: " << options.status().message() << "\n" << mq::tools::kUsage;
    return 2;
  }
  absl::Status status = mq::tools::Run(*options);
  if (!status.ok()) {
    std::cerr << "mq-eval-local: " << status << "\n";
    return 1;
  }
  return 0;
}
