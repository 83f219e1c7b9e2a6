// Sharded checkpoints: box copies against a plain reference, resharding between topologies
// (what any rank loads from a sharded checkpoint equals what it loads from the HF files),
// and the audit's hash, order and grouping.
#include <gtest/gtest.h>

#include <random>

#include "checkpoint/audit.h"
#include "parallel_test_util.h"
#include "shell.h"

namespace lockstep {
namespace {

Box random_box(std::mt19937& rng, const Shape& shape) {
  Box b;
  for (int64_t d : shape) {
    std::uniform_int_distribution<int64_t> u(0, d);
    int64_t x = u(rng), y = u(rng);
    b.push_back({std::min(x, y), std::max(x, y)});
  }
  return b;
}

TEST(Sharded, CopyIntersectionMatchesElementwiseReference) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    const Shape shape = trial % 2 ? Shape{7, 5} : Shape{4, 3, 6};
    Tensor full = Tensor::zeros(shape, trial % 3 ? DType::f32 : DType::bf16);
    const size_t es = dtype_size(full.dtype());
    auto* bytes = static_cast<uint8_t*>(full.raw());
    for (size_t i = 0; i < full.nbytes(); ++i) bytes[i] = uint8_t(rng());
    const Box sb = random_box(rng, shape), db = random_box(rng, shape);
    Tensor src = slice_tensor(full, sb);
    Tensor dst = Tensor::zeros(box_shape(db), full.dtype());
    const int64_t copied = copy_intersection(src, sb, dst, db);
    // Reference: every element of db inside sb equals full's, others stay zero.
    int64_t expect = 0;
    const Shape ds = box_shape(db);
    for (int64_t i = 0; i < dst.numel(); ++i) {
      std::vector<int64_t> g(shape.size());
      int64_t rest = i;
      bool inside = true;
      for (int d = int(shape.size()) - 1; d >= 0; --d) {
        g[d] = db[d].begin + rest % ds[d];
        rest /= ds[d];
        inside = inside && g[d] >= sb[d].begin && g[d] < sb[d].end;
      }
      int64_t flat = 0;
      for (size_t d = 0; d < shape.size(); ++d) flat = flat * shape[d] + g[d];
      const uint8_t* got = static_cast<const uint8_t*>(dst.raw()) + i * es;
      if (inside) {
        ++expect;
        ASSERT_EQ(std::memcmp(got, bytes + flat * es, es), 0) << "trial " << trial;
      } else {
        for (size_t k = 0; k < es; ++k) ASSERT_EQ(got[k], 0) << "trial " << trial;
      }
    }
    EXPECT_EQ(copied, expect);
  }
}

TEST(Sharded, AnyTopologyLoadsWhatAnotherWrote) {
  ptest::ScratchDir dir("reshard");
  const std::string hf_dir = ptest::fixture_dir();
  auto hf = open_checkpoint(hf_dir);
  const ModelConfig cfg = ModelConfig::load(hf_dir + "/config.json");
  Topology a = Topology::from_world(4, 2, true, 2, 2, 1);
  a.validate(cfg, 4);
  const auto split_a = pipeline_layer_split(cfg.num_hidden_layers, 2);
  std::vector<std::vector<ShardPiece>> per_rank;
  for (int r = 0; r < 4; ++r) per_rank.push_back(rank_pieces(cfg, ShardLayout::make(cfg, a, split_a, r)));
  write_sharded_checkpoint(*hf, dir / "a", a.name(), split_a, per_rank, hf_dir);
  auto sharded = open_checkpoint(dir / "a");
  EXPECT_EQ(sharded->names(), hf->names());

  struct B {
    int world, tp, pp, ep, etp;
  };
  for (const B& b : {B{4, 4, 1, 1, 1}, B{8, 2, 1, 4, 2}, B{2, 1, 2, 1, 1}, B{8, 1, 1, 8, 1}}) {
    Topology t = Topology::from_world(b.world, b.tp, false, b.pp, b.ep, b.etp);
    t.validate(cfg, b.world);
    const auto split = pipeline_layer_split(cfg.num_hidden_layers, b.pp);
    for (int r = 0; r < b.world; ++r) {
      const ShardLayout layout = ShardLayout::make(cfg, t, split, r);
      ModelWeights x = load_local_weights(*hf, cfg, layout, Precision::float32);
      ModelWeights y = load_local_weights(*sharded, cfg, layout, Precision::float32);
      const auto pieces = rank_pieces(cfg, layout);
      ASSERT_FALSE(pieces.empty());
      for (const auto& p : pieces) {
        Tensor u = hf->read(p.name, p.box), v = sharded->read(p.name, p.box);
        ASSERT_EQ(u.nbytes(), v.nbytes()) << p.name;
        ASSERT_EQ(std::memcmp(u.raw(), v.raw(), u.nbytes()), 0) << t.name() << " rank " << r << " " << p.name;
      }
      ASSERT_EQ(x.layers.size(), y.layers.size());
      for (size_t l = 0; l < x.layers.size(); ++l)
        ASSERT_EQ(std::memcmp(x.layers[l].q_proj.raw(), y.layers[l].q_proj.raw(), x.layers[l].q_proj.nbytes()), 0);
    }
  }
}

