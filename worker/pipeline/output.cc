#include "worker/pipeline/output.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "worker/model/config.h"
#include "worker/model/fp8.h"
#include "worker/model/safetensors_writer.h"
#include "worker/quant/layer_tools.h"

namespace mq::pipeline {
namespace {

// Files copied from the model directory when present.
constexpr const char* kCopiedFiles[] = {"tokenizer.json",
                                        "tokenizer_config.json",
                                        "special_tokens_map.json",
                                        "tokenizer.model",
                                        "generation_config.json",
                                        "chat_template.jinja",
                                        "configuration_deepseek.py",
                                        "modeling_deepseek.py"};

std::string Hex(const unsigned char* d, unsigned n) {
  static const char* kDigits = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (unsigned i = 0; i < n; ++i) {
    out[2 * i] = kDigits[d[i] >> 4];
    out[2 * i + 1] = kDigits[d[i] & 15];
  }
  return out;
}

absl::Status Errno(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// True for names an mq output directory may hold (finished files and temporaries).
bool IsOutputName(const std::string& n) {
  if (absl::StartsWith(n, "model-") &&
      (absl::EndsWith(n, ".safetensors") || absl::StrContains(n, ".safetensors.tmp."))) {
    return true;
  }
  for (const char* f : kCopiedFiles) {
    if (n == f || absl::StartsWith(n, absl::StrCat(f, ".tmp."))) return true;
  }
  for (const char* f : {"config.json", "model.safetensors.index.json", kManifestFileName}) {
    if (n == f || absl::StartsWith(n, absl::StrCat(f, ".tmp."))) return true;
  }
  return false;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir, bool* exists) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  *exists = d != nullptr;
  if (!d) {
    if (errno == ENOENT) return names;
    return Errno(absl::StrCat("open directory ", dir));
  }
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

std::string Sha256Hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  EVP_Digest(data.data(), data.size(), md, &n, EVP_sha256(), nullptr);
  return Hex(md, n);
}

absl::StatusOr<std::string> Sha256OfFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return Errno(absl::StrCat("open ", path));
  }
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 22);
  absl::Status status;
  while (true) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      status = Errno(absl::StrCat("read ", path));
      break;
    }
    if (r == 0) break;
    EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(r));
  }
  ::close(fd);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  EVP_DigestFinal_ex(ctx, md, &n);
  EVP_MD_CTX_free(ctx);
  if (!status.ok()) return status;
  return Hex(md, n);
}

absl::StatusOr<OutputFileInfo> DescribeFile(const std::string& dir, const std::string& name) {
  const std::string path = dir + "/" + name;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Errno(absl::StrCat("stat ", path));
  absl::StatusOr<std::string> sha = Sha256OfFile(path);
  if (!sha.ok()) return sha.status();
  return OutputFileInfo{name, static_cast<int64_t>(st.st_size), *sha};
}

absl::StatusOr<OutputFileInfo> WriteDescribedSafetensors(const std::string& dir,
                                                         const std::string& name,
                                                         std::vector<model::TensorData> tensors) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  int64_t size = 0;
  const absl::Status written = model::WriteSafetensorsObserved(
      dir + "/" + name, std::move(tensors), {{"format", "pt"}}, [&](const void* data, size_t n) {
        EVP_DigestUpdate(ctx, data, n);
        size += static_cast<int64_t>(n);
      });
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  EVP_DigestFinal_ex(ctx, md, &n);
  EVP_MD_CTX_free(ctx);
  if (!written.ok()) return written;
  return OutputFileInfo{name, size, Hex(md, n)};
}

std::string LayerFileName(int layer, int rank, int world_size) {
  char buf[96];
  std::snprintf(buf, sizeof(buf), "model-layer%05d-rank%03d-of-%03d.safetensors", layer, rank,
                world_size);
  return buf;
}

absl::StatusOr<std::unique_ptr<FileSetReader>> FileSetReader::Open(
    const std::string& dir, const std::vector<OutputFileInfo>& files) {
  auto reader = std::unique_ptr<FileSetReader>(new FileSetReader());
  for (const OutputFileInfo& f : files) {
    absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file =
        model::SafetensorsFile::Open(dir + "/" + f.name);
    if (!file.ok()) return file.status();
    for (const model::TensorInfo& t : (*file)->header().tensors) {
      reader->where_[t.name] = file->get();
    }
    reader->files_.push_back(*std::move(file));
  }
  return reader;
}

absl::StatusOr<model::TensorView> FileSetReader::Get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" is in no committed file"));
  }
  return it->second->Get(name);
}

void RemoveHiddenCheckpoints(const std::string& dir) {
  bool exists = false;
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(dir, &exists);
  if (!names.ok()) return;
  for (const std::string& n : *names) {
    if (absl::StartsWith(n, "hidden-step")) ::unlink((dir + "/" + n).c_str());
  }
  ::rmdir(dir.c_str());
}

