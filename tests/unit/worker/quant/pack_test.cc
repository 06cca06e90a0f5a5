// compressed-tensors int4 packing: exact nibble layout (FORMATS.md §4.2 examples), round trips,
// padding, zero points packed along dim 0, and decompression equal to our dequantized weight.
#include "worker/quant/pack.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "worker/quant/rtn.h"

namespace mq::quant {
namespace {

at::Tensor Codes(std::vector<int8_t> values, int64_t rows, int64_t cols) {
  return at::tensor(values, at::kChar).reshape({rows, cols});
}

TEST(PackInt4Test, FormatsExamplesBitExact) {
  // q = [-8..-1] -> 0x76543210 (bytes 10 32 54 76); q = [0..7] -> 0xFEDCBA98 (-19088744).
  at::Tensor codes = Codes({-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7}, 2, 8);
  absl::StatusOr<at::Tensor> packed = PackInt4(codes);
  ASSERT_TRUE(packed.ok()) << packed.status();
  ASSERT_EQ(packed->scalar_type(), at::kInt);
  ASSERT_EQ(packed->sizes(), at::IntArrayRef({2, 1}));
  EXPECT_EQ(packed->index({0, 0}).item<int32_t>(), 0x76543210);
  EXPECT_EQ(packed->index({1, 0}).item<int32_t>(), -19088744);
  uint8_t bytes[8];
  std::memcpy(bytes, packed->contiguous().data_ptr<int32_t>(), 8);
  const uint8_t expected[8] = {0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc, 0xfe};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(bytes[i], expected[i]) << i;
}

TEST(PackInt4Test, LowestNibbleIsLowestColumnAcrossWords) {
  // Row of 16: only column 9 is nonzero (q = 7 -> u = 15); all others q = -8 -> u = 0.
  std::vector<int8_t> v(16, -8);
  v[9] = 7;
  absl::StatusOr<at::Tensor> packed = PackInt4(Codes(v, 1, 16));
  ASSERT_TRUE(packed.ok());
  EXPECT_EQ(packed->index({0, 0}).item<int32_t>(), 0);
  EXPECT_EQ(packed->index({0, 1}).item<int32_t>(), 0xF0);  // column 9 = word 1, nibble 1
}

TEST(PackInt4Test, PadsShortLastWordWithZeroNibbles) {
  // 3 columns of q = 0 (u = 8): 0x888, the padding nibbles are u = 0 (FORMATS.md §4.2).
  absl::StatusOr<at::Tensor> packed = PackInt4(Codes({0, 0, 0}, 1, 3));
  ASSERT_TRUE(packed.ok());
  ASSERT_EQ(packed->sizes(), at::IntArrayRef({1, 1}));
  EXPECT_EQ(packed->index({0, 0}).item<int32_t>(), 0x888);
}

TEST(PackInt4Test, RoundTripsRandomShapes) {
  at::manual_seed(1);
  for (auto [rows, cols] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 8}, {5, 13}, {7, 256}, {300, 129}}) {
    at::Tensor codes = at::randint(-8, 8, {rows, cols}, at::kChar);
    absl::StatusOr<at::Tensor> packed = PackInt4(codes);
    ASSERT_TRUE(packed.ok());
    EXPECT_EQ(packed->size(1), (cols + 7) / 8);
    absl::StatusOr<at::Tensor> back = UnpackInt4(*packed, cols);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(at::equal(*back, codes)) << rows << "x" << cols;
  }
}

TEST(PackInt4Test, RejectsOutOfRangeAndBadShapes) {
  EXPECT_FALSE(PackInt4(Codes({8}, 1, 1)).ok());
  EXPECT_FALSE(PackInt4(Codes({-9}, 1, 1)).ok());
  EXPECT_FALSE(PackInt4(at::zeros({4}, at::kChar)).ok());
  EXPECT_FALSE(PackInt4(at::zeros({2, 2}, at::kFloat)).ok());
  EXPECT_FALSE(UnpackInt4(at::zeros({2, 3}, at::kInt), 8).ok());
  EXPECT_FALSE(UnpackInt4(at::zeros({2, 1}, at::kLong), 8).ok());
}

