// The hidden states' host<->device copies (worker/pipeline/host_transfers.h). On the CPU
// (pipeline_transfers_test): uploads and downloads are plain copies. On CUDA
// (pipeline_transfers_gpu_test, label gpu, skips itself without a device): copies on the copy
// stream return the same bytes as synchronous copies while kernels run on the compute stream,
// and the gang pipeline (one rank, bf16, several chunks per layer) writes byte-identical files
// with overlap_transfers on and off.
#include "worker/pipeline/host_transfers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <string>
#include <vector>

#include "tests/unit/worker/model/engine/engine_test_util.h"
#include "worker/model/config.h"
#include "worker/pipeline/gang_pipeline.h"

namespace mq::pipeline {
namespace {

// Per chunk: y = (x @ m) * 0.5 + x, computed on `device` between the upload and the download.
std::vector<at::Tensor> RoundTrip(HostTransfers& transfers, const std::vector<at::Tensor>& hosts,
                                  const at::Tensor& m) {
  std::vector<at::Tensor> out;
  HostTransfers::Uploads up = transfers.Upload(hosts);
  for (size_t i = 0; i < hosts.size(); ++i) {
    at::Tensor x = up.Next();
    EXPECT_EQ(x.device(), m.device());
    out.push_back(transfers.Download(at::mm(x, m) * 0.5 + x));
  }
  transfers.Wait();
  return out;
}

std::vector<at::Tensor> Chunks(int n, int64_t rows, int64_t cols, bool pinned) {
  std::vector<at::Tensor> hosts;
  at::manual_seed(11);
  for (int i = 0; i < n; ++i) {
    at::Tensor t = at::randn({rows, cols});
    hosts.push_back(pinned ? t.pin_memory() : t);
  }
  return hosts;
}

TEST(HostTransfersTest, OnTheCpuUploadsAndDownloadsArePlainCopies) {
  HostTransfers transfers(at::kCPU, /*overlap=*/true);
  EXPECT_FALSE(transfers.overlapping());
  const std::vector<at::Tensor> hosts = Chunks(5, 16, 8, false);
  const at::Tensor m = at::randn({8, 8});
  const std::vector<at::Tensor> got = RoundTrip(transfers, hosts, m);
  ASSERT_EQ(got.size(), hosts.size());
  for (size_t i = 0; i < hosts.size(); ++i) {
    EXPECT_TRUE(got[i].device().is_cpu());
    EXPECT_TRUE(at::equal(got[i], at::mm(hosts[i], m) * 0.5 + hosts[i])) << i;
  }
  // An empty sequence, and a sequence dropped before its end, are fine.
  HostTransfers::Uploads none = transfers.Upload({});
  HostTransfers::Uploads part = transfers.Upload(hosts);
  EXPECT_TRUE(at::equal(part.Next(), hosts[0]));
}

#if MQ_TRANSFERS_GPU
TEST(HostTransfersTest, CudaCopiesOnTheCopyStreamEqualSynchronousCopies) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  // 48 chunks of 4096 x 2048 fp32 (32 MiB each) and a GEMM per chunk: copies and kernels of
  // comparable length, so the copy stream really runs beside the compute stream.
  const std::vector<at::Tensor> hosts = Chunks(48, 4096, 2048, true);
  const at::Tensor m = at::randn({2048, 2048}, at::TensorOptions().device(at::kCUDA)) * 0.02;
  HostTransfers overlapped(at::kCUDA, true), plain(at::kCUDA, false);
  EXPECT_TRUE(overlapped.overlapping());
  EXPECT_FALSE(plain.overlapping());
  const std::vector<at::Tensor> want = RoundTrip(plain, hosts, m);
  for (int repeat = 0; repeat < 3; ++repeat) {
    const std::vector<at::Tensor> got = RoundTrip(overlapped, hosts, m);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(got[i].is_pinned());
      EXPECT_TRUE(at::equal(got[i], want[i])) << "repeat " << repeat << " chunk " << i;
    }
  }
  // A downloaded tensor uploaded again without a Wait in between: the copy stream orders them.
  HostTransfers::Uploads up = overlapped.Upload({hosts[0]});
  const at::Tensor back = overlapped.Download(up.Next() * 3);
  HostTransfers::Uploads again = overlapped.Upload({back});
  const at::Tensor twice = overlapped.Download(again.Next() + 1);
  overlapped.Wait();
  EXPECT_TRUE(at::equal(twice, hosts[0].cuda().mul(3).add(1).cpu()));
}

// The files of every step, by name -> SHA-256.
std::map<std::string, std::string> RunPipeline(const std::string& model, const std::string& out,
                                               bool overlap) {
  absl::StatusOr<model::DeepseekV3Config> config =
      model::LoadDeepseekV3Config(model + "/config.json");
  EXPECT_TRUE(config.ok()) << config.status();
  GangPipelineOptions o;
  o.model_dir = model;
  o.output_dir = out;
  o.scratch_dir = out + "-scratch";
  o.format.group_size = 32;
  o.total_steps = static_cast<int>(PipelineLayers(*config, o.format).size());
  o.device = at::Device(at::kCUDA, 0);
  o.dtype = at::kBFloat16;
  o.max_batch_tokens = 48;  // 8 sequences of 24 tokens: 4 chunks per layer
  o.overlap_transfers = overlap;
  std::mt19937 rng(7);
  for (int i = 0; i < 8; ++i) {
    std::vector<int32_t> s(24);
    for (int32_t& t : s) t = static_cast<int32_t>(rng() % 256);
    o.samples.push_back(s);
  }
  std::map<std::string, std::string> files;
  o.on_step = [&](const StepOutput& s) -> absl::Status {
    for (const OutputFileInfo& f : s.files) files[f.name] = f.sha256;
    return absl::OkStatus();
  };
  absl::StatusOr<GangPipelineResult> r = RunGangPipeline(o);
  EXPECT_TRUE(r.ok()) << r.status();
  return files;
}

TEST(HostTransfersTest, GangPipelineWritesTheSameFilesWithAndWithoutOverlap) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const std::string model = model::testing::GenerateModel(
      "transfers", {"--layers 3", "--dense-layers 1", "--hidden 128", "--intermediate 192",
                    "--moe-intermediate 64", "--heads 2", "--vocab 256"});
  ASSERT_FALSE(model.empty());
  const std::map<std::string, std::string> with = RunPipeline(model, model + "/out-on", true);
  const std::map<std::string, std::string> without =
      RunPipeline(model, model + "/out-off", false);
  EXPECT_FALSE(with.empty());
  EXPECT_EQ(with, without);
}
#endif

}  // namespace
}  // namespace mq::pipeline
