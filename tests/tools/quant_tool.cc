// mq-quant-tool: runs worker/quant (GPTQ or RTN, then compressed-tensors packing) on weights and
// calibration inputs read from a safetensors file, for the interop tests.
//
//   mq-quant-tool --input IN.safetensors --output OUT.safetensors [--weights NAME[,NAME...]]
//                 [--method gptq|rtn] [--group-size N (0 = per-channel)] [--asym]
//                 [--no-act-order] [--rel-damp X] [--block-size N] [--max-damp-retries N]
//                 [--scale-search minmax|mse] [--mse-norm X] [--mse-grid N]
//                 [--device cpu|cuda|cuda:N]
//
// IN holds the weights (default one tensor "weight", [O, I], F32/F64/BF16/F16) and, for GPTQ,
// either "hessian" [I, I] or calibration inputs "x" [N, I] (accumulated with
// HessianAccumulator; "hessian" wins when both exist). Several --weights share ONE Hessian
// (QuantizeGptqShared, as gate_proj and up_proj do).
// OUT gets, for each weight NAME: NAME.codes (I8 [O, I], signed), NAME.scales (BF16 [O, G]),
// NAME.zero_points (I8, asym only), NAME.dequant (BF16 [O, I]), the compressed-tensors tensors
// NAME.weight_packed (I32), NAME.weight_scale (BF16), NAME.weight_shape (I64),
// NAME.weight_zero_point (I32, asym only); plus "hessian" (F32, the H used, GPTQ only). The
// metadata has NAME.fallback, NAME.fallback_reason, NAME.rel_damp, NAME.damping,
// NAME.damp_retries and NAME.dead_columns. Single-threaded command-line tool; the output is
// written atomically.

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/safetensors_writer.h"
#include "worker/model/tensor_io.h"
#include "worker/quant/gptq.h"
#include "worker/quant/hessian.h"
#include "worker/quant/pack.h"
#include "worker/quant/rtn.h"

namespace mq::tools {
namespace {

constexpr const char* kUsage =
    "usage: mq-quant-tool --input IN.safetensors --output OUT.safetensors\n"
    "         [--weights NAME[,NAME...]] [--method gptq|rtn] [--group-size N] [--asym]\n"
    "         [--no-act-order] [--rel-damp X] [--block-size N] [--max-damp-retries N]\n"
    "         [--scale-search minmax|mse] [--mse-norm X] [--mse-grid N] [--device DEV]\n"
    "IN: the weights (default \"weight\") and \"hessian\" [I, I] or inputs \"x\" [N, I].\n";

struct Options {
  std::string input;
  std::string output;
  std::vector<std::string> weights = {"weight"};
  std::string method = "gptq";
  std::string device = "cpu";
  quant::GptqOptions gptq;
};

absl::Status ParseInt(const std::string& flag, const std::string& value, int64_t* out) {
  if (!absl::SimpleAtoi(value, out)) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " = \"", value, "\": not an integer"));
  }
  return absl::OkStatus();
}

absl::Status ParseDouble(const std::string& flag, const std::string& value, double* out) {
  if (!absl::SimpleAtod(value, out)) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " = \"", value, "\": not a number"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Options> ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (arg == "--asym") {
      o.gptq.grid.symmetric = false;
      continue;
    }
    if (arg == "--no-act-order") {
      o.gptq.act_order = false;
      continue;
    }
    if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(arg, " needs a value"));
    const std::string value = argv[++i];
    int64_t n = 0;
    absl::Status s;
    if (arg == "--input") {
      o.input = value;
    } else if (arg == "--output") {
      o.output = value;
    } else if (arg == "--weights") {
      o.weights = absl::StrSplit(value, ',', absl::SkipEmpty());
    } else if (arg == "--method") {
      if (value != "gptq" && value != "rtn") {
        return absl::InvalidArgumentError(
            absl::StrCat("--method = \"", value, "\": must be gptq or rtn"));
      }
      o.method = value;
    } else if (arg == "--device") {
      o.device = value;
    } else if (arg == "--group-size") {
      s = ParseInt(arg, value, &o.gptq.grid.group_size);
    } else if (arg == "--block-size") {
      s = ParseInt(arg, value, &o.gptq.block_size);
    } else if (arg == "--max-damp-retries") {
      s = ParseInt(arg, value, &n);
      o.gptq.max_damp_retries = static_cast<int>(n);
    } else if (arg == "--mse-grid") {
      s = ParseInt(arg, value, &n);
      o.gptq.grid.mse_grid_points = static_cast<int>(n);
    } else if (arg == "--rel-damp") {
      s = ParseDouble(arg, value, &o.gptq.rel_damp);
    } else if (arg == "--mse-norm") {
      s = ParseDouble(arg, value, &o.gptq.grid.mse_norm);
    } else if (arg == "--scale-search") {
      absl::StatusOr<quant::ScaleSearch> search = quant::ParseScaleSearch(value);
      if (!search.ok()) return search.status();
      o.gptq.grid.scale_search = *search;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", arg));
    }
    if (!s.ok()) return s;
  }
  if (o.input.empty() || o.output.empty()) {
    return absl::InvalidArgumentError("--input and --output are required");
  }
  if (o.weights.empty()) return absl::InvalidArgumentError("--weights is empty");
  return o;
}

