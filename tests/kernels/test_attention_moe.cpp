// Paged attention and the MoE layer against plain references; page placement and batch
// composition change no bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/moe.h"
#include "random.h"

namespace lockstep {
namespace {

using testing::max_rel_err;
using testing::random_vector;
using testing::same_bits;

struct AttnCase {
  int64_t seq_len, heads, kv_heads, d, page;
};

// Runs attention for all positions of one sequence with pages in the given order.
std::vector<float> run_attention(const AttnCase& c, const std::vector<float>& q, const std::vector<float>& k,
                                 const std::vector<float>& v, const std::vector<int32_t>& pages, int64_t pool) {
  std::vector<float> kc(pool * c.page * c.kv_heads * c.d, 0.0f), vc(kc.size(), 0.0f);
  PagedKvLayer kv{kc.data(), vc.data(), pool, c.page, c.kv_heads, c.d};
  std::vector<int32_t> pos(c.seq_len);
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<const int32_t*> tables(c.seq_len, pages.data());
  TokenSlots slots{pos.data(), tables.data()};
  cpu::kv_write(kv, slots, k.data(), v.data(), c.seq_len);
  std::vector<float> out(c.seq_len * c.heads * c.d);
  cpu::paged_attention(q.data(), out.data(), kv, slots, c.seq_len, c.heads, 1.0f / std::sqrt(float(c.d)));
  return out;
}

TEST(PagedAttention, MatchesCausalSoftmaxReferenceAndIgnoresPagePlacement) {
  for (AttnCase c : {AttnCase{1, 2, 1, 8, 4}, AttnCase{70, 4, 2, 16, 16}, AttnCase{130, 2, 2, 8, 7}}) {
    auto q = random_vector(c.seq_len * c.heads * c.d, 1), k = random_vector(c.seq_len * c.kv_heads * c.d, 2),
         v = random_vector(c.seq_len * c.kv_heads * c.d, 3);
    int64_t n_pages = (c.seq_len + c.page - 1) / c.page, pool = n_pages + 5;
    std::vector<int32_t> in_order(n_pages), shuffled(n_pages);
    std::iota(in_order.begin(), in_order.end(), 0);
    for (int64_t i = 0; i < n_pages; ++i) shuffled[i] = int32_t((i * 7 + 3) % pool);
    std::sort(shuffled.begin(), shuffled.end());
    std::reverse(shuffled.begin(), shuffled.end());
    auto a = run_attention(c, q, k, v, in_order, pool);
    auto b = run_attention(c, q, k, v, shuffled, pool);
    EXPECT_TRUE(same_bits(a, b));
    std::vector<double> ref(a.size());
    int64_t group = c.heads / c.kv_heads;
    for (int64_t t = 0; t < c.seq_len; ++t)
      for (int64_t h = 0; h < c.heads; ++h) {
        std::vector<double> s(t + 1);
        double m = -1e30, z = 0;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t i = 0; i < c.d; ++i)
            dot += double(q[(t * c.heads + h) * c.d + i]) * k[(j * c.kv_heads + h / group) * c.d + i];
          s[j] = dot / std::sqrt(double(c.d));
          m = std::max(m, s[j]);
        }
        for (int64_t j = 0; j <= t; ++j) z += std::exp(s[j] - m);
        for (int64_t i = 0; i < c.d; ++i) {
          double acc = 0;
          for (int64_t j = 0; j <= t; ++j) acc += std::exp(s[j] - m) / z * v[(j * c.kv_heads + h / group) * c.d + i];
          ref[(t * c.heads + h) * c.d + i] = acc;
        }
      }
    EXPECT_LT(max_rel_err(a, ref), 1e-5) << "seq_len " << c.seq_len;
  }
}

TEST(Moe, TopKBreaksTiesTowardTheLowerExpert) {
  std::vector<float> logits = {1.0f, 3.0f, 3.0f, 0.0f, 3.0f};
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  cpu::route_topk(logits.data(), 1, 5, 2, true, ids.data(), w.data());
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 2);
  EXPECT_FLOAT_EQ(w[0] + w[1], 1.0f);
}

