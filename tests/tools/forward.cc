// mq-forward: runs our DeepSeek-V3 forward (worker/model/deepseek_v3.h) on token ids and writes
// the logits and every hidden state as F32 safetensors, for comparison with transformers.
//
//   mq-forward --model DIR --input IDS.safetensors --output OUT.safetensors
//              [--device cpu|cuda|cuda:N] [--dtype float32|bfloat16]
//
// IDS.safetensors holds "input_ids", I64 or I32 [batch, seq]. OUT.safetensors gets "logits"
// [batch, seq, vocab] and "hidden_states.{i}" [batch, seq, hidden] for i = 0..L, transformers'
// output_hidden_states convention: 0 = embeddings, i = output of layer i-1, and L = the last
// layer's output AFTER the final norm (transformers replaces the last entry with
// last_hidden_state). Single-threaded command-line tool; the output is written atomically.

#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"
#include "worker/model/deepseek_v3.h"
#include "worker/model/safetensors_writer.h"
#include "worker/model/tensor_io.h"
#include "tests/tools/tool_args.h"

namespace mq::tools {
namespace {

constexpr const char* kUsage =
    "usage: mq-forward --model DIR --input IDS.safetensors --output OUT.safetensors\n"
    "                  [--device cpu|cuda|cuda:N] [--dtype float32|bfloat16]\n"
    "Runs the DeepSeek-V3 forward on \"input_ids\" (I64 or I32 [batch, seq]) and writes F32\n"
    "\"logits\" and \"hidden_states.{0..L}\" (transformers' convention; the last is after the\n"
    "final norm).\n";

struct Options {
  std::string model;
  std::string input;
  std::string output;
  std::string device = "cpu";
  std::string dtype = "float32";
};

absl::StatusOr<Options> ParseArgs(int argc, char** argv) {
  Options o;
  absl::Status s = ParseToolFlags(argc, argv,
                                  {{"--model", &o.model},
                                   {"--input", &o.input},
                                   {"--output", &o.output},
                                   {"--device", &o.device},
                                   {"--dtype", &o.dtype}},
                                  {"--model", "--input", "--output"}, kUsage);
  if (!s.ok()) return s;
  return o;
}

absl::Status Run(const Options& o) {
  at::ScalarType dtype;
  if (o.dtype == "float32") {
    dtype = at::kFloat;
  } else if (o.dtype == "bfloat16") {
    dtype = at::kBFloat16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype = ", o.dtype, ": must be float32 or bfloat16"));
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
    if (device->index() >= visible || visible == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("--device = ", o.device, ": ", visible, " CUDA device(s) visible"));
    }
  } else if (!device->is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device = ", o.device, ": must be cpu, cuda or cuda:N"));
  }
  absl::StatusOr<model::DeepseekV3Config> config =
      model::LoadDeepseekV3Config(o.model + "/config.json");
  if (!config.ok()) return config.status();
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> reader =
      model::CheckpointReader::Open(o.model);
  if (!reader.ok()) return reader.status();
  absl::StatusOr<at::Tensor> ids = ReadInputIds(o.input);
  if (!ids.ok()) return ids.status();

  model::RunModelOptions options;
  options.device = *device;
  options.dtype = dtype;
  absl::StatusOr<model::ModelOutput> out = model::RunModel(**reader, *config, *ids, options);
  if (!out.ok()) return out.status();

  std::vector<model::TensorData> tensors;
  tensors.push_back(model::ToTensorData("logits", out->logits.to(at::kFloat)));
  for (size_t i = 0; i < out->hidden_states.size(); ++i) {
    tensors.push_back(model::ToTensorData(absl::StrCat("hidden_states.", i),
                                          out->hidden_states[i].to(at::kFloat)));
  }
  return model::WriteSafetensors(o.output, std::move(tensors));
}

}  // namespace
}  // namespace mq::tools

int main(int argc, char** argv) {
  absl::StatusOr<mq::tools::Options> options = mq::tools::ParseArgs(argc, argv);
  if (!options.ok()) {
    std::cerr << "mq-forward: " << options.status().message() << "\n" << mq::tools::kUsage;
    return 2;
  }
  absl::Status status = mq::tools::Run(*options);
  if (!status.ok()) {
    std::cerr << "mq-forward: " << status << "\n";
    return 1;
  }
  return 0;
}
