// CPU int4 packing against an independent straightforward reference (one code at a time), the
// layout examples of FORMATS.md §4.2, out-of-range counting, plus the launchers' argument checks
// on this (possibly GPU-less) machine.
#include "mq/kernels/pack.h"

#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace mq::kernels {
namespace {

struct Packed {
  std::vector<int32_t> words;
  int64_t out_of_range = 0;
};

// Nibble of one code: (code + 8) mod 16; padding is u = 0.
uint32_t Nibble(int8_t code) { return static_cast<uint32_t>(code + 8) & 0xFu; }
bool OutOfRange(int8_t code) { return code < -8 || code > 7; }

// Row packing, code by code.
Packed NaiveRows(const std::vector<int8_t>& codes, int64_t rows, int64_t cols, int64_t ld) {
  const int64_t words = (cols + 7) / 8;
  Packed p;
  p.words.assign(static_cast<size_t>(rows * words), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int8_t code = codes[static_cast<size_t>(r * ld + c)];
      uint32_t& word = reinterpret_cast<uint32_t&>(p.words[static_cast<size_t>(r * words + c / 8)]);
      word |= Nibble(code) << (4 * (c % 8));
      p.out_of_range += OutOfRange(code);
    }
  }
  return p;
}

// Transposed packing, code by code: word [r / 8][c] holds row r in nibble r % 8.
Packed NaiveTransposed(const std::vector<int8_t>& codes, int64_t rows, int64_t cols, int64_t ld) {
  Packed p;
  p.words.assign(static_cast<size_t>((rows + 7) / 8 * cols), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int8_t code = codes[static_cast<size_t>(r * ld + c)];
      uint32_t& word = reinterpret_cast<uint32_t&>(p.words[static_cast<size_t>(r / 8 * cols + c)]);
      word |= Nibble(code) << (4 * (r % 8));
      p.out_of_range += OutOfRange(code);
    }
  }
  return p;
}

// rows x ld codes; in range unless `wild` (then any int8). Bytes past cols hold out-of-range
// values, which must never be read.
std::vector<int8_t> RandomCodes(int64_t rows, int64_t cols, int64_t ld, uint32_t seed, bool wild) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> in_range(-8, 7);
  std::uniform_int_distribution<int> any(-128, 127);
  std::vector<int8_t> codes(static_cast<size_t>(rows * ld), 100);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      codes[static_cast<size_t>(r * ld + c)] = static_cast<int8_t>(wild ? any(rng) : in_range(rng));
    }
  }
  return codes;
}

