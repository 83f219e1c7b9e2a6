// The head backward over only the rows with an upstream gradient (parallel_backward.cpp) gives
// the bits of the whole-stream form: rows whose upstream is 0 have logit gradients of +-0, which
// add nothing to the weight gradient's token-chunk sums (run over the kept rows with the whole
// stream's chunks) and leave their input gradient rows exactly +0; and the logit gradient may
// overwrite the logits in place.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kernels/canonical.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/log_softmax_backward.h"
#include "random.h"

namespace lockstep {
namespace {

using testing::random_vector;
using testing::same_bits;

TEST(HeadRows, KeptRowsGiveTheWholeStreamBits) {
  const int64_t T = 37, V = 301, H = 24;
  const std::vector<float> logits = random_vector(T * V, 1, 4.0f), hidden = random_vector(T * H, 2),
                           w = random_vector(V * H, 3), up = random_vector(T, 4);
  std::vector<float> lse(T), dlogp(T, 0.0f);
  std::vector<int32_t> targets(T), kept;
  for (int64_t t = 0; t < T; ++t) {
    lse[t] = cpu::log_normalizer(logits.data() + t * V, V);
    targets[t] = int32_t((t * 7) % V);
    // Runs of trained and untrained tokens, as prompts and answers; -0 counts as no gradient.
    if ((t / 5) % 2 == 1) dlogp[t] = up[t], kept.push_back(int32_t(t));
    if (t == 4) dlogp[t] = -0.0f;
  }
  // The whole stream.
  std::vector<float> dl(T * V), dw(V * H), dx(T * H);
  cpu::log_softmax_gather_backward_slice(logits.data(), lse.data(), targets.data(), dlogp.data(), nullptr, nullptr,
                                         dl.data(), T, 0, V);
  cpu::linear_weight_grad(dl.data(), hidden.data(), dw.data(), V, H, cpu::token_chunks(T));
  cpu::linear_input_grad(dl.data(), w.data(), dx.data(), T, V, H);
  // The kept rows, their logit gradients written over their logits.
  const int64_t A = int64_t(kept.size());
  std::vector<float> rows(A * V), hid(A * H), klse, kdlogp;
  std::vector<int32_t> ktargets;
  for (int64_t i = 0; i < A; ++i) {
    std::memcpy(rows.data() + i * V, logits.data() + int64_t(kept[i]) * V, V * sizeof(float));
    std::memcpy(hid.data() + i * H, hidden.data() + int64_t(kept[i]) * H, H * sizeof(float));
    klse.push_back(lse[kept[i]]);
    kdlogp.push_back(dlogp[kept[i]]);
    ktargets.push_back(targets[kept[i]]);
  }
  cpu::log_softmax_gather_backward_slice(rows.data(), klse.data(), ktargets.data(), kdlogp.data(), nullptr, nullptr,
                                         rows.data(), A, 0, V);
  std::vector<float> dw2(V * H), dx_kept(A * H), dx2(T * H, 0.0f);
  cpu::linear_weight_grad_subtree(rows.data(), hid.data(), dw2.data(), V, H,
                                  cpu::token_chunks_of(kept.data(), A, T).rows, kTMax);
  cpu::linear_input_grad(rows.data(), w.data(), dx_kept.data(), A, V, H);
  for (int64_t i = 0; i < A; ++i) std::memcpy(dx2.data() + int64_t(kept[i]) * H, dx_kept.data() + i * H, H * 4);
  EXPECT_TRUE(same_bits(dw2, dw));
  EXPECT_TRUE(same_bits(dx2, dx));
  for (int64_t i = 0; i < A; ++i)
    EXPECT_EQ(std::memcmp(rows.data() + i * V, dl.data() + int64_t(kept[i]) * V, V * sizeof(float)), 0) << i;
}

}  // namespace
}  // namespace lockstep