TEST(PackWeightTest, SymmetricTensorsAndDequantMatchOurs) {
  at::manual_seed(2);
  at::Tensor w = at::randn({20, 256});
  GridOptions o;
  o.group_size = 64;
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w, o);
  ASSERT_TRUE(q.ok());
  absl::StatusOr<PackedWeight> p = PackWeight(*q);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->weight_packed.sizes(), at::IntArrayRef({20, 32}));
  EXPECT_EQ(p->weight_scale.scalar_type(), at::kBFloat16);
  EXPECT_EQ(p->weight_scale.sizes(), at::IntArrayRef({20, 4}));
  EXPECT_EQ(p->weight_shape.scalar_type(), at::kLong);
  EXPECT_TRUE(at::equal(p->weight_shape, at::tensor(std::vector<int64_t>{20, 256})));
  EXPECT_FALSE(p->weight_zero_point.defined());
  absl::StatusOr<at::Tensor> dq = DequantizePacked(*p);
  ASSERT_TRUE(dq.ok()) << dq.status();
  EXPECT_TRUE(at::equal(dq->view(at::kShort), q->dequantized.view(at::kShort)));  // bits, ±0 too
}

TEST(PackWeightTest, AsymmetricZeroPointsPackedAlongRows) {
  at::manual_seed(3);
  at::Tensor w = at::rand({13, 96}).add_(0.3);  // all positive: nontrivial zero points
  GridOptions o;
  o.group_size = 32;
  o.symmetric = false;
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(w, o);
  ASSERT_TRUE(q.ok());
  absl::StatusOr<PackedWeight> p = PackWeight(*q);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_TRUE(p->weight_zero_point.defined());
  EXPECT_EQ(p->weight_zero_point.sizes(), at::IntArrayRef({2, 3}));  // [ceil(13/8), 96/32]
  // Word [r][g] holds zp[8r + k][g] + 8 in nibble k.
  at::Tensor zp = q->zero_points.to(at::kLong);
  for (int64_t r = 0; r < 2; ++r) {
    for (int64_t g = 0; g < 3; ++g) {
      uint32_t expected = 0;
      for (int64_t k = 0; k < 8 && 8 * r + k < 13; ++k) {
        expected |= static_cast<uint32_t>(zp.index({8 * r + k, g}).item<int64_t>() + 8) << (4 * k);
      }
      EXPECT_EQ(static_cast<uint32_t>(p->weight_zero_point.index({r, g}).item<int32_t>()),
                expected);
    }
  }
  absl::StatusOr<at::Tensor> dq = DequantizePacked(*p);
  ASSERT_TRUE(dq.ok()) << dq.status();
  EXPECT_TRUE(at::equal(dq->view(at::kShort), q->dequantized.view(at::kShort)));  // bits, ±0 too
}

TEST(PackWeightTest, PerChannelAndRejectsOtherBits) {
  at::manual_seed(4);
  GridOptions o;
  o.group_size = 0;
  absl::StatusOr<QuantizedWeight> q = QuantizeRtn(at::randn({5, 40}), o);
  ASSERT_TRUE(q.ok());
  absl::StatusOr<PackedWeight> p = PackWeight(*q);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->weight_scale.sizes(), at::IntArrayRef({5, 1}));
  EXPECT_TRUE(at::equal(*DequantizePacked(*p), q->dequantized));

  o.bits = 3;
  absl::StatusOr<QuantizedWeight> q3 = QuantizeRtn(at::randn({5, 40}), o);
  ASSERT_TRUE(q3.ok());
  absl::StatusOr<PackedWeight> p3 = PackWeight(*q3);
  ASSERT_FALSE(p3.ok());
  EXPECT_NE(p3.status().message().find("bits = 3"), std::string::npos);
}

}  // namespace
}  // namespace mq::quant
