// Shared helpers for the parallel tests: run a topology on threads and compare with one rank.
#pragma once
#include <cstring>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "core/thread_pool.h"
#include "dist/thread_communicator.h"
#include "model/qwen3_moe.h"
#include "model/qwen3_moe.h"
#include "parallel/shard_plan.h"

namespace lockstep::ptest {

inline std::string fixture_dir() { return std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe"; }

// The golden input sequences (lengths 37, 5, 64, 1, 130).
inline std::vector<std::vector<int32_t>> golden_sequences() {
  SafetensorsReader r = SafetensorsReader::open(fixture_dir() + "/golden.safetensors");
  std::vector<std::vector<int32_t>> seqs;
  for (int i = 0; i < 5; ++i) {
    const Tensor& t = r.get("seq" + std::to_string(i) + ".input_ids");
    std::vector<int32_t> s(t.numel());
    for (int64_t j = 0; j < t.numel(); ++j) s[j] = int32_t(t.data<int64_t>()[j]);
    seqs.push_back(s);
  }
  return seqs;
}

struct TopoSpec {
  int world = 1, tp = 1, pp = 1, ep = 1, etp = 1;
  bool sp = false;
  std::optional<std::vector<int64_t>> split = std::nullopt;
  std::string name() const {
    std::ostringstream os;
    os << "w" << world << "_tp" << tp << (sp ? "_sp" : "") << "_pp" << pp << "_ep" << ep << "_etp" << etp;
    if (split)
      for (auto s : *split) os << "_" << s;
    return os.str();
  }
};

// Scores seqs under `spec` with ranks as threads; returns world rank 0's result. The CPU
// pool is single-threaded (the pool is not reentrant across rank threads; results do not
// depend on the thread count).
inline std::vector<std::vector<float>> score_on_threads(const ModelWeights& full, Precision precision,
                                                        const TopoSpec& spec,
                                                        const std::vector<std::vector<int32_t>>& seqs,
                                                        int64_t max_batch_tokens = 8192) {
  set_num_threads(1);
  std::vector<std::vector<float>> result;
  dist::run_threads(spec.world, [&](dist::Communicator& comm) {
    Topology topo = Topology::from_world(spec.world, spec.tp, spec.sp, spec.pp, spec.ep, spec.etp);
    topo.validate(full.config, spec.world);
    auto split = pipeline_layer_split(full.config.num_hidden_layers, spec.pp, spec.split);
    ShardLayout layout = ShardLayout::make(full.config, topo, split, comm.rank());
    Qwen3Moe model(comm, layout, slice_local_weights(full, layout), precision);
    auto r = model.score(seqs, max_batch_tokens);
    if (comm.rank() == 0) result = std::move(r);
  });
  return result;
}

inline bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() ||
        (!a[i].empty() && std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0))
      return false;
  return true;
}

}  // namespace lockstep::ptest
