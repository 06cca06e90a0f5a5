#include "tests/tools/tool_args.h"

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/tensor_io.h"

namespace mq::tools {

absl::Status ParseToolFlags(int argc, char** argv, const std::map<std::string, std::string*>& flags,
                            std::initializer_list<const char*> required, const char* usage) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << usage;
      std::exit(0);
    }
    auto it = flags.find(arg);
    if (it == flags.end()) return absl::InvalidArgumentError(absl::StrCat("unknown flag ", arg));
    if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(arg, " needs a value"));
    *it->second = argv[++i];
  }
  for (const char* name : required) {
    if (flags.at(name)->empty()) {
      return absl::InvalidArgumentError(absl::StrCat(name, " is required"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> ReadInputIds(const std::string& path) {
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file = model::SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  absl::StatusOr<model::TensorView> view = (*file)->Get("input_ids");
  if (!view.ok()) return view.status();
  at::ScalarType type;
  if (view->dtype == model::DType::kI64) {
    type = at::kLong;
  } else if (view->dtype == model::DType::kI32) {
    type = at::kInt;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path, ": \"input_ids\" has dtype ",
                                                   std::string(model::DTypeName(view->dtype)),
                                                   ": must be I64 or I32"));
  }
  if (view->shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": \"input_ids\" must be 2-D [batch, seq], found ",
                     model::ShapeToString(view->shape)));
  }
  at::Tensor ids = at::empty(view->shape, at::TensorOptions().dtype(type));
  std::memcpy(ids.data_ptr(), view->data, view->num_bytes);
  return ids.to(at::kLong);
}

}  // namespace mq::tools
