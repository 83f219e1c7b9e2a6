// Core types: bf16 rounding, Philox known answers, tensors, the thread pool.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>

#include "core/dtype.h"
#include "core/error.h"
#include "core/philox.h"
#include "core/tensor.h"
#include "core/thread_pool.h"

namespace lockstep {
namespace {

uint32_t bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(Bf16, RoundToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // Exactly halfway between 0x3f80 and 0x3f81: ties to even (0x3f80).
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f808000)), 0x3f80);
  // Halfway between 0x3f81 and 0x3f82: ties to even (0x3f82).
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f818000)), 0x3f82);
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f808001)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // The largest finite float rounds to infinity, as IEEE round-to-nearest does.
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  for (uint32_t b = 0; b < 0x7f800000u; b += 0x10001u) {
    float f = from_bits(b), r = round_bf16(f);
    EXPECT_EQ(bits(r) & 0xffffu, 0u);
    EXPECT_LE(std::abs(double(r) - f), std::abs(double(f)) / 256.0 + 1e-45);
  }
}

TEST(F16, Conversion) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
}

// Known-answer vectors of Philox-4x32-10 (Salmon et al., Random123).
TEST(Philox, KnownAnswers) {
  auto r = philox4x32_10({0, 0, 0, 0}, {0, 0});
  EXPECT_EQ(r, (PhiloxCounter{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  r = philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu});
  EXPECT_EQ(r, (PhiloxCounter{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  r = philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u});
  EXPECT_EQ(r, (PhiloxCounter{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(Philox, UniformIsInRangeAndKeyed) {
  double sum = 0;
  for (int i = 0; i < 10000; ++i) {
    float u = philox_uniform(5, 6, uint64_t(i));
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
  }
  EXPECT_NEAR(sum / 10000, 0.5, 0.02);
  EXPECT_NE(philox_uniform(1, 2, 3), philox_uniform(1, 2, 4));
  EXPECT_NE(philox_uniform(1, 2, 3), philox_uniform(1, 3, 3));
  EXPECT_EQ(philox_uniform(1, 2, 3), philox_uniform(1, 2, 3));
}

TEST(Tensor, ConversionsAndReshape) {
  Tensor t = Tensor::zeros({2, 3}, DType::f32);
  for (int i = 0; i < 6; ++i) t.data<float>()[i] = float(i) + 0.25f;
  Tensor b = t.to_dtype(DType::bf16);
  EXPECT_EQ(b.nbytes(), 12u);
  Tensor back = b.to_f32();
  EXPECT_EQ(back.data<float>()[5], 5.25f);
  Tensor r = t.reshaped({3, 2});
  EXPECT_EQ(r.dim(0), 3);
  EXPECT_EQ(r.raw(), t.raw());
  EXPECT_THROW(t.reshaped({4, 2}), Error);
  EXPECT_EQ(shape_str({2, 3}), "[2, 3]");
}

TEST(ThreadPool, CoversTheRangeOnceInContiguousParts) {
  for (int threads : {1, 2, 3, 7}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 5, 100, 1001}) {
      std::vector<std::atomic<int>> hits(n);
      pool.parallel_for(n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i]++;
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << threads << " threads, n=" << n;
    }
  }
}

// Thread ranks (ThreadCommunicator) share one pool: concurrent callers must each get every
// index of their own job exactly once (they used to overwrite each other's job).
TEST(ThreadPool, ConcurrentCallersEachGetTheirWholeJob) {
  ThreadPool pool(3);
  constexpr int kCallers = 4, kRounds = 300;
  std::vector<int> failures(kCallers, 0);
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c)
    callers.emplace_back([&, c] {
      for (int round = 0; round < kRounds; ++round) {
        const int64_t n = 50 + 7 * c + round % 13;
        std::vector<int> hits(n, 0);
        pool.parallel_for(n, 1, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) hits[i] += 1 + c;
        });
        for (int64_t i = 0; i < n; ++i) failures[c] += hits[i] != 1 + c;
      }
    });
  for (auto& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) EXPECT_EQ(failures[c], 0) << "caller " << c;
}

}  // namespace
}  // namespace lockstep