absl::StatusOr<at::Tensor> ReadFloat(const model::SafetensorsFile& file, const std::string& name) {
  absl::StatusOr<model::TensorView> view = file.Get(name);
  if (!view.ok()) return view.status();
  at::ScalarType type;
  switch (view->dtype) {
    case model::DType::kF32:
      type = at::kFloat;
      break;
    case model::DType::kF64:
      type = at::kDouble;
      break;
    case model::DType::kBF16:
      type = at::kBFloat16;
      break;
    case model::DType::kF16:
      type = at::kHalf;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(file.path(), ": \"", name, "\" has dtype ",
                                                     std::string(model::DTypeName(view->dtype)),
                                                     ": must be F32, F64, BF16 or F16"));
  }
  at::Tensor t = at::empty(view->shape, at::TensorOptions().dtype(type));
  std::memcpy(t.data_ptr(), view->data, view->num_bytes);
  return t;
}

absl::Status Run(const Options& o) {
  const at::Device device(o.device);
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file =
      model::SafetensorsFile::Open(o.input);
  if (!file.ok()) return file.status();
  std::vector<at::Tensor> weights;
  for (const std::string& name : o.weights) {
    absl::StatusOr<at::Tensor> w = ReadFloat(**file, name);
    if (!w.ok()) return w.status();
    weights.push_back(w->to(device));
  }

  std::vector<quant::GptqResult> results;
  at::Tensor hessian;
  if (o.method == "rtn") {
    for (const at::Tensor& w : weights) {
      absl::StatusOr<quant::QuantizedWeight> q = quant::QuantizeRtn(w, o.gptq.grid);
      if (!q.ok()) return q.status();
      quant::GptqResult r;
      r.weight = *std::move(q);
      r.fallback = quant::Fallback::kRtn;
      r.fallback_reason = "--method rtn";
      results.push_back(std::move(r));
    }
  } else {
    if ((*file)->header().Find("hessian") != nullptr) {
      absl::StatusOr<at::Tensor> h = ReadFloat(**file, "hessian");
      if (!h.ok()) return h.status();
      hessian = h->to(device);
    } else {
      absl::StatusOr<at::Tensor> x = ReadFloat(**file, "x");
      if (!x.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(o.input, ": GPTQ needs a \"hessian\" or an \"x\" tensor"));
      }
      if (x->dim() != 2) {
        return absl::InvalidArgumentError(absl::StrCat(o.input, ": \"x\" must be 2-D [N, I]"));
      }
      quant::HessianAccumulator acc(x->size(1), device);
      if (absl::Status s = acc.Add(*x); !s.ok()) return s;
      absl::StatusOr<at::Tensor> h = acc.Finalize();
      if (!h.ok()) return h.status();
      hessian = *h;
    }
    absl::StatusOr<std::vector<quant::GptqResult>> r =
        quant::QuantizeGptqShared(weights, hessian, o.gptq);
    if (!r.ok()) return r.status();
    results = *std::move(r);
  }

  std::vector<model::TensorData> out;
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
  auto add = [&](const std::string& name, const at::Tensor& t) -> absl::Status {
    if (!t.defined()) return absl::OkStatus();
    out.push_back(model::ToTensorData(name, t));
    return absl::OkStatus();
  };
  for (size_t k = 0; k < results.size(); ++k) {
    const std::string& n = o.weights[k];
    const quant::GptqResult& r = results[k];
    absl::StatusOr<quant::PackedWeight> packed = quant::PackWeight(r.weight);
    if (!packed.ok()) return packed.status();
    for (const auto& [suffix, t] : std::vector<std::pair<std::string, at::Tensor>>{
             {"codes", r.weight.codes},
             {"scales", r.weight.scales},
             {"zero_points", r.weight.zero_points},
             {"dequant", r.weight.dequantized},
             {"weight_packed", packed->weight_packed},
             {"weight_scale", packed->weight_scale},
             {"weight_shape", packed->weight_shape},
             {"weight_zero_point", packed->weight_zero_point}}) {
      if (absl::Status s = add(absl::StrCat(n, ".", suffix), t); !s.ok()) return s;
    }
    metadata[n + ".fallback"] = quant::FallbackName(r.fallback);
    metadata[n + ".fallback_reason"] = r.fallback_reason;
    metadata[n + ".rel_damp"] = absl::StrCat(r.rel_damp);
    metadata[n + ".damping"] = absl::StrCat(r.damping);
    metadata[n + ".damp_retries"] = absl::StrCat(r.damp_retries);
    metadata[n + ".dead_columns"] = absl::StrCat(r.dead_columns);
    std::cerr << n << ": fallback " << quant::FallbackName(r.fallback) << " rel_damp " << r.rel_damp
              << " dead_columns " << r.dead_columns << "\n";
  }
  if (absl::Status s = add("hessian", hessian); !s.ok()) return s;
  return model::WriteSafetensors(o.output, std::move(out), metadata);
}

}  // namespace
}  // namespace mq::tools

int main(int argc, char** argv) {
  absl::StatusOr<mq::tools::Options> options = mq::tools::ParseArgs(argc, argv);
  if (!options.ok()) {
    std::cerr << "mq-quant-tool: " << options.status().message() << "\n" << mq::tools::kUsage;
    return 2;
  }
  absl::Status s;
  try {
    s = mq::tools::Run(*options);
  } catch (const std::exception& e) {
    s = absl::InternalError(e.what());
  }
  if (!s.ok()) {
    std::cerr << "mq-quant-tool: " << s.message() << "\n";
    return 1;
  }
  return 0;
}
