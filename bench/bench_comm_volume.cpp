// Communication volume per transformer layer for the TP, TP+SP and EP forms on
// Qwen3-30B-A3B shapes (hidden 2048, 32 x 128 q heads, 4 kv heads, 128 experts top-8,
// moe_intermediate 768), measured by counting the bytes each rank hands to the
// communicator while the real collectives run (ranks are threads of this process,
// wrapped in CountingCommunicator). Compared with the analytic ring all-reduce of the
// layer output in fp32, 2(T-1)/T x tokens x hidden x 4 bytes, the usual per-collective
// baseline.
//
// This is a model of the collectives one layer issues, not a run of the model:
//   tp      o_proj partials: canonical_all_reduce (fp32); expert down_proj with etp = T:
//           canonical_all_reduce (fp32).
//   tp+sp   each of the two row-parallel outputs: canonical_reduce_scatter (fp32
//           partials) + sp_all_gather of the bf16 activations before the next
//           column-parallel linear.
//   ep      (tp 1, T ranks with their own tokens) dispatch: all_to_all_v of one bf16 copy
//           of a token per destination rank holding >= 1 of its 8 experts; combine: one
//           fp32 output per (token, expert) pair, not pre-summed, because the token's
//           output is the fp32 sum in ascending expert id (docs/numerics.md, rule 4).
//   vocab   log-softmax (max, sumexp) combine over vocab-parallel ranks.
//
// Usage: bench_comm_volume [tokens per rank, default 1024]
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "core/philox.h"
#include "dist/counting_communicator.h"
#include "dist/deterministic_collectives.h"
#include "dist/thread_communicator.h"

using namespace lockstep;
using namespace lockstep::dist;

