// mq-bench-checkpoint: what a hidden-state checkpoint costs on this machine's disk. Builds
// CHUNKS chunks of TOKENS x HIDDEN bf16 values in memory (default 128 x 16384 x 7168: the 30 GB
// of DeepSeek-V3 at 512 x 4096 on one rank, in the pipeline's chunks of 4 sequences), then times
//   hash, one thread    one SHA-256 over all chunks (how checkpoints were checksummed before)
//   checkpoint write    WriteHiddenCheckpoint: per-chunk SHA-256 on several threads, write, fsync,
//                       rename (what the pipeline's write thread does at a checkpoint step)
//   checkpoint open     OpenHiddenCheckpoint after posix_fadvise DONTNEED (a resume's read and
//                       check, from the disk)
//   plain write         the same bytes through WriteSafetensors without checksums (the disk alone)
// and what a layer file of DeepSeek-V3's size (the first chunks that make >= 5.8 GB: a layer's
// packed experts on one rank) costs the write thread:
//   layer write         WriteDescribedSafetensors with read-back ranges (whole-file SHA-256 on
//                       one thread, the ranges' on others, while the file is written and fsynced)
//   read back, ranges   ReadBackCommitted with those ranges (several threads, from the disk)
//   read back, whole    ReadBackCommitted without them (one SHA-256 over the file, from the disk)
// One file on disk at a time (DIR needs CHUNKS x TOKENS x HIDDEN x 2 bytes free).
//
// usage: mq-bench-checkpoint DIR [CHUNKS=128] [TOKENS=16384] [HIDDEN=7168]
#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "worker/model/safetensors_writer.h"
#include "worker/model/tensor_io.h"
#include "worker/pipeline/output.h"

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<mq::model::TensorData> Views(const std::vector<at::Tensor>& chunks) {
  std::vector<mq::model::TensorData> views;
  for (size_t i = 0; i < chunks.size(); ++i) {
    views.push_back(mq::model::ToTensorDataView(absl::StrCat("chunk.", i), chunks[i]));
  }
  return views;
}

void Report(const char* what, double seconds, double bytes) {
  std::printf("%-20s %8.2f s  %6.2f GB/s\n", what, seconds, bytes / seconds / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: mq-bench-checkpoint DIR [CHUNKS=128] [TOKENS=16384] [HIDDEN=7168]\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t n = argc > 2 ? std::atoll(argv[2]) : 128;
  const int64_t tokens = argc > 3 ? std::atoll(argv[3]) : 16384;
  const int64_t hidden = argc > 4 ? std::atoll(argv[4]) : 7168;
  if (n <= 0 || tokens <= 0 || hidden <= 0) {
    std::fprintf(stderr, "CHUNKS, TOKENS and HIDDEN must be positive\n");
    return 2;
  }
  std::vector<at::Tensor> chunks;
  for (int64_t i = 0; i < n; ++i) {
    chunks.push_back(at::full({tokens, hidden}, static_cast<double>(i % 97) / 7, at::kBFloat16));
    chunks.back()[i % tokens][0].fill_(-1.0 * static_cast<double>(i));  // no two chunks alike
  }
  const double bytes = static_cast<double>(n * tokens * hidden * 2);
  std::printf("%lld chunks of %lld x %lld bf16: %.2f GB in %s\n", static_cast<long long>(n),
              static_cast<long long>(tokens), static_cast<long long>(hidden), bytes / 1e9,
              dir.c_str());

  double t = Now();
  mq::Sha256 whole;
  for (const at::Tensor& c : chunks) whole.Update(c.data_ptr(), c.nbytes());
  whole.HexDigest();
  Report("hash, one thread", Now() - t, bytes);

  const std::string path = dir + "/mq-bench-checkpoint.safetensors";
  t = Now();
  absl::Status s = mq::pipeline::WriteHiddenCheckpoint(path, Views(chunks));
  if (!s.ok()) {
    std::fprintf(stderr, "checkpoint write: %s\n", s.ToString().c_str());
    return 1;
  }
  Report("checkpoint write", Now() - t, bytes);

  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
  t = Now();
  {
    auto file = mq::pipeline::OpenHiddenCheckpoint(path, chunks.size());
    if (!file.ok()) {
      std::fprintf(stderr, "checkpoint open: %s\n", file.status().ToString().c_str());
      return 1;
    }
  }
  Report("checkpoint open", Now() - t, bytes);
  ::unlink(path.c_str());

  t = Now();
  s = mq::model::WriteSafetensors(path, Views(chunks));
  if (!s.ok()) {
    std::fprintf(stderr, "plain write: %s\n", s.ToString().c_str());
    return 1;
  }
  Report("plain write", Now() - t, bytes);
  ::unlink(path.c_str());

  std::vector<at::Tensor> layer;
  double layer_bytes = 0;
  for (size_t i = 0; i < chunks.size() && layer_bytes < 5.8e9; ++i) {
    layer.push_back(chunks[i]);
    layer_bytes += static_cast<double>(chunks[i].nbytes());
  }
  mq::pipeline::ReadBackRanges ranges;
  t = Now();
  absl::StatusOr<mq::pipeline::OutputFileInfo> info = mq::pipeline::WriteDescribedSafetensors(
      dir, "mq-bench-layer.safetensors", Views(layer), &ranges);
  if (!info.ok()) {
    std::fprintf(stderr, "layer write: %s\n", info.status().ToString().c_str());
    return 1;
  }
  Report("layer write", Now() - t, layer_bytes);
  t = Now();
  s = mq::pipeline::ReadBackCommitted(dir, &*info, &ranges);
  Report("read back, ranges", Now() - t, layer_bytes);
  t = Now();
  if (s.ok()) s = mq::pipeline::ReadBackCommitted(dir, &*info);
  Report("read back, whole", Now() - t, layer_bytes);
  ::unlink((dir + "/" + info->name).c_str());
  if (!s.ok()) {
    std::fprintf(stderr, "read back: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
