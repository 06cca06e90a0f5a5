// mq-quantize-local: single-process W4A16 quantization of a DeepSeek-V3 checkpoint into a
// compressed-tensors pack-quantized checkpoint (worker/quant/local_pipeline.h).
//
//   mq-quantize-local --model DIR --output DIR --input TOKENS.safetensors
//       [--method gptq|rtn] [--group-size 128] [--targets routed-experts|all-linear]
//       [--ignore REGEX]... [--mtp ignore|quantize] [--device cpu|cuda:0]
//       [--dtype float32|bfloat16] [--batch-size N] [--experts-per-pass N]
//       [--report REPORT.json]
//
// TOKENS holds "input_ids" (I64 [n, seq]). Single-threaded command-line tool.

#include <ATen/ATen.h>

#include <cstring>
#include <iostream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/quant/local_pipeline.h"

namespace mq::tools {
namespace {

constexpr const char* kUsage =
    "usage: mq-quantize-local --model DIR --output DIR --input TOKENS.safetensors\n"
    "  [--method gptq|rtn] [--group-size 0|32|64|128] [--targets routed-experts|all-linear]\n"
    "  [--ignore REGEX]... [--mtp ignore|quantize] [--device cpu|cuda:0]\n"
    "  [--dtype float32|bfloat16] [--batch-size N] [--experts-per-pass N] [--report REPORT.json]\n";

absl::Status Run(int argc, char** argv) {
  quant::LocalQuantizeOptions o;
  std::string input;
  std::string device = "cpu";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(arg, " needs a value"));
    const std::string v = argv[++i];
    if (arg == "--model") {
      o.model_dir = v;
    } else if (arg == "--output") {
      o.output_dir = v;
    } else if (arg == "--input") {
      input = v;
    } else if (arg == "--method") {
      if (v == "gptq") {
        o.method = quant::QuantMethod::kGptq;
      } else if (v == "rtn") {
        o.method = quant::QuantMethod::kRtn;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("--method = \"", v, "\": must be gptq or rtn"));
      }
    } else if (arg == "--group-size") {
      if (!absl::SimpleAtoi(v, &o.format.group_size)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--group-size = \"", v, "\": not an integer"));
      }
    } else if (arg == "--targets") {
      absl::StatusOr<quant::TargetSet> t = quant::ParseTargetSet(v);
      if (!t.ok()) return t.status();
      o.format.targets = *t;
    } else if (arg == "--ignore") {
      o.format.ignore_regexes.push_back(v);
    } else if (arg == "--mtp") {
      absl::StatusOr<quant::MtpMode> m = quant::ParseMtpMode(v);
      if (!m.ok()) return m.status();
      o.format.mtp = *m;
    } else if (arg == "--device") {
      device = v;
    } else if (arg == "--dtype") {
      if (v == "float32") {
        o.dtype = at::kFloat;
      } else if (v == "bfloat16") {
        o.dtype = at::kBFloat16;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("--dtype = \"", v, "\": must be float32 or bfloat16"));
      }
    } else if (arg == "--batch-size") {
      if (!absl::SimpleAtoi(v, &o.batch_size)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--batch-size = \"", v, "\": not an integer"));
      }
    } else if (arg == "--experts-per-pass") {
      if (!absl::SimpleAtoi(v, &o.experts_per_pass)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--experts-per-pass = \"", v, "\": not an integer"));
      }
    } else if (arg == "--report") {
      o.report_path = v;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", arg, "\n", kUsage));
    }
  }
  if (o.model_dir.empty() || o.output_dir.empty() || input.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--model, --output and --input are required\n", kUsage));
  }
  try {
    o.device = at::Device(device);
  } catch (const c10::Error&) {
    return absl::InvalidArgumentError(absl::StrCat("--device = \"", device, "\": not a device"));
  }
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file =
      model::SafetensorsFile::Open(input);
  if (!file.ok()) return file.status();
  absl::StatusOr<model::TensorView> view = (*file)->Get("input_ids");
  if (!view.ok()) return view.status();
  if (view->dtype != model::DType::kI64 || view->shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(input, ": input_ids must be I64 [n, seq]"));
  }
  o.input_ids = at::empty(view->shape, at::TensorOptions().dtype(at::kLong));
  std::memcpy(o.input_ids.data_ptr(), view->data, view->num_bytes);

  absl::StatusOr<quant::LocalQuantizeReport> report = quant::QuantizeLocal(o);
  if (!report.ok()) return report.status();
  int64_t fallbacks = 0;
  for (const quant::LinearReport& l : report->linears) fallbacks += l.fallback != "none";
  std::cerr << "quantized " << report->linears.size() << " linears (" << fallbacks
            << " fallbacks) on " << report->calibration_tokens << " tokens in " << report->seconds
            << " s -> " << o.output_dir << "\n";
  return absl::OkStatus();
}

}  // namespace
}  // namespace mq::tools

int main(int argc, char** argv) {
  absl::Status s = mq::tools::Run(argc, argv);
  if (!s.ok()) {
    std::cerr << "mq-quantize-local: " << s << "\n";
    return 1;
  }
  return 0;
}