namespace {

constexpr int64_t kHidden = 2048;
constexpr int kExperts = 128;
constexpr int kTopK = 8;

// Runs fn on T thread ranks and returns rank 0's counted volume.
CommVolume measure(int t, const std::function<void(Communicator&)>& fn) {
  CommVolume v0;
  std::mutex mu;
  run_threads(t, [&](Communicator& inner) {
    CountingCommunicator c(inner);
    fn(c);
    if (c.rank() == 0) {
      std::lock_guard lk(mu);
      v0 = c.volume();
    }
  });
  return v0;
}

double ring_all_reduce(int t, double bytes) { return 2.0 * (t - 1) / t * bytes; }

void row(const char* form, int t, const char* what, const char* dtype, double counted, double baseline) {
  std::printf("%-6s %2d  %-44s %-5s %14.0f %14.0f %7.3f\n", form, t, what, dtype, counted, baseline,
              counted / baseline);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 1024;
  if (n <= 0) {
    std::fprintf(stderr, "usage: bench_comm_volume [tokens per rank > 0]\n");
    return 2;
  }
  const double out_bytes = double(n) * kHidden * 4;  // one layer output in fp32
  std::printf("Qwen3-30B-A3B shapes, %lld tokens per rank; bytes leaving rank 0 per layer.\n",
              static_cast<long long>(n));
  std::printf("baseline = ring all-reduce of the fp32 layer output %lld x %lld (2(T-1)/T x %.0f B)\n\n",
              static_cast<long long>(n), static_cast<long long>(kHidden), out_bytes);
  std::printf("%-6s %2s  %-44s %-5s %14s %14s %7s\n", "form", "T", "collectives (per layer)", "dtype",
              "counted B", "ring AR B", "ratio");

  for (int t : {2, 4, 8}) {
    const double base = ring_all_reduce(t, out_bytes);

    // TP: o_proj and expert down_proj (etp = T) outputs, each a canonical all-reduce.
    CommVolume tp = measure(t, [&](Communicator& c) {
      std::vector<float> x(n * kHidden, 1.0f);
      canonical_all_reduce(c, x.data(), n * kHidden);  // attention o_proj
      canonical_all_reduce(c, x.data(), n * kHidden);  // expert down_proj, etp = T
    });
    row("tp", t, "2 x canonical_all_reduce", "f32", tp.total(), 2 * base);

    // TP+SP: reduce-scatter of partials and all-gather of bf16 activations, twice.
    CommVolume sp = measure(t, [&](Communicator& c) {
      std::vector<float> x(n * kHidden, 1.0f);
      std::vector<float> mine(sp_row_range(n, t, c.rank()).size() * kHidden);
      std::vector<uint16_t> act_local(mine.size()), act_full(n * kHidden);
      for (int k = 0; k < 2; ++k) {
        canonical_reduce_scatter(c, x.data(), n, kHidden, mine.data());
        sp_all_gather(c, act_local.data(), n, kHidden * sizeof(uint16_t), act_full.data());
      }
    });
    row("tp+sp", t, "2 x (reduce_scatter f32 + all_gather bf16)", "mix", sp.total(), 2 * base);

    // EP: dispatch and combine of top-8 routed tokens (uniform pseudo-random routing).
    CommVolume ep_dispatch, ep_combine;
    std::mutex mu;
    run_threads(t, [&](Communicator& inner) {
      CountingCommunicator c(inner);
      const int r = c.rank(), per_rank = kExperts / t;
      std::vector<size_t> tok(t, 0), pairs(t, 0);
      for (int64_t i = 0; i < n; ++i) {
        std::vector<bool> chosen(kExperts, false), dest(t, false);
        for (int k = 0, draw = 0; k < kTopK; ++draw) {
          int e = static_cast<int>(philox_uniform(7 + draw, r, i) * kExperts);
          if (chosen[e]) continue;
          chosen[e] = true;
          ++k;
          ++pairs[e / per_rank];
          dest[e / per_rank] = true;
        }
        for (int q = 0; q < t; ++q) tok[q] += dest[q];
      }
      // Tell every rank how much it will receive, then move the data.
      std::vector<size_t> s_disp(t), r_tok(t), r_pairs(t);
      c.all_to_all(tok.data(), r_tok.data(), sizeof(size_t));
      c.all_to_all(pairs.data(), r_pairs.data(), sizeof(size_t));
      c.reset();  // count the payload only
      auto bytes = [](std::vector<size_t> v, size_t each) {
        for (auto& x : v) x *= each;
        return v;
      };
      auto sc = bytes(tok, kHidden * 2), rc = bytes(r_tok, kHidden * 2);
      auto sd = displacements(sc), rd = displacements(rc);
      std::vector<uint8_t> sbuf(sd.back() + sc.back()), rbuf(rd.back() + rc.back());
      c.all_to_all_v(sbuf.data(), sc, sd, rbuf.data(), rc, rd);
      CommVolume d = c.volume();
      c.reset();
      // Combine goes back the other way: each rank returns fp32 outputs per pair it received.
      auto sc2 = bytes(r_pairs, kHidden * 4), rc2 = bytes(pairs, kHidden * 4);
      auto sd2 = displacements(sc2), rd2 = displacements(rc2);
      std::vector<uint8_t> sbuf2(sd2.back() + sc2.back()), rbuf2(rd2.back() + rc2.back());
      c.all_to_all_v(sbuf2.data(), sc2, sd2, rbuf2.data(), rc2, rd2);
      if (r == 0) {
        std::lock_guard lk(mu);
        ep_dispatch = d;
        ep_combine = c.volume();
      }
    });
    row("ep", t, "dispatch all_to_all_v (token per dest rank)", "bf16", ep_dispatch.total(), base);
    row("ep", t, "combine all_to_all_v (per token-expert pair)", "f32", ep_combine.total(), base);

    CommVolume vocab = measure(t, [&](Communicator& c) {
      std::vector<float> m(n, 0.0f), s(n, 1.0f);
      canonical_all_reduce_maxsum(c, m.data(), s.data(), n);
    });
    row("vocab", t, "log-softmax (max, sumexp) all-gather", "f32", vocab.total(), base);
    std::printf("\n");
  }
  std::printf("tp: ratio 1.000, the canonical all-reduce (all-to-all of slices + all-gather) moves\n"
              "exactly a ring's bytes while summing in the fixed tree order. tp+sp: 0.750, the same\n"
              "f32 reduce-scatter plus an all-gather of bf16 activations. ep: routed volume,\n"
              "compared with the same baseline for scale.\n");
  return 0;
}
