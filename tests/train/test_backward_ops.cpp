// Each op's backward kernel: its float64 reference is checked by central differences, and
// the fp32 kernel is compared with the reference on random inputs ("double-checked").
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "backward_reference.h"
#include "core/error.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_backward.h"
#include "kernels/cpu/elementwise_backward.h"
#include "kernels/canonical.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/log_softmax_backward.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/moe_backward.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/rope_backward.h"
#include "test_grad_helpers.h"

namespace lockstep {
namespace {

namespace ref = reference;
using ref::Vec;
using testing::dot;
using testing::finite_difference_error;
using testing::random_vector;
using testing::rel_err;
using testing::to_double;

constexpr double kFdTol = 1e-6;    // float64 reference vs central differences
constexpr double kKernelTol = 2e-5;  // fp32 kernel vs float64 reference (relative to max)

TEST(BackwardOps, Linear) {
  struct S { int64_t T, N, K; };
  for (S s : {S{1, 3, 5}, S{7, 9, 13}, S{37, 24, 40}, S{70, 17, 8}}) {
    auto x = random_vector(s.T * s.K, 1), w = random_vector(s.N * s.K, 2), dy = random_vector(s.T * s.N, 3);
    Vec xd = to_double(x), wd = to_double(w), dyd = to_double(dy), dx_ref, dw_ref;
    ref::linear_backward(xd, wd, dyd, dx_ref, dw_ref, s.T, s.N, s.K);
    auto loss = [&] { return dot(ref::linear(xd, wd, s.T, s.N, s.K), dyd); };
    EXPECT_LT(finite_difference_error(xd, dx_ref, loss), kFdTol);
    EXPECT_LT(finite_difference_error(wd, dw_ref, loss), kFdTol);
    std::vector<float> dx(s.T * s.K), dw(s.N * s.K);
    cpu::linear_input_grad(dy.data(), w.data(), dx.data(), s.T, s.N, s.K);
    cpu::linear_weight_grad(dy.data(), x.data(), dw.data(), s.N, s.K, cpu::token_chunks(s.T));
    EXPECT_LT(rel_err(dx, dx_ref), kKernelTol) << s.T << "x" << s.N << "x" << s.K;
    EXPECT_LT(rel_err(dw, dw_ref), kKernelTol) << s.T << "x" << s.N << "x" << s.K;
  }
}

TEST(BackwardOps, RmsNorm) {
  const int64_t rows = 21, n = 24, heads = 3;  // 7 tokens of 3 heads
  const double eps = 1e-6;
  auto x = random_vector(rows * n, 4), w = random_vector(n, 5), dy = random_vector(rows * n, 6);
  Vec xd = to_double(x), wd = to_double(w), dyd = to_double(dy), dx_ref, dw_ref;
  ref::rmsnorm_backward(xd, wd, dyd, dx_ref, dw_ref, rows, n, eps);
  auto loss = [&] { return dot(ref::rmsnorm(xd, wd, rows, n, eps), dyd); };
  EXPECT_LT(finite_difference_error(xd, dx_ref, loss), kFdTol);
  EXPECT_LT(finite_difference_error(wd, dw_ref, loss), kFdTol);
  std::vector<float> dx(rows * n), dw(n);
  cpu::rmsnorm_backward(x.data(), w.data(), dy.data(), dx.data(), dw.data(), rows, n, float(eps), false,
                        cpu::token_chunks(rows / heads, heads));
  EXPECT_LT(rel_err(dx, dx_ref), kKernelTol);
  EXPECT_LT(rel_err(dw, dw_ref), kKernelTol);
}

TEST(BackwardOps, Rope) {
  const int64_t d = 16, heads = 3;
  auto table = cpu::RopeTable::build(d, 200, 10000.0);
  std::vector<int32_t> pos = {0, 1, 5, 63, 64, 199};
  const int64_t T = int64_t(pos.size());
  auto x = random_vector(T * heads * d, 7), dy = random_vector(T * heads * d, 8);
  Vec cs = to_double(table.cos), sn = to_double(table.sin), xd = to_double(x), dyd = to_double(dy);
  // d(dy . rope(x)) / dx = rope^T dy: the reference is the transpose, by finite differences.
  std::vector<float> dx = dy;
  cpu::rope_backward(dx.data(), pos.data(), T, heads, table);
  Vec dx_d = to_double(dx);
  auto loss = [&] { return dot(ref::rope(xd, pos, heads, d, cs, sn), dyd); };
  EXPECT_LT(finite_difference_error(xd, dx_d, loss, 96), 1e-6);
  // And the kernel is exactly the inverse rotation (to fp32 rounding).
  std::vector<float> y = x;
  cpu::rope(y.data(), pos.data(), T, heads, table);
  cpu::rope_backward(y.data(), pos.data(), T, heads, table);
  EXPECT_LT(rel_err(y, xd), 1e-6);
}

TEST(BackwardOps, SwiGlu) {
  const int64_t n = 200;
  auto g = random_vector(n, 9, 4.0f), u = random_vector(n, 10), dy = random_vector(n, 11);
  Vec gd = to_double(g), ud = to_double(u), dyd = to_double(dy), dg_ref, du_ref;
  ref::swiglu_backward(gd, ud, dyd, dg_ref, du_ref);
  auto loss = [&] { return dot(ref::swiglu(gd, ud), dyd); };
  EXPECT_LT(finite_difference_error(gd, dg_ref, loss, 200), kFdTol);
  EXPECT_LT(finite_difference_error(ud, du_ref, loss, 200), kFdTol);
  std::vector<float> dg(n), du(n);
  cpu::swiglu_backward(g.data(), u.data(), dy.data(), dg.data(), du.data(), n);
  EXPECT_LT(rel_err(dg, dg_ref), kKernelTol);
  EXPECT_LT(rel_err(du, du_ref), kKernelTol);
}

TEST(BackwardOps, Embedding) {
  const int64_t T = 50, V = 11, H = 9;
  std::vector<int32_t> ids(T);
  for (int64_t t = 0; t < T; ++t) ids[t] = int32_t((t * 7 + t / 3) % (V - 2));  // rows V-2, V-1 unused
  auto dy = random_vector(T * H, 12);
  Vec ref_grad(V * H, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) ref_grad[ids[t] * H + h] += dy[t * H + h];
  std::vector<float> got(V * H, 1.0f);
  cpu::embedding_backward(ids.data(), dy.data(), got.data(), T, V, H);
  EXPECT_LT(rel_err(got, ref_grad), kKernelTol);
  for (int64_t i = (V - 2) * H; i < V * H; ++i) EXPECT_EQ(got[i], 0.0f);
  // The gradient of a lookup is linear in dy: finite differences of dy . table[ids].
  Vec table = to_double(random_vector(V * H, 13)), dyd = to_double(dy);
  auto loss = [&] {
    double s = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) s += dyd[t * H + h] * table[ids[t] * H + h];
    return s;
  };
  EXPECT_LT(finite_difference_error(table, ref_grad, loss), kFdTol);
}

// A vocab-parallel slice of the embedding gradient: the same bits as the full table's rows
// for every split (token ids spread over the slices, repeated ids, T over several chunks).
TEST(BackwardOps, EmbeddingBackwardRowsEqualsFullTableRows) {
  const int64_t T = 300, V = 50, H = 24;
  std::vector<int32_t> ids(T);
  for (int64_t t = 0; t < T; ++t) ids[t] = int32_t((t * 7 + t / 13) % V);
  const auto dy = random_vector(T * H, 21);
  std::vector<float> full(V * H);
  cpu::embedding_backward(ids.data(), dy.data(), full.data(), T, V, H);
  for (auto [begin, rows] : std::vector<std::pair<int64_t, int64_t>>{{0, 50}, {0, 7}, {7, 13}, {20, 30}, {49, 1}}) {
    std::vector<float> slice(rows * H, 5.0f);
    cpu::embedding_backward_rows(ids.data(), dy.data(), slice.data(), T, V, begin, rows, H);
    EXPECT_EQ(std::memcmp(slice.data(), full.data() + begin * H, slice.size() * sizeof(float)), 0)
        << "rows [" << begin << ", " << begin + rows << ")";
  }
  std::vector<float> out(H);
  EXPECT_THROW(cpu::embedding_backward_rows(ids.data(), dy.data(), out.data(), T, V, 45, 10, H), Error);
}

// The vocab-parallel forms: for every split into 1, 2, 4 or 8 slices of whole canonical
// chunks, the entropy leaves give softmax_entropy's bits through tree8, and each slice's
// gradient is the full-row gradient's columns, bit for bit (targets in and out of a slice).
TEST(BackwardOps, LogSoftmaxSlicesEqualFullRows) {
  const int64_t T = 6, V = 203;  // chunks of 26: the last chunk short
  const auto z = random_vector(T * V, 31, 4.0f), a = random_vector(T, 32), b = random_vector(T, 33);
  const std::vector<int32_t> target = {0, 202, 25, 26, 130, 77};
  std::vector<float> entropy(T), full(T * V), lse(T);
  cpu::softmax_entropy(z.data(), entropy.data(), T, V);
  cpu::log_softmax_gather_backward(z.data(), target.data(), a.data(), b.data(), entropy.data(), full.data(), T, V);
  for (int64_t t = 0; t < T; ++t) lse[t] = cpu::log_normalizer(z.data() + t * V, V);
  const int64_t len = canonical_chunk(V);
  for (int parts : {1, 2, 4, 8}) {
    const int per = kTMax / parts;
    std::vector<float> leaves(T * kTMax);
    for (int r = 0; r < parts; ++r) {
      const int64_t begin = std::min(V, r * per * len), end = std::min(V, (r + 1) * per * len), VL = end - begin;
      std::vector<float> slice(T * VL), mine(T * per), dz(T * VL, 7.0f);
      for (int64_t t = 0; t < T; ++t) std::copy_n(z.data() + t * V + begin, VL, slice.data() + t * VL);
      cpu::softmax_entropy_parts(slice.data(), lse.data(), mine.data(), T, V, VL, r * per, per);
      for (int64_t t = 0; t < T; ++t)
        for (int i = 0; i < per; ++i) leaves[t * kTMax + r * per + i] = mine[t * per + i];
      cpu::log_softmax_gather_backward_slice(slice.data(), lse.data(), target.data(), a.data(), b.data(),
                                             entropy.data(), dz.data(), T, begin, VL);
      for (int64_t t = 0; t < T; ++t)
        EXPECT_EQ(std::memcmp(dz.data() + t * VL, full.data() + t * V + begin, size_t(VL) * sizeof(float)), 0)
            << parts << " slices, slice " << r << ", row " << t;
    }
    for (int64_t t = 0; t < T; ++t) {
      const float h = -tree8(leaves.data() + t * kTMax);
      EXPECT_EQ(std::memcmp(&h, &entropy[t], sizeof(float)), 0) << parts << " slices, row " << t;
    }
  }
}

TEST(BackwardOps, LogSoftmaxGatherWithEntropy) {
  const int64_t T = 5, V = 37;
  auto z = random_vector(T * V, 14, 3.0f), a = random_vector(T, 15), b = random_vector(T, 16);
  std::vector<int32_t> target = {0, 36, 5, 17, 17};
  Vec zd = to_double(z), ad = to_double(a), bd = to_double(b);
  auto loss = [&] {
    Vec lp, h;
    ref::log_softmax_entropy(zd, target, T, V, lp, h);
    return dot(lp, ad) + dot(h, bd);
  };
  // Analytic reference: dlogp (1[v=target] - p) - dH p (log p + H).
  Vec lp, h, dz_ref(T * V);
  ref::log_softmax_entropy(zd, target, T, V, lp, h);
  for (int64_t t = 0; t < T; ++t) {
    double m = *std::max_element(zd.begin() + t * V, zd.begin() + (t + 1) * V), s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(zd[t * V + v] - m);
    for (int64_t v = 0; v < V; ++v) {
      double lpv = zd[t * V + v] - m - std::log(s), p = std::exp(lpv);
      dz_ref[t * V + v] = ad[t] * ((v == target[t]) - p) - bd[t] * p * (lpv + h[t]);
    }
  }
  EXPECT_LT(finite_difference_error(zd, dz_ref, loss, 185), kFdTol);
  std::vector<float> ent(T), dz(T * V);
  cpu::softmax_entropy(z.data(), ent.data(), T, V);
  EXPECT_LT(rel_err(ent, h), 1e-5);
  cpu::log_softmax_gather_backward(z.data(), target.data(), a.data(), b.data(), ent.data(), dz.data(), T, V);
  EXPECT_LT(rel_err(dz, dz_ref), kKernelTol);
  // Without the entropy term.
  for (int64_t i = 0; i < T * V; ++i) dz_ref[i] = 0;
  std::vector<float> dz2(T * V);
  cpu::log_softmax_gather_backward(z.data(), target.data(), a.data(), nullptr, nullptr, dz2.data(), T, V);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t v = 0; v < V; ++v) {
      double lse = zd[t * V + target[t]] - lp[t], p = std::exp(zd[t * V + v] - lse);
      dz_ref[t * V + v] = ad[t] * ((v == target[t]) - p);
    }
  EXPECT_LT(rel_err(dz2, dz_ref), kKernelTol);
}

