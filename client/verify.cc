#include "client/verify.h"

#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "client/table.h"
#include "common/s3/s3_client.h"
#include "common/s3/s3_config.h"
#include "common/sha256.h"

namespace mq::client {
namespace {

constexpr char kManifest[] = "manifest.json";
constexpr char kMarker[] = ".mq-job";

// The entries of manifest `text`, for a local directory and an s3:// prefix alike, in order:
// `check` gets each well-formed one (name, size, sha256), a malformed one adds a problem instead.
// Sets the report's manifest_sha256, files and total_bytes and adds every listed name to
// `listed`. False (with the problem) when `text` is not an mq manifest.
bool ParseManifest(
    const std::string& text, VerifyReport& report, std::set<std::string>* listed,
    const std::function<void(const std::string&, int64_t, const std::string&)>& check) {
  report.manifest_sha256 = Sha256Hex(text);
  nlohmann::json m = nlohmann::json::parse(text, nullptr, false);
  if (m.is_discarded() || !m.is_object() || !m.contains("files") || !m["files"].is_array()) {
    report.problems.push_back(
        absl::StrCat(kManifest, ": not an mq manifest (a JSON object with a \"files\" array)"));
    return false;
  }
  for (const nlohmann::json& f : m["files"]) {
    if (!f.is_object() || !f.contains("name") || !f["name"].is_string() || !f.contains("size") ||
        !f["size"].is_number_integer() || !f.contains("sha256") || !f["sha256"].is_string()) {
      report.problems.push_back(
          absl::StrCat(kManifest, ": entry ", f.dump(), " lacks a name, size or sha256"));
      continue;
    }
    const std::string name = f["name"].get<std::string>();
    const int64_t size = f["size"].get<int64_t>();
    listed->insert(name);
    ++report.files;
    report.total_bytes += size;
    check(name, size, f["sha256"].get<std::string>());
  }
  return true;
}

}  // namespace

VerifyReport VerifyOutput(const std::string& output_dir) {
  VerifyReport report;
  const std::string manifest_path = output_dir + "/" + kManifest;
  std::ifstream in(manifest_path, std::ios::binary);
  if (!in) {
    report.problems.push_back(
        absl::StrCat(kManifest, ": missing from ", output_dir, " (not a finished mq output)"));
    return report;
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::set<std::string> listed;
  auto check = [&](const std::string& name, int64_t size, const std::string& sha) {
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
      report.problems.push_back(absl::StrCat(kManifest, ": file name \"", name,
                                             "\" is not a name inside the output directory"));
      return;
    }
    const std::string path = output_dir + "/" + name;
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      report.problems.push_back(absl::StrCat(name, ": missing (listed with ", size, " bytes)"));
      return;
    }
    if (static_cast<int64_t>(st.st_size) != size) {
      report.problems.push_back(
          absl::StrCat(name, ": ", st.st_size, " bytes, the manifest lists ", size));
      return;
    }
    absl::StatusOr<std::string> actual = Sha256OfFile(path);
    if (!actual.ok()) {
      report.problems.push_back(
          absl::StrCat(name, ": cannot be read: ", actual.status().message()));
    } else if (*actual != sha) {
      report.problems.push_back(
          absl::StrCat(name, ": SHA-256 ", *actual, " differs from the manifest's ", sha));
    }
  };
  if (!ParseManifest(buffer.str(), report, &listed, check)) return report;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(output_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name == kManifest || name == kMarker || listed.count(name)) continue;
    report.problems.push_back(absl::StrCat(name, ": not listed in ", kManifest));
  }
  if (ec) {
    report.problems.push_back(
        absl::StrCat(output_dir, ": cannot list the directory: ", ec.message()));
  }
  return report;
}

