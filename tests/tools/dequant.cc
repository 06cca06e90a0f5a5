// mq-dequant: reads a checkpoint directory with CheckpointReader, dequantizes every FP8 weight
// (F8_E4M3 + F32 <name>_scale_inv, FORMATS.md §2.3) with LoadAsBf16 and writes the bf16 results,
// under the weights' own names, to one safetensors file. Used by the interop test that compares
// our dequantization with torch bit for bit.
//
// Single-threaded driver (the dequantization itself may use several threads).

#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/fp8.h"
#include "worker/model/safetensors_writer.h"

namespace mq::tools {
namespace {

constexpr const char* kUsage =
    "usage: mq-dequant --input DIR --output FILE\n"
    "Dequantizes every F8_E4M3 weight of the checkpoint in DIR (index + shards, or a single\n"
    "model.safetensors) to bf16 and writes them to the safetensors FILE.\n";

absl::Status Dequantize(const std::string& input, const std::string& output) {
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> reader =
      model::CheckpointReader::Open(input);
  if (!reader.ok()) return reader.status();
  std::vector<model::TensorData> tensors;
  for (const std::string& name : (*reader)->names()) {
    absl::StatusOr<model::TensorView> view = (*reader)->Get(name);
    if (!view.ok()) return view.status();
    if (view->dtype != model::DType::kF8E4M3) continue;
    absl::StatusOr<std::vector<uint16_t>> bf16 = model::LoadAsBf16(**reader, name);
    if (!bf16.ok()) return bf16.status();
    model::TensorData t{name, model::DType::kBF16, view->shape, {}};
    t.bytes.resize(bf16->size() * sizeof(uint16_t));
    if (!t.bytes.empty()) std::memcpy(t.bytes.data(), bf16->data(), t.bytes.size());
    tensors.push_back(std::move(t));
  }
  const size_t count = tensors.size();
  if (absl::Status s = model::WriteSafetensors(output, std::move(tensors)); !s.ok()) return s;
  std::cout << "mq-dequant: wrote " << count << " bf16 weights to " << output << "\n";
  return absl::OkStatus();
}

int Run(int argc, char** argv) {
  std::string input, output;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if ((arg == "--input" || arg == "--output") && i + 1 < argc) {
      (arg == "--input" ? input : output) = argv[++i];
      continue;
    }
    std::cerr << "mq-dequant: unknown or incomplete argument \"" << arg << "\"\n" << kUsage;
    return 2;
  }
  if (input.empty() || output.empty()) {
    std::cerr << "mq-dequant: --input and --output are required\n" << kUsage;
    return 2;
  }
  if (absl::Status s = Dequantize(input, output); !s.ok()) {
    std::cerr << "mq-dequant: " << s << "\n";
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace mq::tools

int main(int argc, char** argv) { return mq::tools::Run(argc, argv); }
