// CompareModels (worker/eval/compare.h) and the engine's reading of compressed-tensors
// checkpoints, on a generated FP8 model and its RTN W4A16 output (worker/quant's
// QuantizeLocal): the packed experts load as the quantizer's dequantized weights, ignored
// modules as stored; a model against itself is exact; the W4A16 output differs from layer 1 on
// (layer 0 is dense and not quantized); differing architectures are refused by field; the
// quantizer refuses an already-quantized input.
#include "worker/eval/compare.h"

#include <ATen/ATen.h>
#include <stdlib.h>

#include <memory>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/model/engine/engine_test_util.h"
#include "worker/model/deepseek_v3.h"
#include "worker/quant/local_pipeline.h"

namespace mq::eval {
namespace {

using ::testing::HasSubstr;

class CompareTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    original_ = new std::string(model::testing::GenerateModel("eval", {"--seed", "5"}));
    quantized_ = new std::string();
    if (original_->empty()) return;
    std::string pattern = ::testing::TempDir() + "/mq_eval_w4a16_XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) return;
    quant::LocalQuantizeOptions o;
    o.model_dir = *original_;
    o.output_dir = pattern;
    o.method = quant::QuantMethod::kRtn;
    o.input_ids = at::randint(0, 512, {4, 16}, at::kLong);
    absl::StatusOr<quant::LocalQuantizeReport> r = quant::QuantizeLocal(o);
    if (r.ok()) {
      *quantized_ = pattern;
    } else {
      ADD_FAILURE() << r.status();
    }
  }
  static void TearDownTestSuite() {
    delete original_;
    delete quantized_;
  }
  void SetUp() override {
    ASSERT_FALSE(original_->empty());
    ASSERT_FALSE(quantized_->empty());
  }

  static std::string* original_;
  static std::string* quantized_;
};
std::string* CompareTest::original_ = nullptr;
std::string* CompareTest::quantized_ = nullptr;

TEST_F(CompareTest, LoadsPackedExpertsAndIgnoredModulesAsStored) {
  absl::StatusOr<model::DeepseekV3Config> config =
      model::LoadDeepseekV3Config(*quantized_ + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->compressed_tensors.has_value());
  EXPECT_FALSE(config->quantization_config.has_value());
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> q =
      model::CheckpointReader::Open(*quantized_);
  ASSERT_TRUE(q.ok()) << q.status();
  absl::StatusOr<std::unique_ptr<model::CheckpointReader>> orig =
      model::CheckpointReader::Open(*original_);
  ASSERT_TRUE(orig.ok()) << orig.status();
  const std::string expert = "model.layers.1.mlp.experts.3.down_proj";
  ASSERT_FALSE((*q)->Has(expert + ".weight"));
  ASSERT_TRUE((*q)->Has(expert + ".weight_packed"));

  absl::StatusOr<model::LayerWeights> lq = model::LoadLayer(**q, *config, 1, at::kCPU, at::kFloat);
  ASSERT_TRUE(lq.ok()) << lq.status();
  absl::StatusOr<model::LayerWeights> lo =
      model::LoadLayer(**orig, *config, 1, at::kCPU, at::kFloat);
  ASSERT_TRUE(lo.ok()) << lo.status();
  // Attention and the shared expert are in `ignore`: the original's bf16 values exactly.
  EXPECT_TRUE(lq->q_a_proj.equal(lo->q_a_proj));
  EXPECT_TRUE(lq->shared_experts.down_proj.equal(lo->shared_experts.down_proj));
  EXPECT_TRUE(lq->gate.equal(lo->gate));
  // Experts: 4-bit values of the original, close but not equal.
  for (int e = 0; e < config->n_routed_experts; ++e) {
    const double err = model::testing::RelErr(lq->experts[e].down_proj, lo->experts[e].down_proj);
    EXPECT_GT(err, 0.0) << e;
    EXPECT_LT(err, 0.2) << e;
  }
  // The same bits through LoadTensor by name.
  absl::StatusOr<at::Tensor> t =
      model::LoadTensor(**q, expert + ".weight", at::kCPU, at::kBFloat16);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(t->to(at::kFloat).equal(lq->experts[3].down_proj));
}

