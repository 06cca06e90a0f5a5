// The hidden states' host<->device copies (worker/pipeline/host_transfers.h). On the CPU
// (pipeline_transfers_test): the slab layout of page-locked host tensors; uploads and downloads
// are plain copies. On CUDA
// (pipeline_transfers_gpu_test, label gpu, skips itself without a device): copies on the copy
// stream return the same bytes as synchronous copies while kernels run on the compute stream,
// and the gang pipeline (one rank, bf16, several chunks per layer) writes byte-identical files
// with overlap_transfers on and off. On both: the same files with preload_next_layer on and off
// (the next layer's weights loaded on another thread, on CUDA on a second stream), and a shard
// that shrinks mid-job fails the job with the same error with preload on and off.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/unit/worker/model/engine/engine_test_util.h"
#include "tests/unit/worker/pipeline/pipeline_test_util.h"
#include "worker/model/checkpoint_reader.h"
#include "worker/model/config.h"
#include "worker/model/plan.h"
#include "worker/pipeline/gang_pipeline.h"
#include "worker/pipeline/host_transfers.h"

namespace mq::pipeline {
namespace {

std::vector<std::vector<int64_t>> ShapesOf(const std::vector<at::Tensor>& ts) {
  std::vector<std::vector<int64_t>> shapes;
  for (const at::Tensor& t : ts) shapes.push_back(t.sizes().vec());
  return shapes;
}

// Per chunk: y = (x @ m) * 0.5 + x, computed on `device` between the upload and the download.
std::vector<at::Tensor> RoundTrip(HostTransfers& transfers, const std::vector<at::Tensor>& hosts,
                                  const at::Tensor& m) {
  std::vector<at::Tensor> out = transfers.AllocateHost(ShapesOf(hosts), at::kFloat);
  HostTransfers::Uploads up = transfers.Upload(hosts);
  for (size_t i = 0; i < hosts.size(); ++i) {
    at::Tensor x = up.Next();
    EXPECT_EQ(x.device(), m.device());
    transfers.DownloadInto(at::mm(x, m) * 0.5 + x, out[i]);
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

TEST(PinnedSlabsTest, PackedInOrderIntoPowerOfTwoSlabs) {
  // DeepSeek-V3 at 512 x 4096 on one rank: 128 forward calls of 16,384 tokens, 224 MiB each.
  const int64_t call = int64_t{16384} * 7168 * 2;
  const std::vector<model::PinnedSlab> slabs =
      model::PlanPinnedSlabs(std::vector<int64_t>(128, call));
  ASSERT_EQ(slabs.size(), 15u);
  for (size_t i = 0; i < 14; ++i) {
    EXPECT_EQ(slabs[i].bytes, model::kPinnedSlabBytes);
    EXPECT_EQ(slabs[i].first, static_cast<int64_t>(9 * i));
    EXPECT_EQ(slabs[i].count, 9);
    EXPECT_EQ(slabs[i].offsets[8], 8 * call);
  }
  EXPECT_EQ(slabs[14].bytes, int64_t{512} << 20);
  EXPECT_EQ(slabs[14].count, 2);
  EXPECT_EQ(model::PinnedSlabsBytes(std::vector<int64_t>(128, call)),
            14 * model::kPinnedSlabBytes + (int64_t{512} << 20));
  // Odd sizes start at 4 KiB boundaries; what is left after full slabs takes the next power of
  // two; a tensor larger than a slab gets its own power of two.
  const std::vector<model::PinnedSlab> odd = model::PlanPinnedSlabs({10, 5000, 1});
  ASSERT_EQ(odd.size(), 1u);
  EXPECT_EQ(odd[0].bytes, 16384);
  EXPECT_EQ(odd[0].offsets, (std::vector<int64_t>{0, 4096, 12288}));
  const int64_t big = (int64_t{5} << 30) / 2;  // 2.5 GiB
  const std::vector<model::PinnedSlab> large = model::PlanPinnedSlabs({big, 100});
  ASSERT_EQ(large.size(), 1u);
  EXPECT_EQ(large[0].bytes, int64_t{4} << 30);
  EXPECT_EQ(large[0].count, 2);
  EXPECT_TRUE(model::PlanPinnedSlabs({}).empty());
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
  EXPECT_FALSE(got[0].is_pinned());
  // An empty sequence, and a sequence dropped before its end, are fine.
  HostTransfers::Uploads none = transfers.Upload({});
  HostTransfers::Uploads part = transfers.Upload(hosts);
  EXPECT_TRUE(at::equal(part.Next(), hosts[0]));
}

// The files of every step, by name -> SHA-256, and which steps' weights were preloaded.
struct PipelineRun {
  std::map<std::string, std::string> files;
  std::vector<bool> preloaded;
  std::vector<StepStats> stats;
};

// bf16, 8 sequences of 24 tokens in 4 chunks per layer.
GangPipelineOptions TransfersOptions(const std::string& model, const std::string& out) {
  GangPipelineOptions o =
      testing::PipelineOptions(model, out, testing::RandomSamples(8, 24, 256, 7));
  o.dtype = at::kBFloat16;
  o.max_batch_tokens = 48;
  return o;
}

PipelineRun RunPipeline(
    const std::string& model, const std::string& out, at::Device device, bool overlap, bool preload,
    GangPipelineOptions::Staging staging = GangPipelineOptions::Staging::kAuto) {
  GangPipelineOptions o = TransfersOptions(model, out);
  o.device = device;
  o.overlap_transfers = overlap;
  o.preload_next_layer = preload;
  o.stage_next_layer = staging;
  PipelineRun run;
  o.on_step = [&](const StepOutput& s) -> absl::Status {
    for (const OutputFileInfo& f : s.files) run.files[f.name] = f.sha256;
    run.preloaded.push_back(s.stats.preloaded);
    run.stats.push_back(s.stats);
    return absl::OkStatus();
  };
  std::vector<std::string> warnings;
  o.on_warning = [&](const std::string& w) { warnings.push_back(w); };
  absl::StatusOr<GangPipelineResult> r = RunGangPipeline(o);
  EXPECT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(warnings.empty()) << warnings.front();
  return run;
}

// Three layers (one dense), 2 shards unless `extra` says otherwise.
std::string TransfersModel(const std::string& name = "transfers",
                           const std::vector<std::string>& extra = {}) {
  std::vector<std::string> flags = {"--layers 3",         "--dense-layers 1",      "--hidden 128",
                                    "--intermediate 192", "--moe-intermediate 64", "--heads 2",
                                    "--vocab 256"};
  flags.insert(flags.end(), extra.begin(), extra.end());
  return model::testing::GenerateModel(name, flags);
}

// With preload_next_layer the weights of every step after the first were loaded while the step
// before solved (on another thread; on CUDA on a second stream), and the files are the same.
void ExpectPreloadChangesNothing(at::Device device) {
  const std::string model = TransfersModel();
  ASSERT_FALSE(model.empty());
  const std::string tag = device.is_cuda() ? "cuda" : "cpu";
  const PipelineRun with = RunPipeline(model, model + "/out-preload-" + tag, device, true, true);
  const PipelineRun without = RunPipeline(model, model + "/out-plain-" + tag, device, true, false);
  EXPECT_FALSE(with.files.empty());
  EXPECT_EQ(with.files, without.files);
  EXPECT_EQ(with.preloaded, std::vector<bool>({false, true, true}));
  EXPECT_EQ(without.preloaded, std::vector<bool>({false, false, false}));
  // Each step's GPU memory peaks come from torch's caching allocator on CUDA; the CPU has none.
  for (const PipelineRun* run : {&with, &without}) {
    ASSERT_EQ(run->stats.size(), 3u);
    for (size_t step = 0; step < run->stats.size(); ++step) {
      const StepStats& st = run->stats[step];
      if (device.is_cuda()) {
        EXPECT_GT(st.device_peak_allocated_bytes, 0) << "step " << step;
        EXPECT_GE(st.device_peak_reserved_bytes, st.device_peak_allocated_bytes);
        EXPECT_GE(st.device_alloc_retries, 0);
      } else {
        EXPECT_EQ(st.device_peak_allocated_bytes, 0);
        EXPECT_EQ(st.device_peak_reserved_bytes, 0);
        EXPECT_EQ(st.device_alloc_retries, 0);
      }
    }
  }
}

TEST(PreloadTest, GangPipelineWritesTheSameFilesWithAndWithoutPreload) {
  ExpectPreloadChangesNothing(at::kCPU);
}

// The shard of the model's last layer shrinks to half its size once the first step is reported
// (overlap_writes off: before the second step starts). With preload on, the second step's preload
// of that layer reads the lost part (zeros in place of the missing pages, mapping_guard.h) and
// fails, which is one warning; the last step loads the layer again and fails the job naming the
// damaged tensor, with the same error as without preload. No files of the last step are reported.
struct ShrunkRun {
  absl::Status status;
  std::string error;  // the status message, the model's directory replaced by MODEL
  std::vector<std::string> warnings;
  std::vector<int> reported;
  std::vector<bool> preloaded;
};

ShrunkRun RunWithShrinkingLastShard(
    bool preload, GangPipelineOptions::Staging staging = GangPipelineOptions::Staging::kAuto,
    int shrink_after_step = 0) {
  ShrunkRun run;
  const std::string model = TransfersModel(
      absl::StrCat("shrink-", preload ? "preload" : "plain", "-",
                   staging == GangPipelineOptions::Staging::kOn ? "staged" : "", shrink_after_step),
      {"--shards 5"});
  if (model.empty()) return run;
  // Shards hold whole units in order (embed, layers 0..2, head): layer 2 is alone in shard 4.
  const std::string shard = model + "/model-00004-of-00005.safetensors";
  struct stat st {};
  if (::stat(shard.c_str(), &st) != 0) {
    ADD_FAILURE() << shard << " missing";
    return run;
  }
  GangPipelineOptions o = TransfersOptions(model, model + "/out");
  o.overlap_writes = false;
  o.preload_next_layer = preload;
  o.stage_next_layer = staging;
  o.on_step = [&](const StepOutput& s) -> absl::Status {
    run.reported.push_back(s.step);
    run.preloaded.push_back(s.stats.preloaded);
    if (s.step == shrink_after_step && ::truncate(shard.c_str(), st.st_size / 2) != 0) {
      ADD_FAILURE() << "truncate " << shard;
    }
    return absl::OkStatus();
  };
  o.on_warning = [&](const std::string& w) { run.warnings.push_back(w); };
  absl::StatusOr<GangPipelineResult> r = RunGangPipeline(o);
  run.status = r.status();
  run.error = std::string(run.status.message());
  for (size_t at = run.error.find(model); at != std::string::npos; at = run.error.find(model)) {
    run.error.replace(at, model.size(), "MODEL");
  }
  return run;
}

TEST(PreloadTest, AShardThatShrinksMidJobFailsItAsWithoutPreload) {
  const ShrunkRun with = RunWithShrinkingLastShard(true);
  const ShrunkRun without = RunWithShrinkingLastShard(false);
  ASSERT_FALSE(with.status.ok());
  ASSERT_FALSE(without.status.ok());
  EXPECT_NE(without.error.find("model.layers.2."), std::string::npos) << without.error;
  EXPECT_NE(without.error.find("MODEL/model-00004-of-00005.safetensors: file is "),
            std::string::npos)
      << without.error;
  EXPECT_EQ(with.status.code(), without.status.code());
  EXPECT_EQ(with.error, without.error);
  EXPECT_EQ(with.reported, std::vector<int>({0, 1}));
  EXPECT_EQ(without.reported, std::vector<int>({0, 1}));
  EXPECT_EQ(with.preloaded, std::vector<bool>({false, true}));
  ASSERT_EQ(with.warnings.size(), 1u) << ::testing::PrintToString(with.warnings);
  EXPECT_NE(with.warnings[0].find("preloading layer 2 failed ("), std::string::npos)
      << with.warnings[0];
  EXPECT_NE(with.warnings[0].find("): loading it now"), std::string::npos) << with.warnings[0];
  EXPECT_TRUE(without.warnings.empty()) << ::testing::PrintToString(without.warnings);
}

// With the next layer staged (on the CPU only when asked; layer_staging.h), every step after the
// first loads its layer from the staged copies, all of its checkpoint bytes, and the files are
// the same as without.
TEST(StagingTest, GangPipelineWritesTheSameFilesWithAndWithoutStaging) {
  const std::string model = TransfersModel("staging");
  ASSERT_FALSE(model.empty());
  using S = GangPipelineOptions::Staging;
  const PipelineRun on = RunPipeline(model, model + "/out-on", at::kCPU, true, false, S::kOn);
  const PipelineRun off = RunPipeline(model, model + "/out-off", at::kCPU, true, false, S::kOff);
  const PipelineRun cpu = RunPipeline(model, model + "/out-auto", at::kCPU, true, false);
  EXPECT_FALSE(on.files.empty());
  EXPECT_EQ(on.files, off.files);
  EXPECT_EQ(cpu.files, off.files);
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> reader =
      model::CheckpointReader::Open(model);
  ASSERT_TRUE(reader.ok()) << reader.status();
  ASSERT_EQ(on.stats.size(), 3u);
  for (int layer = 0; layer < 3; ++layer) {
    const std::string prefix = absl::StrCat("model.layers.", layer, ".");
    int64_t bytes = 0;
    for (const std::string& n : (*reader)->names()) {
      if (n.rfind(prefix, 0) == 0) bytes += static_cast<int64_t>((*reader)->Get(n)->num_bytes);
    }
    EXPECT_EQ(on.stats[layer].staged_bytes, layer == 0 ? 0 : bytes) << "layer " << layer;
    EXPECT_EQ(off.stats[layer].staged_bytes, 0) << "layer " << layer;
    EXPECT_EQ(cpu.stats[layer].staged_bytes, 0) << "layer " << layer;  // auto: CUDA only
  }
  // The preload loads the next layer itself: nothing is staged then.
  const PipelineRun preload = RunPipeline(model, model + "/out-pre", at::kCPU, true, true, S::kOn);
  EXPECT_EQ(preload.files, off.files);
  for (const StepStats& st : preload.stats) EXPECT_EQ(st.staged_bytes, 0);
}

// A shard that shrinks before its layer is staged fails the job as without staging (the lost
// tensors are not staged; their load reports them). One that shrinks while or after its layer
// is staged (when the step before is reported) fails it with DATA_LOSS naming the file too:
// copies made before the shrink are intact, and the load of a lost tensor, or the write reading
// the layer's unquantized tensors from the file again, reports the lost part.
TEST(StagingTest, AShardThatShrinksMidJobFailsItWithStagingToo) {
  using S = GangPipelineOptions::Staging;
  const ShrunkRun before = RunWithShrinkingLastShard(false, S::kOn, 0);
  const ShrunkRun without = RunWithShrinkingLastShard(false, S::kOff, 0);
  ASSERT_FALSE(before.status.ok());
  EXPECT_EQ(before.status.code(), without.status.code());
  EXPECT_EQ(before.error, without.error);
  EXPECT_EQ(before.reported, std::vector<int>({0, 1}));
  EXPECT_TRUE(before.warnings.empty()) << ::testing::PrintToString(before.warnings);
  const ShrunkRun after = RunWithShrinkingLastShard(false, S::kOn, 1);
  ASSERT_FALSE(after.status.ok());
  EXPECT_EQ(after.status.code(), absl::StatusCode::kDataLoss) << after.status;
  EXPECT_NE(after.error.find("MODEL/model-00004-of-00005.safetensors"), std::string::npos)
      << after.error;
  EXPECT_EQ(after.reported, std::vector<int>({0, 1}));
}

// With all-linear targets the shared experts' linears are solved with the Hessians of their
// calibration inputs (the MoE steps have no fallback to RTN); with routed experts only their
// inputs are not collected at all, and those steps still solve every expert with tokens.
TEST(SharedExpertsTest, SolvedWithHessiansOnlyWhereTargeted) {
  const std::string model = TransfersModel();
  ASSERT_FALSE(model.empty());
  for (bool all : {true, false}) {
    SCOPED_TRACE(all ? "all-linear" : "routed experts");
    GangPipelineOptions o = testing::PipelineOptions(
        model, model + (all ? "/out-all" : "/out-routed"), testing::RandomSamples(8, 24, 256, 7));
    ASSERT_EQ(o.total_steps, 3);
    if (all) o.format.targets = quant::TargetSet::kAllLinear;
    std::vector<StepStats> stats;
    o.on_step = [&](const StepOutput& s) -> absl::Status {
      stats.push_back(s.stats);
      return absl::OkStatus();
    };
    absl::StatusOr<GangPipelineResult> r = RunGangPipeline(o);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(stats.size(), 3u);
    for (size_t step = 1; step < stats.size(); ++step) {  // the MoE steps
      EXPECT_GT(stats[step].quantized_linears, 0) << step;
      EXPECT_EQ(stats[step].fallbacks, 0) << step;
      EXPECT_GT(stats[step].hessian_seconds, 0) << step;
    }
    if (all) {
      EXPECT_GT(stats[1].quantized_linears, 4 * 3 + 3) << "attention and shared experts too";
    }
  }
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
  std::vector<at::Tensor> back =
      overlapped.AllocateHost(ShapesOf({hosts[0], hosts[0]}), at::kFloat);
  HostTransfers::Uploads up = overlapped.Upload({hosts[0]});
  overlapped.DownloadInto(up.Next() * 3, back[0]);
  HostTransfers::Uploads again = overlapped.Upload({back[0]});
  overlapped.DownloadInto(again.Next() + 1, back[1]);
  overlapped.Wait();
  EXPECT_TRUE(at::equal(back[1], hosts[0].cuda().mul(3).add(1).cpu()));
}

TEST(HostTransfersTest, CudaHostTensorsArePageLockedSlabs) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  // 5 tensors of 56 MiB (4,096 tokens of DeepSeek-V3's hidden width): views into one page-locked
  // slab of 512 MiB (PlanPinnedSlabs), each writable on its own.
  HostTransfers transfers(at::kCUDA, true);
  const std::vector<std::vector<int64_t>> shapes(5, std::vector<int64_t>{4, 1024, 7168});
  std::vector<at::Tensor> hosts = transfers.AllocateHost(shapes, at::kBFloat16);
  ASSERT_EQ(hosts.size(), 5u);
  for (size_t i = 0; i < hosts.size(); ++i) {
    EXPECT_TRUE(hosts[i].is_pinned());
    EXPECT_TRUE(hosts[i].is_contiguous());
    EXPECT_EQ(hosts[i].sizes().vec(), shapes[i]);
    hosts[i].fill_(static_cast<double>(i));
  }
  for (size_t i = 0; i < hosts.size(); ++i) {
    EXPECT_EQ(hosts[i].min().item<double>(), static_cast<double>(i));
    EXPECT_EQ(hosts[i].max().item<double>(), static_cast<double>(i));
  }
}

TEST(HostTransfersTest, GangPipelineWritesTheSameFilesWithAndWithoutOverlap) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const std::string model = TransfersModel();
  ASSERT_FALSE(model.empty());
  const at::Device cuda(at::kCUDA, 0);
  const PipelineRun with = RunPipeline(model, model + "/out-on", cuda, true, false);
  const PipelineRun without = RunPipeline(model, model + "/out-off", cuda, false, false);
  EXPECT_FALSE(with.files.empty());
  EXPECT_EQ(with.files, without.files);
}

TEST(PreloadTest, CudaGangPipelineWritesTheSameFilesWithAndWithoutPreload) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  ExpectPreloadChangesNothing(at::Device(at::kCUDA, 0));
}
#endif

}  // namespace
}  // namespace mq::pipeline