// Attention over two whole sequences (70 and 9 tokens: the first crosses a 64-position
// block), with pages of 16 positions placed out of order.
TEST(BackwardOps, PagedAttention) {
  const int64_t heads = 4, nkv = 2, d = 8, page = 16;
  const std::vector<int64_t> lens = {70, 9};
  std::vector<std::vector<int32_t>> tables = {{6, 0, 3, 1, 7}, {2}};
  std::vector<int32_t> positions;
  std::vector<const int32_t*> page_ptrs;
  ref::Attention a{0, heads, nkv, d, 1.0 / std::sqrt(double(d)), {}};
  for (size_t s = 0; s < lens.size(); ++s)
    for (int64_t t = 0; t < lens[s]; ++t) {
      a.seq_start.push_back(a.T - t);
      ++a.T;
      positions.push_back(int32_t(t));
      page_ptrs.push_back(tables[s].data());
    }
  const int64_t T = a.T;
  auto q = random_vector(T * heads * d, 17, 2.0f), k = random_vector(T * nkv * d, 18, 2.0f),
       v = random_vector(T * nkv * d, 19), dout = random_vector(T * heads * d, 20);
  Vec qd = to_double(q), kd = to_double(k), vd = to_double(v), dod = to_double(dout), dq_ref, dk_ref, dv_ref;
  a.backward(qd, kd, vd, dod, dq_ref, dk_ref, dv_ref);
  auto loss = [&] { return dot(a.forward(qd, kd, vd), dod); };
  EXPECT_LT(finite_difference_error(qd, dq_ref, loss, 24), kFdTol);
  EXPECT_LT(finite_difference_error(kd, dk_ref, loss, 24), kFdTol);
  EXPECT_LT(finite_difference_error(vd, dv_ref, loss, 24), kFdTol);

  std::vector<float> kbuf(8 * page * nkv * d), vbuf(8 * page * nkv * d), out(T * heads * d);
  PagedKvLayer kv{kbuf.data(), vbuf.data(), 8, page, nkv, d};
  TokenSlots slots{positions.data(), page_ptrs.data()};
  cpu::kv_write(kv, slots, k.data(), v.data(), T);
  cpu::paged_attention(q.data(), out.data(), kv, slots, T, heads, float(a.scale));
  EXPECT_LT(rel_err(out, a.forward(qd, kd, vd)), 1e-5);
  std::vector<float> dq(T * heads * d), dk(T * nkv * d), dv(T * nkv * d);
  cpu::paged_attention_backward(q.data(), out.data(), dout.data(), kv, slots, T, heads, float(a.scale), dq.data(),
                                dk.data(), dv.data());
  EXPECT_LT(rel_err(dq, dq_ref), kKernelTol);
  EXPECT_LT(rel_err(dk, dk_ref), kKernelTol);
  EXPECT_LT(rel_err(dv, dv_ref), kKernelTol);

  // A sequence missing a position cannot be differentiated through: a clear error.
  std::vector<int32_t> bad_pos = positions;
  bad_pos[3] = 80;
  TokenSlots bad{bad_pos.data(), page_ptrs.data()};
  EXPECT_THROW(cpu::paged_attention_backward(q.data(), out.data(), dout.data(), kv, bad, T, heads, float(a.scale),
                                             dq.data(), dk.data(), dv.data()),
               Error);
}

