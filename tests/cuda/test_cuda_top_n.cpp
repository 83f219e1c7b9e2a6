// cuda::top_n_rows (the CUDA runner's top log-probs) against its reference cpu::top_n_logprobs:
// the same ids and value bits, in order, on random rows, rows full of ties (to the lower id) and
// rows with -inf entries, for counts 1 to 20 and vocabularies from 5 to 151936; rows asking for
// none are left alone.
#include <cstring>
#include <limits>

#include "cuda_test_util.h"
#include "kernels/cpu/sampling.h"
#include "kernels/cuda/top_n.h"

namespace lockstep {
namespace {

using testing::DeviceVec;

struct Picked {
  std::vector<int32_t> tokens;
  std::vector<float> values;
};

Picked top_n(const std::vector<float>& rows, const std::vector<int32_t>& counts, int64_t V) {
  const int64_t R = int64_t(counts.size());
  DeviceVec<float> x(rows), out(R * cuda::kMaxTopN);
  DeviceVec<int32_t> c(counts), tok(R * cuda::kMaxTopN);
  out.poison();
  tok.poison();
  cuda::top_n_rows(x.get(), c.get(), tok.get(), out.get(), R, V, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {tok.take(), out.take()};
}

void check(int64_t V, uint64_t seed) {
  LS_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int> level(0, 3);
  const std::vector<int32_t> wanted = {1, 7, 20, 0, 20, 13};
  const int64_t R = int64_t(wanted.size());
  std::vector<float> rows(size_t(R * V));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < V; ++v) {
      float& x = rows[size_t(r * V + v)];
      if (r == 4)
        x = -float(level(rng));  // four values: long runs of ties
      else
        x = normal(rng);
      if (r == 5 && v % 3 == 0) x = -std::numeric_limits<float>::infinity();
    }
  std::vector<int32_t> counts;
  for (int32_t n : wanted) counts.push_back(int32_t(std::min<int64_t>(n, V)));
  const Picked got = top_n(rows, counts, V);
  for (int64_t r = 0; r < R; ++r) {
    const int32_t n = counts[size_t(r)];
    std::vector<int32_t> want_t(static_cast<size_t>(n));
    std::vector<float> want_v(static_cast<size_t>(n));
    if (n > 0) cpu::top_n_logprobs(&rows[size_t(r * V)], V, n, want_t.data(), want_v.data());
    const size_t at = size_t(r * cuda::kMaxTopN);
    EXPECT_EQ(std::vector<int32_t>(got.tokens.begin() + at, got.tokens.begin() + at + n), want_t) << "row " << r;
    EXPECT_TRUE(testing::same_bits_f(std::vector<float>(got.values.begin() + at, got.values.begin() + at + n), want_v))
        << "row " << r;
    if (n == 0) {
      EXPECT_EQ(got.tokens[at], -1) << "a row that asks for none is left alone";
    }
  }
}

TEST(CudaTopN, LargeVocabulary) { check(151936, 1); }
TEST(CudaTopN, SmallVocabulary) { check(37, 2); }
TEST(CudaTopN, FewerEntriesThanAsked) { check(5, 3); }

TEST(CudaTopN, TiesGoToTheLowerId) {
  LS_SKIP_WITHOUT_GPU();
  const std::vector<float> row = {1.0f, 3.0f, 2.0f, 3.0f, 3.0f, -1.0f, 2.0f};
  const Picked got = top_n(row, {5}, 7);
  EXPECT_EQ(std::vector<int32_t>(got.tokens.begin(), got.tokens.begin() + 5), (std::vector<int32_t>{1, 3, 4, 2, 6}));
  EXPECT_EQ(std::vector<float>(got.values.begin(), got.values.begin() + 5),
            (std::vector<float>{3.0f, 3.0f, 3.0f, 2.0f, 2.0f}));
}

}  // namespace
}  // namespace lockstep
