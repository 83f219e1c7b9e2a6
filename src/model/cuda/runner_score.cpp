#include <algorithm>

#include "kernels/cpu/attention.h"
#include "model/cuda/cuda_runner.h"

namespace lockstep {

std::vector<std::vector<float>> runner_score_sequences(ModelRunner& runner,
                                                       const std::vector<std::vector<int32_t>>& seqs,
                                                       int64_t max_batch_tokens) {
  const int64_t page = kAttnBlock;
  // Cut into forwards first, so the page pool is sized once for the largest.
  std::vector<std::pair<size_t, size_t>> spans;
  int64_t max_pages = 1;
  for (size_t next = 0; next < seqs.size();) {
    size_t end = next;
    int64_t tokens = 0, pages = 0;
    while (end < seqs.size() && (end == next || tokens + int64_t(seqs[end].size()) <= max_batch_tokens)) {
      tokens += int64_t(seqs[end].size());
      pages += (int64_t(seqs[end].size()) + page - 1) / page;
      ++end;
    }
    spans.push_back({next, end});
    max_pages = std::max(max_pages, pages);
    next = end;
  }
  runner.allocate_kv(max_pages, page);
  std::vector<std::vector<float>> result(seqs.size());
  for (auto [begin, end] : spans) {
    std::vector<std::vector<int32_t>> tables(end - begin);
    ForwardBatch batch;
    std::vector<int32_t> targets;
    int32_t first_page = 0;
    for (size_t s = begin; s < end; ++s) {
      auto& table = tables[s - begin];
      const int64_t n = int64_t(seqs[s].size());
      for (int64_t p = 0; p < (n + page - 1) / page; ++p) table.push_back(first_page++);
    }
    for (size_t s = begin; s < end; ++s) {
      const int64_t n = int64_t(seqs[s].size());
      for (int64_t t = 0; t < n; ++t) {
        batch.tokens.push_back(seqs[s][size_t(t)]);
        batch.positions.push_back(int32_t(t));
        batch.page_tables.push_back(tables[s - begin].data());
        targets.push_back(t + 1 < n ? seqs[s][size_t(t + 1)] : -1);
      }
    }
    std::vector<float> lp = runner.forward_logprobs(batch, targets);
    int64_t offset = 0;
    for (size_t s = begin; s < end; ++s) {
      const int64_t n = int64_t(seqs[s].size());
      result[s].assign(lp.begin() + offset, lp.begin() + offset + std::max<int64_t>(n - 1, 0));
      offset += n;
    }
  }
  return result;
}

}  // namespace lockstep