TEST_F(CompareTest, ModelAgainstItselfIsExact) {
  const at::Tensor ids = at::randint(0, 512, {3, 12}, at::kLong);
  CompareOptions options;
  options.batch_size = 2;  // two batches, the second of one sequence
  absl::StatusOr<QualityReport> r = CompareCheckpoints(*original_, *original_, ids, options);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->sequences, 3);
  EXPECT_EQ(r->next_token.positions, 3 * 11);
  EXPECT_EQ(r->next_token.kl_mean, 0.0);
  EXPECT_EQ(r->next_token.kl_max, 0.0);
  EXPECT_EQ(r->next_token.top1_agreement, 1.0);
  EXPECT_EQ(r->next_token.perplexity_reference, r->next_token.perplexity_candidate);
  ASSERT_EQ(r->layers.size(), 3u);
  for (const LayerError& l : r->layers) EXPECT_EQ(l.relative_error, 0.0) << l.layer;
}

TEST_F(CompareTest, QuantizedOutputDiffersFromTheFirstQuantizedLayer) {
  const at::Tensor ids = at::randint(0, 512, {2, 10}, at::kLong);
  absl::StatusOr<QualityReport> r = CompareCheckpoints(*original_, *quantized_, ids);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->layers.size(), 3u);
  EXPECT_EQ(r->layers[0].relative_error, 0.0);  // dense layer 0: not quantized
  EXPECT_GT(r->layers[1].relative_error, 0.0);
  EXPECT_GT(r->layers[2].relative_error, 0.0);
  EXPECT_GT(r->next_token.kl_mean, 0.0);
  EXPECT_GE(r->next_token.kl_max, r->next_token.kl_p99);
  EXPECT_GE(r->next_token.kl_p99, 0.0);
  EXPECT_GT(r->next_token.top1_agreement, 0.0);
  EXPECT_LE(r->next_token.top1_agreement, 1.0);
  // Batching changes float rounding only.
  CompareOptions one;
  one.batch_size = 1;
  absl::StatusOr<QualityReport> r1 = CompareCheckpoints(*original_, *quantized_, ids, one);
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_NEAR(r1->next_token.kl_mean, r->next_token.kl_mean, 1e-4 * r->next_token.kl_mean);
  EXPECT_NEAR(r1->layers[2].relative_error, r->layers[2].relative_error,
              1e-4 * r->layers[2].relative_error);
  // The same call twice: the same bits.
  absl::StatusOr<QualityReport> again = CompareCheckpoints(*original_, *quantized_, ids);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->next_token.kl_mean, r->next_token.kl_mean);
  EXPECT_EQ(again->next_token.kl_p99, r->next_token.kl_p99);
  EXPECT_EQ(again->layers[2].relative_error, r->layers[2].relative_error);
  const nlohmann::json j = QualityReportJson(*r);
  EXPECT_EQ(j["positions"], 18);
  EXPECT_EQ(j["layers"].size(), 3u);
  EXPECT_EQ(j["kl"]["mean"].get<double>(), r->next_token.kl_mean);
}

TEST_F(CompareTest, RefusesDifferentArchitecturesAndBadIds) {
  absl::StatusOr<model::DeepseekV3Config> a =
      model::LoadDeepseekV3Config(*original_ + "/config.json");
  ASSERT_TRUE(a.ok());
  model::DeepseekV3Config b = *a;
  EXPECT_TRUE(CheckSameArchitecture(*a, b).ok());
  b.moe_intermediate_size += 8;
  absl::Status s = CheckSameArchitecture(*a, b);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("moe_intermediate_size"));
  absl::StatusOr<QualityReport> r =
      CompareCheckpoints(*original_, *original_, at::full({1, 4}, 512, at::kLong));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  r = CompareCheckpoints(*original_, *original_, at::zeros({1, 1}, at::kLong));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CompareTest, QuantizerRefusesAQuantizedInput) {
  std::string pattern = ::testing::TempDir() + "/mq_eval_again_XXXXXX";
  ASSERT_NE(mkdtemp(pattern.data()), nullptr);
  quant::LocalQuantizeOptions o;
  o.model_dir = *quantized_;
  o.output_dir = pattern;
  o.method = quant::QuantMethod::kRtn;
  o.input_ids = at::randint(0, 512, {2, 8}, at::kLong);
  absl::StatusOr<quant::LocalQuantizeReport> r = quant::QuantizeLocal(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("already quantized"));
}

}  // namespace
}  // namespace mq::eval