class MoeBackward : public ::testing::TestWithParam<bool> {};

TEST_P(MoeBackward, RouterExpertsAndCombine) {
  const bool normalize = GetParam();
  const int64_t T = 19, H = 16, I = 8, E = 6, k = 2;
  auto x = random_vector(T * H, 21), router = random_vector(E * H, 22, 0.5f), dout = random_vector(T * H, 23);
  std::vector<std::vector<float>> gate, up, down;
  for (int64_t e = 0; e < E; ++e) {
    gate.push_back(random_vector(I * H, 30 + e, 0.5f));
    up.push_back(random_vector(I * H, 40 + e, 0.5f));
    down.push_back(random_vector(H * I, 50 + e, 0.5f));
  }
  std::vector<float> logits(T * E);
  std::vector<const float*> gp, upp, dp;
  for (int64_t e = 0; e < E; ++e) gp.push_back(gate[e].data()), upp.push_back(up[e].data()), dp.push_back(down[e].data());
  std::vector<float> out(T * H);
  cpu::moe_forward(x.data(), router.data(), gp.data(), upp.data(), dp.data(), out.data(), T, H, I, E, k, normalize,
                   false, logits.data());

  // Reference with the kernel's routing fixed (finite differences do not cross a routing change).
  ref::Moe m{T, H, I, E, k, normalize, std::vector<int32_t>(T * k)};
  std::vector<float> w(T * k);
  cpu::route_topk(logits.data(), T, E, k, normalize, m.ids.data(), w.data());
  Vec xd = to_double(x), rd = to_double(router), dod = to_double(dout);
  std::vector<Vec> gd, ud, dd;
  for (int64_t e = 0; e < E; ++e) gd.push_back(to_double(gate[e])), ud.push_back(to_double(up[e])), dd.push_back(to_double(down[e]));
  EXPECT_LT(rel_err(out, m.forward(xd, rd, gd, ud, dd)), 1e-5);
  auto loss = [&] { return dot(m.forward(xd, rd, gd, ud, dd), dod); };

  // Kernel backward.
  std::vector<float> dx(T * H), drouter(E * H);
  std::vector<std::vector<float>> dg(E, std::vector<float>(I * H)), du(E, std::vector<float>(I * H)),
      ddn(E, std::vector<float>(H * I));
  std::vector<float*> dgp, dup, ddp;
  for (int64_t e = 0; e < E; ++e) dgp.push_back(dg[e].data()), dup.push_back(du[e].data()), ddp.push_back(ddn[e].data());
  cpu::moe_backward(x.data(), logits.data(), router.data(), gp.data(), upp.data(), dp.data(), dout.data(), dx.data(),
                    drouter.data(), dgp.data(), dup.data(), ddp.data(), T, H, I, E, k, normalize, false);

  // The analytic float64 gradient of each input, by finite differences of the reference
  // (the reference forward is exact in float64; a few entries of each tensor).
  auto numeric = [&](Vec& p, const std::vector<float>& got) {
    Vec g = to_double(got);
    return finite_difference_error(p, g, loss, 24, 1e-5);
  };
  EXPECT_LT(numeric(xd, dx), 1e-4);
  EXPECT_LT(numeric(rd, drouter), 1e-4);
  for (int64_t e = 0; e < E; ++e) {
    EXPECT_LT(numeric(gd[e], dg[e]), 1e-4) << "expert " << e;
    EXPECT_LT(numeric(ud[e], du[e]), 1e-4) << "expert " << e;
    EXPECT_LT(numeric(dd[e], ddn[e]), 1e-4) << "expert " << e;
  }
}

INSTANTIATE_TEST_SUITE_P(Normalize, MoeBackward, ::testing::Values(true, false));

}  // namespace
}  // namespace lockstep
