// The tensor-core paged attention: a query row's bits do not depend on how the step's tokens
// are cut into tiles (one token per tile as in decode, many as in prefill), on which other
// sequences share the step, or on the page size and page placement of the KV cache; and the
// values match a float64 reference of softmax(q K^T * scale) V; the warpgroup-MMA and mma.sync
// kernels give the same bits.
#include <cmath>
#include <numeric>
#include <random>

#include "cuda_test_util.h"
#include "kernels/cuda/attention.h"

namespace lockstep {
namespace {

using testing::DeviceVec;
using testing::random_bf16;

struct Shape {
  int64_t D, nq, nkv;
};

// Logical K/V of one sequence: [len, nkv, D] bf16 bits.
struct SeqKv {
  std::vector<uint16_t> k, v;
};

struct Step {
  // Per token: sequence index and position; tiles: (first token, tokens).
  std::vector<int32_t> seq, pos;
  std::vector<int32_t> tiles;
};

// Runs one attention launch with the sequences' K/V laid out in pages of `page_size`, the
// pages of all sequences shuffled by `seed`; with `lse`, each row's log-sum-exp there too.
std::vector<uint16_t> run(const Shape& sh, const std::vector<SeqKv>& seqs, const std::vector<int64_t>& lens,
                          const std::vector<uint16_t>& q_all, const Step& step, int64_t page_size, uint64_t seed,
                          cuda::AttentionKernel kernel = cuda::AttentionKernel::automatic,
                          std::vector<float>* lse = nullptr) {
  const int64_t T = int64_t(step.seq.size()), S = int64_t(seqs.size());
  int64_t stride = 1, pages = 0;
  for (int64_t len : lens) stride = std::max(stride, (len + page_size - 1) / page_size);
  pages = S * stride;
  std::vector<int32_t> perm(static_cast<size_t>(pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> tables(size_t(S * stride));
  for (int64_t i = 0; i < S * stride; ++i) tables[size_t(i)] = perm[size_t(i)];
  const int64_t row = sh.nkv * sh.D;
  std::vector<uint16_t> kc(size_t(pages * page_size * row), 0x7fc0), vc(kc.size(), 0x7fc0);  // NaN where unused
  for (int64_t s = 0; s < S; ++s)
    for (int64_t p = 0; p < lens[size_t(s)]; ++p) {
      const int64_t slot = int64_t(tables[size_t(s * stride + p / page_size)]) * page_size + p % page_size;
      std::copy_n(seqs[size_t(s)].k.begin() + p * row, row, kc.begin() + slot * row);
      std::copy_n(seqs[size_t(s)].v.begin() + p * row, row, vc.begin() + slot * row);
    }
  DeviceVec<uint16_t> K(kc), V(vc), Q(q_all), O(T * sh.nq * sh.D);
  O.poison();
  DeviceVec<int32_t> Pos(step.pos), Seq(step.seq), Tables(tables), Stride(std::vector<int32_t>{int32_t(stride)});
  DeviceVec<int32_t> Tiles(step.tiles), NTiles(std::vector<int32_t>{int32_t(step.tiles.size() / 2)});
  cuda::DeviceKvLayer kv;
  kv.k = reinterpret_cast<cuda::bf16_t*>(K.get());
  kv.v = reinterpret_cast<cuda::bf16_t*>(V.get());
  kv.page_size = page_size;
  kv.kv_heads = sh.nkv;
  kv.head_dim = sh.D;
  cuda::DeviceSlots slots;
  slots.positions = Pos.get();
  slots.seq_of_token = Seq.get();
  slots.page_tables = Tables.get();
  slots.table_stride = Stride.get();
  slots.tiles = Tiles.get();
  slots.num_tiles = NTiles.get();
  slots.max_tiles = T;  // more slots than tiles: the extra CTAs must do nothing
  const auto* q = reinterpret_cast<const cuda::bf16_t*>(Q.get());
  auto* o = reinterpret_cast<cuda::bf16_t*>(O.get());
  const float scale = 1.0f / std::sqrt(float(sh.D));
  DeviceVec<float> Lse(T * sh.nq);
  Lse.poison();
  float* lse_out = lse ? Lse.get() : nullptr;
  if (kernel == cuda::AttentionKernel::automatic)
    cuda::paged_attention(q, o, kv, slots, T, sh.nq, scale, nullptr, lse_out);
  else
    cuda::flash_attention(q, o, kv, slots, sh.nq, scale, nullptr, kernel, lse_out);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (lse) *lse = Lse.take();
  return O.take();
}

// Tiles of at most `max_tokens` cut from runs of one sequence; `cuts` adds extra random cuts.
std::vector<int32_t> make_tiles(const std::vector<int32_t>& seq, int64_t max_tokens, uint64_t cuts) {
  std::mt19937_64 rng(cuts);
  std::vector<int32_t> tiles;
  for (size_t t = 0; t < seq.size(); ++t) {
    const bool extend = t > 0 && seq[t] == seq[t - 1] && tiles.back() < max_tokens && (cuts == 0 || rng() % 3 != 0);
    if (extend) {
      ++tiles.back();
    } else {
      tiles.push_back(int32_t(t));
      tiles.push_back(1);
    }
  }
  return tiles;
}

// The query row of (sequence s, position p), the same in every step that holds it.
std::vector<uint16_t> query(const Shape& sh, int64_t s, int64_t p, uint64_t q_seed, float scale) {
  return random_bf16(sh.nq * sh.D, q_seed * uint64_t(s + 1) + uint64_t(p), scale);
}
// Random K/V of sequences of `lens` (K scaled by `scale`) and one step holding every position
// of every sequence, sequence after sequence, with their queries.
struct WholeSequences {
  std::vector<SeqKv> seqs;
  Step step;
  std::vector<uint16_t> q;
};
WholeSequences whole_sequences(const Shape& sh, const std::vector<int64_t>& lens, uint64_t kv_seed, uint64_t q_seed,
                               float scale) {
  WholeSequences w;
  for (size_t s = 0; s < lens.size(); ++s)
    w.seqs.push_back({random_bf16(lens[s] * sh.nkv * sh.D, kv_seed + s, scale),
                      random_bf16(lens[s] * sh.nkv * sh.D, kv_seed + 10 + s)});
  for (int64_t s = 0; s < int64_t(lens.size()); ++s)
    for (int64_t p = 0; p < lens[size_t(s)]; ++p) {
      w.step.seq.push_back(int32_t(s));
      w.step.pos.push_back(int32_t(p));
      const auto q = query(sh, s, p, q_seed, scale);
      w.q.insert(w.q.end(), q.begin(), q.end());
    }
  return w;
}

void check_shape(const Shape& sh) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t G = sh.nq / sh.nkv, per_tile = cuda::attention_tile_tokens(G);
  const std::vector<int64_t> lens{150, 67, 1};
  // Prefill: all tokens of the three sequences in one step.
  auto whole = whole_sequences(sh, lens, 10, 1000, 2.0f);
  const auto& seqs = whole.seqs;
  const auto& q_prefill = whole.q;
  auto query_of = [&](int64_t s, int64_t p) { return query(sh, s, p, 1000, 2.0f); };
  const int64_t qrow = sh.nq * sh.D;
  Step prefill = whole.step;
  prefill.tiles = make_tiles(prefill.seq, per_tile, 0);
  std::vector<float> want_lse;
  const auto want = run(sh, seqs, lens, q_prefill, prefill, 16, 1, cuda::AttentionKernel::automatic, &want_lse);
  auto row_of = [&](const std::vector<uint16_t>& out, int64_t t) {
    return std::vector<uint16_t>(out.begin() + t * qrow, out.begin() + (t + 1) * qrow);
  };
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NE(want[i], 0xffff) << "output " << i << " not written";

  // float64 reference of every row; the log-sum-exp within the bf16 rounding of P's sum.
  double err2 = 0, ref2 = 0, lse_err = 0;
  for (int64_t t = 0; t < int64_t(prefill.seq.size()); ++t) {
    const int64_t s = prefill.seq[size_t(t)], pos = prefill.pos[size_t(t)];
    for (int64_t h = 0; h < sh.nq; ++h) {
      const int64_t kvh = h / G;
      std::vector<double> sc(size_t(pos + 1));
      double mx = -1e300;
      for (int64_t j = 0; j <= pos; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < sh.D; ++d)
          dot += double(bf16_to_f32(q_prefill[size_t(t * qrow + h * sh.D + d)])) *
                 double(bf16_to_f32(seqs[size_t(s)].k[size_t((j * sh.nkv + kvh) * sh.D + d)]));
        sc[size_t(j)] = dot / std::sqrt(double(sh.D));
        mx = std::max(mx, sc[size_t(j)]);
      }
      double sum = 0;
      for (auto& x : sc) sum += (x = std::exp(x - mx));
      lse_err = std::max(lse_err, std::fabs(double(want_lse[size_t(t * sh.nq + h)]) - (mx + std::log(sum))));
      for (int64_t d = 0; d < sh.D; ++d) {
        double o = 0;
        for (int64_t j = 0; j <= pos; ++j)
          o += sc[size_t(j)] * double(bf16_to_f32(seqs[size_t(s)].v[size_t((j * sh.nkv + kvh) * sh.D + d)]));
        o /= sum;
        const double got = bf16_to_f32(want[size_t(t * qrow + h * sh.D + d)]);
        err2 += (got - o) * (got - o);
        ref2 += o * o;
      }
    }
  }
  EXPECT_LT(std::sqrt(err2 / ref2), 1e-2) << "relative error against float64";
  EXPECT_LT(lse_err, 1e-2) << "log-sum-exp against float64";

  // Other tile cuts, page sizes and page placements: the same bits.
  for (uint64_t cuts : {1, 2, 3}) {
    Step other = prefill;
    other.tiles = make_tiles(other.seq, 1 + int64_t(cuts * 5) % per_tile, cuts);
    std::vector<float> lse;
    EXPECT_EQ(run(sh, seqs, lens, q_prefill, other, int64_t(1 + cuts * 7), 100 + cuts, cuda::AttentionKernel::automatic,
                  &lse),
              want)
        << "cuts " << cuts;
    EXPECT_TRUE(testing::same_bits_f(lse, want_lse)) << "log-sum-exp, cuts " << cuts;
  }

  // Decode-like steps: each token of sequence 0 alone, beside one token of sequence 1, in
  // reversed batch order; one token per tile.
  for (int64_t p = 0; p < lens[0]; p += 13) {
    Step d;
    std::vector<uint16_t> q;
    const int64_t p1 = p % lens[1];
    for (int64_t s : {int64_t(1), int64_t(0)}) {
      d.seq.push_back(int32_t(s));
      d.pos.push_back(int32_t(s == 0 ? p : p1));
      auto qq = query_of(s, s == 0 ? p : p1);
      q.insert(q.end(), qq.begin(), qq.end());
    }
    d.tiles = make_tiles(d.seq, per_tile, 0);
    auto got = run(sh, seqs, lens, q, d, 64, 7 + p);
    EXPECT_EQ(row_of(got, 1), row_of(want, p)) << "decode position " << p;
    EXPECT_EQ(row_of(got, 0), row_of(want, lens[0] + p1)) << "decode neighbour position " << p1;
  }
}

// The warpgroup-MMA kernel (what head_dim 64 and 128 run) and the mma.sync kernel give the
// same bits, prefill-like and decode-like tiles alike, with masked keys and rows.
void check_kernels_agree(const Shape& sh) {
  LS_SKIP_WITHOUT_GPU();
  ASSERT_TRUE(cuda::attention_takes_wgmma(sh.D));
  const int64_t per_tile = cuda::attention_tile_tokens(sh.nq / sh.nkv);
  const std::vector<int64_t> lens{203, 70};
  const auto whole = whole_sequences(sh, lens, 30, 5000, 3.0f);
  const auto& seqs = whole.seqs;
  const auto& q = whole.q;
  const Step& step = whole.step;
  for (uint64_t cuts : {uint64_t(0), uint64_t(4)}) {  // full tiles, then short ones (decode-like)
    Step st = step;
    st.tiles = make_tiles(st.seq, cuts ? 1 + int64_t(cuts) % per_tile : per_tile, cuts);
    const auto mma = run(sh, seqs, lens, q, st, 16, 3, cuda::AttentionKernel::mma_sync);
    const auto wg = run(sh, seqs, lens, q, st, 16, 3, cuda::AttentionKernel::wgmma);
    for (size_t i = 0; i < mma.size(); ++i) ASSERT_NE(mma[i], 0xffff) << "output " << i << " not written";
    EXPECT_EQ(wg, mma) << "cuts " << cuts;
    // Pages of 64 and 128 positions (one page-table read per KV block): the same bits.
    EXPECT_EQ(run(sh, seqs, lens, q, st, 64, 4, cuda::AttentionKernel::wgmma), mma) << "cuts " << cuts;
    EXPECT_EQ(run(sh, seqs, lens, q, st, 128, 5, cuda::AttentionKernel::mma_sync), mma) << "cuts " << cuts;
  }
}

TEST(CudaAttention, WgmmaEqualsMmaSyncHeadDim128) { check_kernels_agree({128, 32, 4}); }
TEST(CudaAttention, WgmmaEqualsMmaSyncHeadDim64) { check_kernels_agree({64, 15, 3}); }

TEST(CudaAttention, HeadDim128Group8) { check_shape({128, 16, 2}); }
TEST(CudaAttention, HeadDim16Group2) { check_shape({16, 4, 2}); }
TEST(CudaAttention, HeadDim64Group5) { check_shape({64, 15, 3}); }

}  // namespace
}  // namespace lockstep
