// Reading compressed-tensors pack-quantized weights (worker/model/packed_int4.h): a plain-C++
// reference unpacker/dequantizer on the tensors worker/quant's packer writes, for group sizes
// 32 and 128, per-channel, asymmetric zero points and a width that is not a multiple of 8; and
// the errors for inconsistent tensors.
#include "worker/model/packed_int4.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "worker/quant/grid.h"
#include "worker/quant/pack.h"

namespace mq::model {
namespace {

// float -> bf16 bits, round to nearest even (FORMATS.md §1.2); finite inputs only.
uint16_t Bf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Element by element from the on-disk layout (FORMATS.md §4.2, §6 items 9-12): bf16 bits [O, I].
std::vector<uint16_t> ReferenceDequant(const quant::PackedWeight& p, int64_t rows, int64_t cols,
                                       int64_t groups) {
  const at::Tensor packed = p.weight_packed.contiguous();
  const at::Tensor scale = p.weight_scale.to(at::kFloat).contiguous();
  const int64_t words = packed.size(1);
  const int32_t* w = packed.data_ptr<int32_t>();
  const float* s = scale.data_ptr<float>();
  at::Tensor zp_packed;
  if (p.weight_zero_point.defined()) zp_packed = p.weight_zero_point.contiguous();
  const int64_t g = cols / groups;
  std::vector<uint16_t> out(rows * cols);
  for (int64_t o = 0; o < rows; ++o) {
    for (int64_t i = 0; i < cols; ++i) {
      const uint32_t word = static_cast<uint32_t>(w[o * words + i / 8]);
      const int q = static_cast<int>((word >> (4 * (i % 8))) & 0xF) - 8;
      int zp = 0;
      if (zp_packed.defined()) {
        const uint32_t zw = static_cast<uint32_t>(
            zp_packed.data_ptr<int32_t>()[(o / 8) * zp_packed.size(1) + i / g]);
        zp = static_cast<int>((zw >> (4 * (o % 8))) & 0xF) - 8;
      }
      out[o * cols + i] = Bf16Bits(static_cast<float>(q - zp) * s[o * groups + i / g]);
    }
  }
  return out;
}

std::vector<uint16_t> Bits(const at::Tensor& bf16) {
  const at::Tensor c = bf16.contiguous();
  const uint16_t* p = reinterpret_cast<const uint16_t*>(c.data_ptr());
  return std::vector<uint16_t>(p, p + c.numel());
}

struct Case {
  int64_t rows, cols, group_size;  // group_size 0 = per-channel
  bool asymmetric;
};

TEST(PackedInt4Test, DequantizesWhatThePackerWrites) {
  at::manual_seed(3);
  for (const Case& c : std::vector<Case>{{24, 256, 128, false},
                                         {16, 256, 32, false},
                                         {9, 100, 0, false},
                                         {20, 256, 64, true},
                                         {13, 96, 0, true}}) {
    SCOPED_TRACE(testing::Message() << c.rows << "x" << c.cols << " G=" << c.group_size
                                    << (c.asymmetric ? " asym" : " sym"));
    const int64_t groups = c.group_size == 0 ? 1 : c.cols / c.group_size;
    quant::QuantizedWeight q;
    q.bits = 4;
    q.group_size = c.group_size;
    q.codes = at::randint(-8, 8, {c.rows, c.cols}, at::kChar);
    q.scales = (at::rand({c.rows, groups}) * 0.1 + 0.001).to(at::kBFloat16);
    if (c.asymmetric) q.zero_points = at::randint(-8, 8, {c.rows, groups}, at::kChar);
    absl::StatusOr<quant::PackedWeight> packed = quant::PackWeight(q);
    ASSERT_TRUE(packed.ok()) << packed.status();

    absl::StatusOr<at::Tensor> codes = UnpackInt4(packed->weight_packed, c.cols);
    ASSERT_TRUE(codes.ok()) << codes.status();
    EXPECT_TRUE(codes->equal(q.codes));

    PackedInt4Linear linear{packed->weight_packed, packed->weight_scale, packed->weight_shape,
                            packed->weight_zero_point};
    absl::StatusOr<at::Tensor> dense = DequantizePackedInt4(linear);
    ASSERT_TRUE(dense.ok()) << dense.status();
    ASSERT_EQ(dense->scalar_type(), at::kBFloat16);
    ASSERT_EQ(dense->sizes(), at::IntArrayRef({c.rows, c.cols}));
    EXPECT_EQ(Bits(*dense), ReferenceDequant(*packed, c.rows, c.cols, groups));
    // The quantizer's own dequantization of the same codes, bit for bit.
    absl::StatusOr<at::Tensor> theirs = quant::DequantizePacked(*packed);
    ASSERT_TRUE(theirs.ok()) << theirs.status();
    EXPECT_EQ(Bits(*dense), Bits(*theirs));
  }
}

TEST(PackedInt4Test, FormatsExampleWord) {
  // 0x76543210 holds q = -8..-1 in columns 0..7 (FORMATS.md §4.2); scale 0.5.
  PackedInt4Linear linear;
  linear.weight_packed = at::tensor(std::vector<int32_t>{0x76543210}, at::kInt).reshape({1, 1});
  linear.weight_scale = at::full({1, 1}, 0.5, at::kBFloat16);
  linear.weight_shape = at::tensor(std::vector<int64_t>{1, 8}, at::kLong);
  absl::StatusOr<at::Tensor> dense = DequantizePackedInt4(linear);
  ASSERT_TRUE(dense.ok()) << dense.status();
  const at::Tensor f = dense->to(at::kFloat).flatten();
  for (int i = 0; i < 8; ++i) EXPECT_EQ(f[i].item<float>(), 0.5f * (i - 8)) << i;
  EXPECT_EQ(Bf16ToFloat(Bf16Bits(-4.0f)), -4.0f);
}

TEST(PackedInt4Test, RefusesInconsistentTensors) {
  PackedInt4Linear good;
  good.weight_packed = at::zeros({4, 32}, at::kInt);
  good.weight_scale = at::ones({4, 2}, at::kBFloat16);
  good.weight_shape = at::tensor(std::vector<int64_t>{4, 256}, at::kLong);
  ASSERT_TRUE(DequantizePackedInt4(good).ok());

  PackedInt4Linear bad = good;
  bad.weight_shape = at::tensor(std::vector<int64_t>{4, 200}, at::kLong);  // 25 words, not 32
  EXPECT_EQ(DequantizePackedInt4(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = good;
  bad.weight_scale = at::ones({4, 3}, at::kBFloat16);  // 256 is not 3 whole groups
  absl::Status s = DequantizePackedInt4(bad).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("weight_scale"), std::string::npos) << s;
  bad = good;
  bad.weight_packed = at::zeros({4, 32}, at::kLong);  // not int32
  EXPECT_EQ(DequantizePackedInt4(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = good;
  bad.weight_zero_point = at::zeros({2, 2}, at::kInt);  // must be [ceil(4/8) = 1, 2]
  s = DequantizePackedInt4(bad).status();
  EXPECT_NE(s.message().find("weight_zero_point"), std::string::npos) << s;
  bad = good;
  bad.weight_shape = at::tensor(std::vector<int64_t>{4}, at::kLong);
  EXPECT_EQ(DequantizePackedInt4(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mq::model