void ExpectSame(const Packed& got, const Packed& want) {
  ASSERT_EQ(got.words.size(), want.words.size());
  int64_t mismatches = 0;
  for (size_t i = 0; i < got.words.size(); ++i) {
    if (got.words[i] != want.words[i] && ++mismatches <= 5) {
      ADD_FAILURE() << "word " << i << ": got 0x" << std::hex << got.words[i] << " want 0x"
                    << want.words[i];
    }
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(got.out_of_range, want.out_of_range);
}

Packed CpuRows(const std::vector<int8_t>& codes, int64_t rows, int64_t cols, int64_t ld) {
  Packed p;
  p.words.assign(static_cast<size_t>(rows * Int4PackedWords(cols)), 0x5A5A5A5A);
  p.out_of_range = PackInt4Cpu(codes.data(), rows, cols, ld, p.words.data());
  return p;
}

Packed CpuTransposed(const std::vector<int8_t>& codes, int64_t rows, int64_t cols, int64_t ld) {
  Packed p;
  p.words.assign(static_cast<size_t>(Int4PackedWords(rows) * cols), 0x5A5A5A5A);
  p.out_of_range = PackInt4TransposedCpu(codes.data(), rows, cols, ld, p.words.data());
  return p;
}

const std::pair<int64_t, int64_t> kShapes[] = {{1, 1},    {1, 7},     {1, 8},  {1, 9},     {2, 16},
                                               {3, 15},   {5, 13},    {8, 3},  {9, 17},    {17, 64},
                                               {33, 129}, {127, 130}, {64, 7}, {300, 1000}};

TEST(PackInt4CpuTest, FormatsExamplesBitExact) {
  // q = [-8..-1] -> 0x76543210; q = [0..7] -> 0xFEDCBA98; q = [0, 0, 0] -> 0x888 (padding u = 0).
  const std::vector<int8_t> codes = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
  int32_t packed[2] = {0, 0};
  EXPECT_EQ(PackInt4Cpu(codes.data(), 2, 8, 8, packed), 0);
  EXPECT_EQ(packed[0], 0x76543210);
  EXPECT_EQ(packed[1], static_cast<int32_t>(0xFEDCBA98u));
  const int8_t zeros[3] = {0, 0, 0};
  int32_t short_word = 0;
  EXPECT_EQ(PackInt4Cpu(zeros, 1, 3, 3, &short_word), 0);
  EXPECT_EQ(short_word, 0x888);
  // Transposed: the same 16 codes as a column of 16 rows -> words [2][1].
  EXPECT_EQ(PackInt4TransposedCpu(codes.data(), 16, 1, 1, packed), 0);
  EXPECT_EQ(packed[0], 0x76543210);
  EXPECT_EQ(packed[1], static_cast<int32_t>(0xFEDCBA98u));
}

TEST(PackInt4CpuTest, RowsMatchNaiveOnOddShapes) {
  uint32_t seed = 1;
  for (auto [rows, cols] : kShapes) {
    for (int64_t ld : {cols, cols + 1, cols + 5, cols + 8}) {
      SCOPED_TRACE(testing::Message() << rows << "x" << cols << " ld " << ld);
      const std::vector<int8_t> codes = RandomCodes(rows, cols, ld, seed++, false);
      ExpectSame(CpuRows(codes, rows, cols, ld), NaiveRows(codes, rows, cols, ld));
    }
  }
}

TEST(PackInt4CpuTest, TransposedMatchesNaiveOnOddShapes) {
  uint32_t seed = 100;
  for (auto [rows, cols] : kShapes) {
    for (int64_t ld : {cols, cols + 3}) {
      SCOPED_TRACE(testing::Message() << rows << "x" << cols << " ld " << ld);
      const std::vector<int8_t> codes = RandomCodes(rows, cols, ld, seed++, false);
      ExpectSame(CpuTransposed(codes, rows, cols, ld), NaiveTransposed(codes, rows, cols, ld));
    }
  }
}

TEST(PackInt4CpuTest, TransposedEqualsRowPackingOfTheTranspose) {
  const int64_t rows = 61, cols = 23;
  const std::vector<int8_t> codes = RandomCodes(rows, cols, cols, 7, false);
  std::vector<int8_t> t(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = codes[r * cols + c];
  }
  const Packed rows_of_t = CpuRows(t, cols, rows, rows);             // [cols, ceil(rows/8)]
  const Packed transposed = CpuTransposed(codes, rows, cols, cols);  // [ceil(rows/8), cols]
  const int64_t words = Int4PackedWords(rows);
  for (int64_t w = 0; w < words; ++w) {
    for (int64_t c = 0; c < cols; ++c) {
      EXPECT_EQ(transposed.words[w * cols + c], rows_of_t.words[c * words + w]) << w << "," << c;
    }
  }
}

TEST(PackInt4CpuTest, EveryByteValueInEveryNibblePosition) {
  // Each int8 value at each of the 8 positions of a word (others in range): the count and the
  // stored nibble (code + 8) mod 16 agree with the naive packing.
  for (int value = -128; value <= 127; ++value) {
    for (int position = 0; position < 8; ++position) {
      std::vector<int8_t> codes = {3, -8, 7, 0, -1, 5, -4, 2};
      codes[position] = static_cast<int8_t>(value);
      int32_t word = 0;
      const int64_t bad = PackInt4Cpu(codes.data(), 1, 8, 8, &word);
      const Packed want = NaiveRows(codes, 1, 8, 8);
      ASSERT_EQ(word, want.words[0]) << value << " at " << position;
      ASSERT_EQ(bad, want.out_of_range) << value << " at " << position;
      ASSERT_EQ(bad, (value < -8 || value > 7) ? 1 : 0);
    }
  }
}

TEST(PackInt4CpuTest, CountsOutOfRangeCodes) {
  uint32_t seed = 200;
  for (auto [rows, cols] : kShapes) {
    SCOPED_TRACE(testing::Message() << rows << "x" << cols);
    const int64_t ld = cols + 2;
    const std::vector<int8_t> codes = RandomCodes(rows, cols, ld, seed++, true);
    const Packed want_rows = NaiveRows(codes, rows, cols, ld);
    ExpectSame(CpuRows(codes, rows, cols, ld), want_rows);
    ExpectSame(CpuTransposed(codes, rows, cols, ld), NaiveTransposed(codes, rows, cols, ld));
    if (rows * cols > 16) {
      EXPECT_GT(want_rows.out_of_range, 0);
    }
  }
  // A single bad code in the padded last word.
  std::vector<int8_t> codes(5 * 13, 1);
  codes.back() = 8;
  int32_t words[16];  // rows: 5 x 2 words; transposed: 1 x 13 words
  EXPECT_EQ(PackInt4Cpu(codes.data(), 5, 13, 13, words), 1);
  codes.back() = -9;
  EXPECT_EQ(PackInt4TransposedCpu(codes.data(), 5, 13, 13, words), 1);
}

TEST(PackInt4CpuTest, EmptyMatrixWritesNothing) {
  int32_t word = 42;
  EXPECT_EQ(PackInt4Cpu(nullptr, 0, 8, 8, &word), 0);
  EXPECT_EQ(PackInt4Cpu(nullptr, 4, 0, 0, &word), 0);
  EXPECT_EQ(PackInt4TransposedCpu(nullptr, 0, 8, 8, &word), 0);
  EXPECT_EQ(word, 42);
}

TEST(PackInt4CpuTest, PackedWordsCount) {
  EXPECT_EQ(Int4PackedWords(0), 0);
  EXPECT_EQ(Int4PackedWords(1), 1);
  EXPECT_EQ(Int4PackedWords(8), 1);
  EXPECT_EQ(Int4PackedWords(9), 2);
  EXPECT_EQ(Int4PackedWords(7168), 896);
}

// The message of `s` must name `what`.
void ExpectInvalid(const absl::Status& s, const std::string& what) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(what), std::string::npos) << s;
}