absl::Status CheckOutputLocation(const std::string& model_dir, const std::string& output_dir) {
  auto real = [](const std::string& p) {
    char buf[PATH_MAX];
    return ::realpath(p.c_str(), buf) ? std::string(buf) : p;
  };
  if (real(model_dir) == real(output_dir)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output directory ", output_dir, " is the model directory: choose another directory"));
  }
  struct stat st;
  if (::stat(output_dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("output location ", output_dir, " exists and is not a directory"));
  }
  bool exists = false;
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(output_dir, &exists);
  if (!names.ok()) return names.status();
  std::vector<std::string> foreign;
  for (const std::string& n : *names) {
    if (!IsOutputName(n)) foreign.push_back(n);
  }
  if (!foreign.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("output directory ", output_dir, " holds ", foreign.size(),
                     " file(s) an mq output does not consist of (first: ", foreign.front(),
                     "): choose an empty or new directory"));
  }
  // Writable: create it (and a probe file) now rather than after hours of work.
  absl::Status s = quant::MakeDirs(output_dir);
  if (!s.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create output directory ", output_dir, ": ", s.message()));
  }
  if (::access(output_dir.c_str(), W_OK) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("output directory ", output_dir, " is not writable: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<FinalizeOutput> FinalizeOutputDir(const FinalizeOptions& options) {
  const std::string& out = options.output_dir;
  std::map<std::string, OutputFileInfo> keep;  // name -> described file
  for (const OutputFileInfo& f : options.committed_files) {
    struct stat st;
    const std::string path = out + "/" + f.name;
    if (::stat(path.c_str(), &st) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("committed file ", f.name, " is missing from ", out, " (",
                       std::strerror(errno), "): the output directory was changed outside mq"));
    }
    if (static_cast<int64_t>(st.st_size) != f.size) {
      return absl::FailedPreconditionError(absl::StrCat(
          "committed file ", f.name, " has ", st.st_size, " bytes, ", f.size, " were recorded"));
    }
    keep[f.name] = f;
  }

  // Everything the pipeline did not cover goes to the globals file.
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> reader =
      model::CheckpointReader::Open(options.model_dir);
  if (!reader.ok()) return reader.status();
  std::vector<model::TensorData> globals;
  for (const std::string& n : (*reader)->names()) {
    if (quant::EndsWith(n, model::kScaleInvSuffix)) continue;
    const int layer = quant::LayerOfName(n);
    if (layer >= 0 && layer < options.num_pipeline_layers) continue;
    absl::StatusOr<model::TensorData> d = quant::PlainTensor(**reader, n);
    if (!d.ok()) return d.status();
    globals.push_back(*std::move(d));
  }
  absl::Status s = model::WriteSafetensors(out + "/" + kGlobalsFileName, std::move(globals));
  if (!s.ok()) return s;
  absl::StatusOr<OutputFileInfo> g = DescribeFile(out, kGlobalsFileName);
  if (!g.ok()) return g.status();
  keep[g->name] = *g;

  // Index from the files' own headers.
  std::map<std::string, std::string> weight_map;
  int64_t total_size = 0;
  for (const auto& [name, info] : keep) {
    absl::StatusOr<model::SafetensorsHeader> h = model::ReadSafetensorsHeader(out + "/" + name);
    if (!h.ok()) return h.status();
    for (const model::TensorInfo& t : h->tensors) {
      if (!weight_map.emplace(t.name, name).second) {
        return absl::FailedPreconditionError(
            absl::StrCat("tensor \"", t.name, "\" is in both ", weight_map[t.name], " and ", name));
      }
      total_size += static_cast<int64_t>(t.num_bytes());
    }
  }
  std::vector<std::string> small_files;
  s = model::WriteShardedIndex(out + "/model.safetensors.index.json", total_size, weight_map);
  if (!s.ok()) return s;
  small_files.push_back("model.safetensors.index.json");

  // config.json with the quantization config.
  const std::string config_path = options.model_dir + "/config.json";
  absl::StatusOr<model::DeepseekV3Config> config = model::LoadDeepseekV3Config(config_path);
  if (!config.ok()) return config.status();
  absl::StatusOr<std::string> text = quant::ReadFile(config_path);
  if (!text.ok()) return text.status();
  nlohmann::json raw = nlohmann::json::parse(*text, nullptr, false);
  if (raw.is_discarded() || !raw.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a JSON object"));
  }
  raw["quantization_config"] = quant::QuantizationConfigJson(options.format, *config);
  if (raw.contains("dtype")) raw["dtype"] = "bfloat16";
  raw["torch_dtype"] = "bfloat16";
  s = model::WriteFileAtomic(out + "/config.json", raw.dump(2) + "\n");
  if (!s.ok()) return s;
  small_files.push_back("config.json");
  for (const char* f : kCopiedFiles) {
    absl::StatusOr<std::string> content = quant::ReadFile(options.model_dir + "/" + f);
    if (!content.ok()) continue;
    s = model::WriteFileAtomic(out + "/" + f, *content);
    if (!s.ok()) return s;
    small_files.push_back(f);
  }
  for (const std::string& f : small_files) {
    absl::StatusOr<OutputFileInfo> d = DescribeFile(out, f);
    if (!d.ok()) return d.status();
    keep[f] = *d;
  }

  FinalizeOutput result;
  nlohmann::json files = nlohmann::json::array();
  for (const auto& [name, info] : keep) {
    files.push_back({{"name", name}, {"size", info.size}, {"sha256", info.sha256}});
    ++result.files;
    result.total_bytes += info.size;
  }
  const std::string manifest =
      nlohmann::json{{"format", "mq-manifest-1"}, {"files", files}}.dump(2) + "\n";
  s = model::WriteFileAtomic(out + "/" + kManifestFileName, manifest);
  if (!s.ok()) return s;
  result.manifest_sha256 = Sha256Hex(manifest);

  // Strays: anything an mq output could contain that the manifest does not list.
  bool exists = false;
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(out, &exists);
  if (!names.ok()) return names.status();
  for (const std::string& n : *names) {
    if (keep.count(n) || n == kManifestFileName || !IsOutputName(n)) continue;
    if (::unlink((out + "/" + n).c_str()) != 0 && errno != ENOENT) {
      return Errno(absl::StrCat("remove stray file ", out, "/", n));
    }
    ++result.removed_files;
  }
  const int dfd = ::open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return result;
}

}  // namespace mq::pipeline