VerifyReport VerifyS3Output(const std::string& uri) {
  VerifyReport report;
  absl::StatusOr<s3::S3Uri> u = s3::ParseS3Uri("OUTPUT", uri);
  if (!u.ok()) {
    report.problems.push_back(std::string(u.status().message()));
    return report;
  }
  absl::StatusOr<s3::S3Config> config = s3::S3ConfigFromEnv(s3::ProcessEnv());
  if (!config.ok()) {
    report.problems.push_back(absl::StrCat("S3 settings: ", config.status().message()));
    return report;
  }
  s3::S3Client client(*std::move(config));
  const std::string prefix = u->key.empty() ? "" : u->key + "/";
  absl::StatusOr<std::string> text = client.GetObject(u->bucket, prefix + kManifest, 1ull << 30);
  if (!text.ok()) {
    report.problems.push_back(absl::StrCat(kManifest, ": ", text.status().message(),
                                           absl::IsNotFound(text.status())
                                               ? " (not a finished mq output)"
                                               : ""));
    return report;
  }
  std::set<std::string> listed;
  constexpr uint64_t kChunk = 64ull << 20;
  std::string buffer;
  auto check = [&](const std::string& name, int64_t size, const std::string& sha) {
    absl::StatusOr<s3::ObjectInfo> info = client.Head(u->bucket, prefix + name);
    if (!info.ok()) {
      report.problems.push_back(absl::StrCat(
          name, absl::IsNotFound(info.status()) ? ": missing (listed with " : ": cannot be read (",
          absl::IsNotFound(info.status()) ? absl::StrCat(size, " bytes)")
                                          : absl::StrCat(info.status().message(), ")")));
      return;
    }
    if (static_cast<int64_t>(info->size) != size) {
      report.problems.push_back(
          absl::StrCat(name, ": ", info->size, " bytes, the manifest lists ", size));
      return;
    }
    Sha256 hash;
    absl::Status read;
    for (uint64_t off = 0; off < info->size && read.ok(); off += kChunk) {
      const uint64_t n = std::min(kChunk, info->size - off);
      buffer.resize(n);
      read = client.GetRange(u->bucket, prefix + name, off, n,
                             reinterpret_cast<uint8_t*>(buffer.data()));
      hash.Update(buffer.data(), n);
    }
    if (!read.ok()) {
      report.problems.push_back(absl::StrCat(name, ": cannot be read: ", read.message()));
      return;
    }
    const std::string actual = hash.HexDigest();
    if (actual != sha) {
      report.problems.push_back(
          absl::StrCat(name, ": SHA-256 ", actual, " differs from the manifest's ", sha));
    }
  };
  if (!ParseManifest(*text, report, &listed, check)) return report;
  absl::StatusOr<std::vector<s3::ListedObject>> objects = client.ListObjects(u->bucket, prefix);
  if (!objects.ok()) {
    report.problems.push_back(absl::StrCat(uri, ": cannot list: ", objects.status().message()));
    return report;
  }
  for (const s3::ListedObject& o : *objects) {
    const std::string name = o.key.substr(prefix.size());
    if (name == kManifest || name == kMarker || listed.count(name)) continue;
    report.problems.push_back(absl::StrCat(name, ": not listed in ", kManifest));
  }
  absl::StatusOr<std::vector<s3::MultipartUpload>> open =
      client.ListMultipartUploads(u->bucket, prefix);
  if (open.ok() && !open->empty()) {
    report.problems.push_back(absl::StrCat(open->size(), " incomplete multipart upload(s) under ",
                                           uri, " (first: ", (*open)[0].key, ")"));
  }
  return report;
}

int VerifyCommand(int argc, char** argv, int first) {
  std::string dir;
  bool json = false;
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << "usage: mq-client verify OUTPUT_DIR|s3://BUCKET/PREFIX [--json]\n"
                   "  re-hashes every file manifest.json lists (size and SHA-256) and reports\n"
                   "  missing, different and unlisted files; needs no coordinator. For s3://,\n"
                   "  the store and credentials come from MQ_S3_ENDPOINT, AWS_REGION and the\n"
                   "  AWS credential variables or files (also reports incomplete uploads)\n";
      return 0;
    }
    if (a == "--json") {
      json = true;
    } else if (a == "--coordinator" || a == "--timeout") {
      ++i;  // global options are accepted after the command and ignored here
    } else if (a.rfind("--coordinator=", 0) == 0 || a.rfind("--timeout=", 0) == 0) {
    } else if (a.rfind("--", 0) == 0) {
      std::fprintf(stderr, "mq-client: verify: unknown option %s\n", a.c_str());
      return 2;
    } else if (dir.empty()) {
      dir = a;
    } else {
      std::fprintf(stderr, "mq-client: verify takes one OUTPUT_DIR (got %s and %s)\n", dir.c_str(),
                   a.c_str());
      return 2;
    }
  }
  if (dir.empty()) {
    std::fprintf(stderr, "usage: mq-client verify OUTPUT_DIR [--json]\n");
    return 2;
  }
  if (dir.rfind("file://", 0) == 0) dir = dir.substr(7);
  const VerifyReport r = s3::IsS3Uri(dir) ? VerifyS3Output(dir) : VerifyOutput(dir);
  if (json) {
    nlohmann::json out = {{"output", dir},
                          {"ok", r.problems.empty()},
                          {"files", r.files},
                          {"total_bytes", r.total_bytes},
                          {"manifest_sha256", r.manifest_sha256},
                          {"problems", r.problems}};
    std::cout << out.dump(2) << "\n";
    return r.problems.empty() ? 0 : 1;
  }
  if (!r.problems.empty()) {
    for (const std::string& p : r.problems) {
      std::fprintf(stderr, "mq-client: verify: %s\n", p.c_str());
    }
    std::fprintf(stderr, "mq-client: verify: %s does not match its manifest (%zu problem%s)\n",
                 dir.c_str(), r.problems.size(), r.problems.size() == 1 ? "" : "s");
    return 1;
  }
  std::printf("%s: %d files, %s, every size and SHA-256 matches manifest.json (sha256 %s)\n",
              dir.c_str(), r.files, Bytes(r.total_bytes).c_str(), r.manifest_sha256.c_str());
  return 0;
}

}  // namespace mq::client
