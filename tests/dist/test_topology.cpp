// Topology: names, validation table, rank groups, pipeline split, local<->global names.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <set>

#include "core/error.h"
#include "model/config.h"
#include "parallel/naming.h"
#include "parallel/parallel_score.h"
#include "parallel/topology.h"

namespace lockstep {
namespace {

ModelConfig qwen3_30b_a3b() {
  ModelConfig c;
  c.vocab_size = 151936;
  c.hidden_size = 2048;
  c.intermediate_size = 6144;
  c.moe_intermediate_size = 768;
  c.num_hidden_layers = 48;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 4;
  c.head_dim = 128;
  c.num_experts = 128;
  c.num_experts_per_tok = 8;
  return c;
}

ModelConfig tiny() {  // tests/fixtures/hf-tiny-qwen3-moe
  ModelConfig c = qwen3_30b_a3b();
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.moe_intermediate_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.num_experts = 8;
  c.num_experts_per_tok = 2;
  return c;
}

Topology topo(int tp, bool sp, int pp, int ep, int etp, int dp) {
  Topology t;
  t.tp = tp;
  t.sp = sp;
  t.pp = pp;
  t.ep = ep;
  t.etp = etp;
  t.dp = dp;
  return t;
}

TEST(Topology, NameAndParse) {
  EXPECT_EQ(topo(2, true, 2, 2, 1, 1).name(), "tp2_sp_pp2_ep2_etp1_dp1");
  EXPECT_EQ(topo(1, false, 1, 1, 1, 1).name(), "tp1_pp1_ep1_etp1_dp1");
  for (const char* s : {"tp2_sp_pp2_ep2_etp1_dp1", "tp8_pp4_ep8_etp2_dp16", "tp1_pp1_ep1_etp1_dp1"})
    EXPECT_EQ(Topology::parse(s).name(), s);
  EXPECT_EQ(Topology::parse("tp4_sp_pp1_ep2_etp2_dp3"), topo(4, true, 1, 2, 2, 3));
  for (const char* bad : {"", "tp2", "tp2_pp2_ep1_etp1", "tp2_sp_pp2_ep2_etp1_dp1_x", "tp0_pp1_ep1_etp1_dp1",
                          "tpx_pp1_ep1_etp1_dp1", "pp1_tp1_ep1_etp1_dp1", "tp2_SP_pp1_ep1_etp1_dp1"})
    EXPECT_THROW(Topology::parse(bad), Error) << bad;
}

TEST(Topology, FromWorld) {
  EXPECT_EQ(Topology::from_world(8, 2, true, 2, 2, 1), topo(2, true, 2, 2, 1, 2));
  EXPECT_EQ(Topology::from_world(1, 1, false, 1, 1, 1), Topology{});
  try {
    Topology::from_world(6, 4, false, 1, 1, 1);
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not divisible by tp*pp = 4"), std::string::npos) << e.what();
  }
}

TEST(Topology, ValidationTable) {
  ModelConfig big = qwen3_30b_a3b(), small = tiny();
  ModelConfig odd_q = tiny();  // q_dim = 2 heads x 5 = 10: not whole chunks under tp 2
  odd_q.num_attention_heads = 2;
  odd_q.num_key_value_heads = 2;
  odd_q.head_dim = 5;
  ModelConfig kv6 = big;  // tp 4 <= 6 kv heads but does not divide them
  kv6.num_attention_heads = 24;
  kv6.num_key_value_heads = 6;
  ModelConfig kv3 = big;  // tp 4 > 3 kv heads but not a multiple
  kv3.num_attention_heads = 24;
  kv3.num_key_value_heads = 3;
  ModelConfig heads12 = big;
  heads12.num_attention_heads = 12;
  ModelConfig dense = tiny();
  dense.num_experts = 0;

  struct Row {
    Topology t;
    int world;
    const ModelConfig* cfg;
    const char* refusal;  // nullptr: accepted; else a substring of the message
  };
  const Row rows[] = {
      {topo(1, false, 1, 1, 1, 1), 1, &big, nullptr},
      {topo(2, true, 2, 2, 1, 2), 8, &big, nullptr},
      {topo(8, true, 1, 8, 1, 1), 8, &big, nullptr},   // tp 8 > 4 kv heads: replicated
      {topo(4, false, 2, 4, 2, 2), 16, &big, nullptr},
      {topo(1, false, 1, 4, 1, 4), 4, &big, nullptr},
      {topo(1, false, 4, 1, 1, 1), 4, &big, nullptr},
      {topo(4, true, 2, 8, 1, 2), 16, &small, nullptr},
      {topo(2, false, 1, 2, 1, 1), 2, &dense, "has no experts"},
      {topo(3, false, 1, 1, 1, 1), 3, &big, "--tensor-model-parallel-size must be 1, 2, 4 or 8"},
      {topo(1, false, 1, 1, 3, 3), 3, &big, "--expert-tensor-parallel-size must be 1, 2, 4 or 8"},
      {topo(16, false, 1, 1, 1, 1), 16, &big, "--tensor-model-parallel-size must be 1, 2, 4 or 8"},
      {topo(1, true, 1, 1, 1, 2), 2, &big, "sequence parallel needs tp > 1"},
      {topo(4, false, 1, 1, 1, 1), 6, &big, "world size 6 is not divisible by tp*pp = 4"},
      {topo(2, false, 1, 1, 1, 2), 8, &big, "tp*pp*dp = 4 but the world has 8 ranks"},
      {topo(1, false, 1, 3, 1, 6), 6, &big, "ep=3 does not divide num_experts=128"},
      {topo(2, false, 1, 4, 1, 1), 2, &big, "ep*etp = 4 must divide tp*dp = 2"},
      {topo(2, false, 1, 2, 2, 1), 2, &big, "ep*etp = 4 must divide tp*dp = 2"},
      {topo(8, false, 1, 1, 1, 1), 8, &heads12, "does not divide num_attention_heads=12"},
      {topo(4, false, 1, 1, 1, 1), 4, &kv6, "does not divide num_key_value_heads=6"},
      {topo(4, false, 1, 1, 1, 1), 4, &kv3, "needs tp to be a multiple of 3"},
      {topo(1, false, 4, 1, 1, 1), 4, &small, "pp=4 exceeds num_hidden_layers=2"},
      {topo(2, false, 1, 1, 1, 1), 2, &odd_q, "not a whole number of canonical chunks"},
      {topo(1, false, 1, 1, 1, 1), 1, &odd_q, nullptr},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(r.t.name() + " world " + std::to_string(r.world));
    if (!r.refusal) {
      EXPECT_NO_THROW(r.t.validate(*r.cfg, r.world));
      continue;
    }
    try {
      r.t.validate(*r.cfg, r.world);
      ADD_FAILURE() << "accepted, expected: " << r.refusal;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(r.refusal), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(r.t.name()), std::string::npos) << e.what();
    }
  }
}

// Refusals name the command-line flags to change; under a prefix (the rollout engine's
// "rollout-") they name the prefixed flags only.
TEST(Topology, RefusalsNameTheFlagsUnderTheirPrefix) {
  const ModelConfig big = qwen3_30b_a3b();
  const std::vector<std::pair<std::function<void(std::string_view)>, std::string>> cases = {
      {[](std::string_view pre) { Topology::from_world(6, 4, false, 1, 1, 1, pre); }, "tensor-model-parallel-size"},
      {[&](std::string_view pre) { topo(3, false, 1, 1, 1, 1).validate(big, 3, pre); }, "tensor-model-parallel-size"},
      {[&](std::string_view pre) { topo(2, false, 1, 3, 1, 1).validate(big, 2, pre); }, "expert-model-parallel-size"},
      {[&](std::string_view pre) { topo(1, false, 1, 1, 3, 3).validate(big, 3, pre); }, "expert-tensor-parallel-size"},
      {[&](std::string_view pre) { topo(1, true, 1, 1, 1, 1).validate(big, 1, pre); }, "sequence-parallel"},
      {[&](std::string_view pre) {  // the request's prefix reaches the validator
         TopologyRequest r;
         r.tp = 2;
         r.ep = 3;
         r.flag_prefix = std::string(pre);
         resolve_topology(r, big, 2);
       },
       "expert-model-parallel-size"},
  };
  for (const auto& [run, flag] : cases)
    for (const std::string prefix : {"", "rollout-"}) {
      try {
        run(prefix);
        ADD_FAILURE() << "accepted, expected a refusal naming " << flag;
      } catch (const Error& e) {
        const std::string why = e.what();
        EXPECT_NE(why.find("--" + prefix + flag), std::string::npos) << why;
        if (!prefix.empty()) {
          EXPECT_EQ(why.find("--" + flag), std::string::npos) << why;
        }
      }
    }
}

TEST(Topology, CoordsRoundTrip) {
  Topology t = topo(2, true, 2, 2, 1, 2);
  for (int r = 0; r < t.world_size(); ++r) {
    RankCoords c = t.coords(r);
    EXPECT_EQ(t.rank_of(c.tp, c.dp, c.pp), r);
  }
  RankCoords c5 = t.coords(5);  // 5 = tp 1 + 2*(dp 0 + 2*pp 1)
  EXPECT_EQ(c5.tp, 1);
  EXPECT_EQ(c5.dp, 0);
  EXPECT_EQ(c5.pp, 1);
  EXPECT_EQ(c5.ep, 1);  // stage-local index 1 = etp 0 + 1*(ep 1 + 2*edp 0)
  EXPECT_EQ(c5.edp, 0);
  EXPECT_THROW(t.coords(8), Error);
}

using Groups = std::vector<std::vector<int>>;

TEST(Topology, GroupsWorld8Tp2Pp2Ep2) {
  Topology t = Topology::from_world(8, 2, true, 2, 2, 1);
  ASSERT_NO_THROW(t.validate(qwen3_30b_a3b(), 8));
  EXPECT_EQ(t.edp(), 2);
  EXPECT_EQ(t.all_groups(GroupKind::TP), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  EXPECT_EQ(t.all_groups(GroupKind::DP), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(t.all_groups(GroupKind::PP), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(t.all_groups(GroupKind::MP), (Groups{{0, 1, 4, 5}, {2, 3, 6, 7}}));
  EXPECT_EQ(t.all_groups(GroupKind::EP), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  EXPECT_EQ(t.all_groups(GroupKind::ETP), (Groups{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}}));
  EXPECT_EQ(t.all_groups(GroupKind::EDP), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(t.group_color_key(GroupKind::DP, 6), (std::pair<int, int>{2, 1}));
}

TEST(Topology, GroupsWorld16Etp2) {
  Topology t = Topology::from_world(16, 4, false, 2, 4, 2);  // dp 2, stage of 8, edp 1
  ASSERT_NO_THROW(t.validate(qwen3_30b_a3b(), 16));
  EXPECT_EQ(t.edp(), 1);
  EXPECT_EQ(t.group_ranks(GroupKind::EP, 0), (std::vector<int>{0, 2, 4, 6}));
  EXPECT_EQ(t.group_ranks(GroupKind::EP, 9), (std::vector<int>{9, 11, 13, 15}));
  EXPECT_EQ(t.group_ranks(GroupKind::ETP, 5), (std::vector<int>{4, 5}));
  EXPECT_EQ(t.group_ranks(GroupKind::EDP, 5), (std::vector<int>{5}));
  EXPECT_EQ(t.group_ranks(GroupKind::TP, 5), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(t.group_ranks(GroupKind::DP, 5), (std::vector<int>{1, 5}));
  EXPECT_EQ(t.group_ranks(GroupKind::PP, 5), (std::vector<int>{5, 13}));
}

// Every kind partitions the world, groups have the expected size, and each rank's group
// agrees with its coordinates.
TEST(Topology, GroupsPartitionTheWorld) {
  const GroupKind kinds[] = {GroupKind::TP, GroupKind::PP,  GroupKind::DP, GroupKind::EP,
                             GroupKind::ETP, GroupKind::EDP, GroupKind::MP};
  for (const char* name : {"tp2_sp_pp2_ep2_etp1_dp1", "tp2_pp2_ep4_etp1_dp2", "tp4_pp2_ep2_etp2_dp2",
                           "tp8_pp1_ep8_etp1_dp1", "tp1_pp4_ep2_etp1_dp2", "tp2_pp1_ep1_etp2_dp3"}) {
    Topology t = Topology::parse(name);
    ASSERT_NO_THROW(t.validate_sizes(t.world_size())) << name;
    for (GroupKind k : kinds) {
      SCOPED_TRACE(std::string(name) + " " + group_kind_name(k));
      const int expect = k == GroupKind::TP ? t.tp : k == GroupKind::PP ? t.pp : k == GroupKind::DP ? t.dp
                       : k == GroupKind::EP ? t.ep : k == GroupKind::ETP ? t.etp : k == GroupKind::EDP ? t.edp()
                       : t.tp * t.pp;
      std::vector<int> hits(t.world_size(), 0);
      for (const auto& g : t.all_groups(k)) {
        EXPECT_EQ(static_cast<int>(g.size()), expect);
        for (int r : g) {
          ++hits[r];
          EXPECT_EQ(t.group_ranks(k, r), g);
        }
      }
      EXPECT_TRUE(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
      // Members of one group differ only in the coordinate the group spans.
      for (int r = 0; r < t.world_size(); ++r) {
        RankCoords a = t.coords(r);
        for (int q : t.group_ranks(k, r)) {
          RankCoords b = t.coords(q);
          if (k != GroupKind::PP && k != GroupKind::MP) { EXPECT_EQ(a.pp, b.pp); }
          if (k == GroupKind::TP) { EXPECT_EQ(a.dp, b.dp); }
          if (k == GroupKind::DP) { EXPECT_EQ(a.tp, b.tp); }
          if (k == GroupKind::EP) { EXPECT_TRUE(a.etp == b.etp && a.edp == b.edp); }
          if (k == GroupKind::ETP) { EXPECT_TRUE(a.ep == b.ep && a.edp == b.edp); }
          if (k == GroupKind::EDP) { EXPECT_TRUE(a.ep == b.ep && a.etp == b.etp); }
        }
      }
    }
  }
}

TEST(Topology, PipelineSplit) {
  EXPECT_EQ(pipeline_layer_split(48, 4), (std::vector<int64_t>{12, 12, 12, 12}));
  EXPECT_EQ(pipeline_layer_split(5, 2), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(pipeline_layer_split(7, 3), (std::vector<int64_t>{3, 2, 2}));
  auto s = pipeline_layer_split(4, 2, parse_layer_split("1,3"));
  EXPECT_EQ(s, (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(first_layer(s, 0), 0);
  EXPECT_EQ(first_layer(s, 1), 1);
  EXPECT_EQ(stage_of_layer(s, 0), 0);
  EXPECT_EQ(stage_of_layer(s, 3), 1);
  EXPECT_THROW(stage_of_layer(s, 4), Error);
  EXPECT_THROW(pipeline_layer_split(4, 2, std::vector<int64_t>{1, 2}), Error);     // sums to 3
  EXPECT_THROW(pipeline_layer_split(4, 2, std::vector<int64_t>{0, 4}), Error);     // empty stage
  EXPECT_THROW(pipeline_layer_split(4, 3, std::vector<int64_t>{1, 3}), Error);     // wrong count
  EXPECT_THROW(pipeline_layer_split(2, 4), Error);
  EXPECT_THROW(parse_layer_split("1,a"), Error);
  EXPECT_THROW(parse_layer_split("1,,3"), Error);
  try {
    pipeline_layer_split(4, 2, std::vector<int64_t>{1, 2});
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sums to 3 layers but the model has 4"), std::string::npos);
  }
}

TEST(Topology, LocalGlobalNames) {
  const std::vector<int64_t> split{1, 3};
  EXPECT_EQ(global_layer(0, 0, split), 0);
  EXPECT_EQ(global_layer(0, 1, split), 1);
  EXPECT_EQ(global_layer(2, 1, split), 3);
  EXPECT_THROW(global_layer(1, 0, split), Error);
  for (int64_t g = 0; g < 4; ++g) {
    LocalLayer l = local_layer(g, split);
    EXPECT_EQ(global_layer(l.local, l.pp_rank, split), g);
  }
  EXPECT_EQ(local_layer(2, split).pp_rank, 1);
  EXPECT_EQ(local_layer(2, split).local, 1);

  EXPECT_EQ(global_expert(3, 1, 128, 4), 35);
  EXPECT_EQ(local_expert(35, 128, 4).ep_rank, 1);
  EXPECT_EQ(local_expert(35, 128, 4).local, 3);
  for (int ep : {1, 2, 4, 8})
    for (int64_t e = 0; e < 128; e += 7) {
      LocalExpert l = local_expert(e, 128, ep);
      EXPECT_EQ(global_expert(l.local, l.ep_rank, 128, ep), e);
    }
  EXPECT_THROW(global_expert(32, 0, 128, 4), Error);
  EXPECT_THROW(local_expert(128, 128, 4), Error);
  EXPECT_THROW(global_expert(0, 0, 128, 3), Error);
}

}  // namespace
}  // namespace lockstep