TEST(Moe, ExpertRowsAreTheAssignmentFlattenedAndEachTokensRowsByExpertId) {
  // Distinct experts per token (as top-k gives), some experts never chosen.
  const int64_t T = 53, k = 3, E = 10;
  std::mt19937 rng(5);
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> pool{0, 1, 2, 4, 5, 7, 8};  // experts 3, 6 and 9 unused
    std::shuffle(pool.begin(), pool.end(), rng);
    std::copy(pool.begin(), pool.begin() + k, ids.begin() + t * k);
  }
  const cpu::ExpertRows r = cpu::expert_rows(ids.data(), T, k, E);
  const cpu::ExpertAssignment a = cpu::assign_tokens(ids.data(), T, k, E);
  ASSERT_EQ(r.offsets.size(), size_t(E + 1));
  std::vector<int32_t> row_of_pair(static_cast<size_t>(T * k), -1);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t first = r.offsets[size_t(e)], n = r.offsets[size_t(e) + 1] - first;
    ASSERT_EQ(n, int64_t(a.tokens[size_t(e)].size())) << "expert " << e;
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(r.row_token[size_t(first + i)], a.tokens[size_t(e)][size_t(i)]) << "expert " << e << " row " << i;
      EXPECT_EQ(r.row_pair[size_t(first + i)], a.tokens[size_t(e)][size_t(i)] * k + a.slots[size_t(e)][size_t(i)]);
      row_of_pair[size_t(r.row_pair[size_t(first + i)])] = int32_t(first + i);
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> slots(static_cast<size_t>(k));
    std::iota(slots.begin(), slots.end(), 0);
    std::sort(slots.begin(), slots.end(),
              [&](int32_t x, int32_t y) { return ids[size_t(t * k + x)] < ids[size_t(t * k + y)]; });
    for (int64_t j = 0; j < k; ++j)
      EXPECT_EQ(r.order[size_t(t * k + j)], row_of_pair[size_t(t * k + slots[size_t(j)])]) << "token " << t;
  }
  // Another placement of the same pairs (grouped by expert, any order inside a group, as the
  // GPU's assignment by atomics): each row's place there holds the row's pair.
  std::vector<int32_t> placed(r.row_pair);
  for (int64_t e = 0; e < E; ++e)
    std::shuffle(placed.begin() + r.offsets[size_t(e)], placed.begin() + r.offsets[size_t(e) + 1], rng);
  const std::vector<int32_t> at = cpu::rows_in_placement(r, placed.data());
  ASSERT_EQ(at.size(), r.row_pair.size());
  for (size_t row = 0; row < at.size(); ++row) EXPECT_EQ(placed[size_t(at[row])], r.row_pair[row]) << "row " << row;
  std::vector<int32_t> same_place(at.size());
  std::iota(same_place.begin(), same_place.end(), 0);
  EXPECT_NE(at, same_place);  // the shuffle moved rows
  placed[3] = placed[4];      // a pair twice: refused
  EXPECT_THROW(cpu::rows_in_placement(r, placed.data()), std::exception);
  ids[7] = int32_t(E);
  EXPECT_THROW(cpu::expert_rows(ids.data(), T, k, E), std::exception);
}

TEST(Moe, LayerMatchesReferenceAndEachTokenIsBatchInvariant) {
  const int64_t T = 23, H = 24, I = 12, E = 6, k = 2;
  auto x = random_vector(T * H, 1), router = random_vector(E * H, 2, 2.0f);
  std::vector<std::vector<float>> g(E), u(E), d(E);
  std::vector<const float*> gp(E), up(E), dp(E);
  for (int64_t e = 0; e < E; ++e) {
    g[e] = random_vector(I * H, 10 + e);
    u[e] = random_vector(I * H, 20 + e);
    d[e] = random_vector(H * I, 30 + e);
    gp[e] = g[e].data();
    up[e] = u[e].data();
    dp[e] = d[e].data();
  }
  std::vector<float> out(T * H);
  cpu::moe_forward(x.data(), router.data(), gp.data(), up.data(), dp.data(), out.data(), T, H, I, E, k, true, false);
  // Reference in double, routing taken from a double softmax.
  std::vector<double> ref(T * H, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> logit(E), p(E);
    for (int64_t e = 0; e < E; ++e) {
      logit[e] = 0;
      for (int64_t h = 0; h < H; ++h) logit[e] += double(x[t * H + h]) * router[e * H + h];
    }
    double m = *std::max_element(logit.begin(), logit.end()), z = 0;
    for (int64_t e = 0; e < E; ++e) z += (p[e] = std::exp(logit[e] - m));
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double norm = p[order[0]] + p[order[1]];
    for (int s = 0; s < k; ++s) {
      int e = order[s];
      std::vector<double> act(I);
      for (int64_t i = 0; i < I; ++i) {
        double gg = 0, uu = 0;
        for (int64_t h = 0; h < H; ++h) {
          gg += double(x[t * H + h]) * g[e][i * H + h];
          uu += double(x[t * H + h]) * u[e][i * H + h];
        }
        act[i] = gg / (1 + std::exp(-gg)) * uu;
      }
      for (int64_t h = 0; h < H; ++h) {
        double y = 0;
        for (int64_t i = 0; i < I; ++i) y += act[i] * d[e][h * I + i];
        ref[t * H + h] += p[e] / norm * y;
      }
    }
  }
  EXPECT_LT(max_rel_err(out, ref), 1e-5);
  // Any sub-batch (here: every token alone, and the reversed batch) gives the same bits.
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> one(H);
    cpu::moe_forward(x.data() + t * H, router.data(), gp.data(), up.data(), dp.data(), one.data(), 1, H, I, E, k, true,
                     false);
    ASSERT_TRUE(same_bits(one, std::vector<float>(out.begin() + t * H, out.begin() + (t + 1) * H))) << t;
  }
}

}  // namespace
}  // namespace lockstep