TEST(PackInt4LaunchTest, RejectsBadArgumentsNamingThem) {
  int8_t codes[16] = {};
  int32_t packed[2] = {};
  int64_t bad = 0;
  using Launch =
      absl::Status (*)(const int8_t*, int64_t, int64_t, int64_t, int32_t*, int64_t*, cudaStream_t);
  for (Launch launch : {&LaunchPackInt4, &LaunchPackInt4Transposed}) {
    ExpectInvalid(launch(codes, -1, 8, 8, packed, &bad, nullptr), "rows = -1");
    ExpectInvalid(launch(codes, 2, -3, 8, packed, &bad, nullptr), "cols = -3");
    ExpectInvalid(launch(codes, 2, 8, 7, packed, &bad, nullptr), "ld_codes = 7");
    ExpectInvalid(launch(nullptr, 2, 8, 8, packed, &bad, nullptr), "codes is null");
    ExpectInvalid(launch(codes, 2, 8, 8, nullptr, &bad, nullptr), "packed is null");
    const int64_t big = std::numeric_limits<int64_t>::max() / 2;
    ExpectInvalid(launch(codes, 4, 8, big, packed, &bad, nullptr), "overflows int64");
    // Empty matrices are a no-op, whatever the pointers.
    EXPECT_TRUE(launch(nullptr, 0, 8, 8, nullptr, nullptr, nullptr).ok());
    EXPECT_TRUE(launch(nullptr, 3, 0, 0, nullptr, nullptr, nullptr).ok());
  }
}

TEST(PackInt4LaunchTest, GateAnswersWithoutADevice) {
  // Device -1 never exists: FailedPrecondition with CUDA, Unimplemented without.
  const absl::Status s = PackInt4IsSupported(-1);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), PackInt4CudaBuilt() ? absl::StatusCode::kFailedPrecondition
                                          : absl::StatusCode::kUnimplemented)
      << s;
  if (!PackInt4CudaBuilt()) {
    int8_t codes[8] = {};
    int32_t packed = 0;
    EXPECT_EQ(LaunchPackInt4(codes, 1, 8, 8, &packed, nullptr, nullptr).code(),
              absl::StatusCode::kUnimplemented);
  }
}

}  // namespace
}  // namespace mq::kernels