// The embedding is vocab-parallel: under TP each first-stage rank holds the rows of its
// lm_head vocab slice, the slices tile the vocabulary, and later stages hold none.
TEST(Sharded, EmbeddingIsVocabParallel) {
  const ModelConfig cfg = ModelConfig::load(ptest::fixture_dir() + "/config.json");
  Topology t = Topology::from_world(4, 2, false, 2, 1, 1);
  t.validate(cfg, 4);
  const auto split = pipeline_layer_split(cfg.num_hidden_layers, 2);
  int64_t covered = 0;
  for (int r = 0; r < 4; ++r) {
    const ShardLayout layout = ShardLayout::make(cfg, t, split, r);
    int embed_pieces = 0;
    for (const auto& p : rank_pieces(cfg, layout)) {
      if (p.name != "model.embed_tokens.weight") continue;
      ++embed_pieces;
      EXPECT_EQ(p.box[0].begin, layout.vocab.begin) << "rank " << r;
      EXPECT_EQ(p.box[0].end, layout.vocab.end) << "rank " << r;
      EXPECT_LT(p.box[0].end - p.box[0].begin, cfg.vocab_size) << "rank " << r;
      covered += p.box[0].end - p.box[0].begin;
    }
    EXPECT_EQ(embed_pieces, layout.first_stage ? 1 : 0) << "rank " << r;
  }
  EXPECT_EQ(covered, cfg.vocab_size);
}

TEST(Audit, HashOrderAndGroups) {
  EXPECT_EQ(fnv1a64("a", 1), 0xaf63dc4c8601ec8cull);  // the published FNV-1a 64 test vector
  EXPECT_TRUE(global_name_less("model.layers.2.mlp.gate.weight", "model.layers.10.mlp.gate.weight"));
  EXPECT_FALSE(global_name_less("model.layers.10.mlp.gate.weight", "model.layers.2.mlp.gate.weight"));
  EXPECT_TRUE(global_name_less("model.layers.1.mlp.experts.3.up_proj.weight",
                               "model.layers.1.mlp.experts.12.down_proj.weight"));
  EXPECT_EQ(audit_group("model.layers.3.self_attn.q_proj.weight"), "layer 3 attention");
  EXPECT_EQ(audit_group("model.layers.3.self_attn.q_norm.weight"), "layer 3 norms");
  EXPECT_EQ(audit_group("model.layers.3.input_layernorm.weight"), "layer 3 norms");
  EXPECT_EQ(audit_group("model.layers.3.mlp.gate.weight"), "layer 3 router");
  EXPECT_EQ(audit_group("model.layers.3.mlp.experts.7.gate_proj.weight"), "layer 3 experts");
  EXPECT_EQ(audit_group("model.layers.3.mlp.gate_proj.weight"), "layer 3 mlp");
  EXPECT_EQ(audit_group("lm_head.weight"), "lm_head");

  auto src = open_checkpoint(ptest::fixture_dir());
  CheckpointAudit a = audit_checkpoint(*src);
  ASSERT_EQ(a.tensors.size(), src->names().size());
  for (const auto& t : a.tensors) {
    Tensor full = src->read_full(t.name);
    EXPECT_EQ(t.hash, fnv1a64(full.raw(), full.nbytes())) << t.name;
    EXPECT_GT(t.norm, 0) << t.name;
  }
  int64_t grouped = 0;
  for (const auto& g : a.groups) grouped += g.tensors;
  EXPECT_EQ(grouped, int64_t(a.tensors.size()));
  EXPECT_FALSE(first_difference(a, a));
  CheckpointAudit b = a;
  b.tensors.pop_back();
  auto d = first_difference(a, b);
  ASSERT_TRUE(d);
  EXPECT_NE(d->find(a.tensors.back().name), std::string::npos) << *d;
}

}  // namespace
}  // namespace lockstep
