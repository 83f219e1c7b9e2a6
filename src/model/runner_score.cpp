#include "model/runner_score.h"

#include <algorithm>

#include "model/qwen3_moe.h"

namespace lockstep {

std::vector<std::vector<float>> runner_score_sequences(ModelRunner& runner,
                                                       const std::vector<std::vector<int32_t>>& seqs,
                                                       int64_t max_batch_tokens) {
  // Cut into steps first, so the page pool is sized once for the largest.
  const auto steps = score_steps(seqs, 0, seqs.size(), max_batch_tokens);
  std::vector<PackedSequences> packed;
  int32_t max_pages = 1;
  for (auto [begin, end] : steps) {
    packed.push_back(pack_sequences({seqs.begin() + begin, seqs.begin() + end}));
    max_pages = std::max(max_pages, packed.back().num_pages);
  }
  runner.allocate_kv(max_pages, kAttnBlock);
  std::vector<std::vector<float>> result(seqs.size());
  for (size_t k = 0; k < steps.size(); ++k) {
    const auto [begin, end] = steps[k];
    std::vector<int32_t> targets;  // each token's next token, -1 for a sequence's last
    for (size_t s = begin; s < end; ++s)
      for (size_t t = 0; t < seqs[s].size(); ++t) targets.push_back(t + 1 < seqs[s].size() ? seqs[s][t + 1] : -1);
    const std::vector<float> lp = runner.forward_logprobs(packed[k].batch, targets);
    int64_t offset = 0;
    for (size_t s = begin; s < end; ++s) {
      const int64_t n = int64_t(seqs[s].size());
      result[s].assign(lp.begin() + offset, lp.begin() + offset + (n - 1));
      offset += n;
    }
  }
  return result;
}

}  // namespace lockstep
