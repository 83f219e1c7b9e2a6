// The parallel command line: mpirun score prints the single-rank bytes, convert round trips,
// audit finds differences, and bad topologies / mismatched checkpoints are refused before
// any work.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "checkpoint/safetensors.h"
#include "parallel_test_util.h"
#include "shell.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;
using ptest::shell;

const std::string kTopoA = "--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2 "
                           "--expert-model-parallel-size 2 --expert-tensor-parallel-size 1";

class ParallelCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ptest::ScratchDir("cli");
    std::ofstream in(input());
    for (const auto& s : ptest::golden_sequences()) in << nlohmann::json{{"input_ids", s}}.dump() << "\n";
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string path(const std::string& name) { return *dir_ / name; }
  static std::string input() { return path("input.jsonl"); }
  static std::string model() { return ptest::fixture_dir(); }
  // The single-rank output, computed once.
  static const std::string& reference() {
    static std::string ref;
    if (ref.empty()) {
      auto r = shell(ptest::lockstep_bin() + " score --model " + model() + " --input " + input() + " --output " +
                     path("ref.jsonl"));
      EXPECT_EQ(r.status, 0) << r.output;
      ref = ptest::read_file(path("ref.jsonl"));
    }
    return ref;
  }
  static inline ptest::ScratchDir* dir_ = nullptr;
};

TEST_F(ParallelCli, MpirunScoreMatchesSingleRankBytes) {
  ASSERT_FALSE(reference().empty());
  struct Launch {
    int np;
    std::string flags;
  };
  // 8 ranks: TP2 + SP + PP2 + EP2 with two data-parallel replicas.
  for (const Launch& l : {Launch{8, kTopoA}, Launch{4, "--expert-model-parallel-size 2 --expert-tensor-parallel-size 2 "
                                                       "--dtype bfloat16"}}) {
    const std::string out = path("mpi_" + std::to_string(l.np) + ".jsonl");
    auto r = shell(ptest::mpirun(l.np) + " score --model " + model() + " --input " + input() + " --output " + out +
                   " " + l.flags);
    ASSERT_EQ(r.status, 0) << l.flags << "\n" << r.output;
    if (l.flags.find("bfloat16") == std::string::npos) {
      EXPECT_EQ(ptest::read_file(out), reference()) << l.flags;
    } else {
      auto s = shell(ptest::lockstep_bin() + " score --dtype bfloat16 --model " + model() + " --input " + input() +
                     " --output " + path("ref_bf16.jsonl"));
      ASSERT_EQ(s.status, 0) << s.output;
      EXPECT_EQ(ptest::read_file(out), ptest::read_file(path("ref_bf16.jsonl"))) << l.flags;
    }
  }
}

TEST_F(ParallelCli, ConvertRoundTripAndAudit) {
  const std::string sharded = path("sharded"), back = path("back");
  auto r = shell(ptest::lockstep_bin() + " convert --input " + model() + " --output " + sharded + " " + kTopoA);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(sharded + "/lockstep_sharded.json"));
  EXPECT_TRUE(fs::exists(sharded + "/rank00003.safetensors"));
  r = shell(ptest::lockstep_bin() + " convert --input " + sharded + " --output " + back + " --to hf");
  ASSERT_EQ(r.status, 0) << r.output;

  // Byte-identical tensors.
  SafetensorsReader a = SafetensorsReader::open(model()), b = SafetensorsReader::open(back);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) {
    const Tensor &x = a.get(name), &y = b.get(name);
    ASSERT_EQ(x.dtype(), y.dtype()) << name;
    ASSERT_EQ(x.shape(), y.shape()) << name;
    ASSERT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0) << name;
  }
  // Audit agrees: HF vs HF and HF vs sharded.
  r = shell(ptest::lockstep_bin() + " audit --model " + model() + " --compare " + back);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("no difference"), std::string::npos) << r.output;
  r = shell(ptest::lockstep_bin() + " audit --model " + sharded + " --compare " + model() + " --json");
  EXPECT_EQ(r.status, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  EXPECT_TRUE(j["identical"].get<bool>());
  EXPECT_EQ(j["a"]["tensors"].size(), a.names().size());

  // Score from the sharded checkpoint under another topology (resharded by box) and on one rank.
  ASSERT_FALSE(reference().empty());
  r = shell(ptest::mpirun(2) + " score --model " + sharded + " --input " + input() + " --output " +
            path("from_sharded.jsonl") + " --tensor-model-parallel-size 2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(ptest::read_file(path("from_sharded.jsonl")), reference());
  r = shell(ptest::lockstep_bin() + " score --model " + sharded + " --input " + input() + " --output " +
            path("from_sharded1.jsonl"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(ptest::read_file(path("from_sharded1.jsonl")), reference());
}

TEST_F(ParallelCli, TopologySubdirLoadsWithoutResharding) {
  const std::string out = path("multi");
  auto r = shell(ptest::lockstep_bin() + " convert --input " + model() + " --output " + out +
                 " --topology-subdir --expert-model-parallel-size 2 --data-parallel-size 2");
  ASSERT_EQ(r.status, 0) << r.output;
  ASSERT_TRUE(fs::exists(out + "/tp1_pp1_ep2_etp1_dp2/lockstep_sharded.json"));
  ASSERT_TRUE(fs::exists(out + "/config.json"));
  ASSERT_FALSE(reference().empty());
  r = shell(ptest::mpirun(2) + " score --model " + out + " --input " + input() + " --output " +
            path("subdir.jsonl") + " --expert-model-parallel-size 2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(ptest::read_file(path("subdir.jsonl")), reference());
}

// A copy of the fixture with some tensors changed by one ulp.
void write_mutated(const std::string& from, const std::string& to, const std::vector<std::string>& names) {
  fs::create_directories(to);
  fs::copy_file(from + "/config.json", to + "/config.json");
  SafetensorsReader r = SafetensorsReader::open(from);
  std::map<std::string, Tensor> all;
  for (const auto& n : r.names()) all[n] = r.get(n).clone();
  for (const auto& n : names) static_cast<uint16_t*>(all.at(n).raw())[5] ^= 1;  // bf16 fixture
  write_safetensors(to + "/model.safetensors", all);
}

TEST_F(ParallelCli, AuditNamesTheFirstDifference) {
  const std::string changed = path("changed");
  // Two changes: the one earlier in global-name order (layer 0 before layer 1) is named.
  write_mutated(model(), changed,
                {"model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.0.mlp.experts.5.down_proj.weight"});
  auto r = shell(ptest::lockstep_bin() + " audit --model " + model() + " --compare " + changed);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("first difference: tensor 'model.layers.0.mlp.experts.5.down_proj.weight' differs (contents)"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("[layer 0 experts] [layer 1 experts]"), std::string::npos) << r.output;
  r = shell(ptest::lockstep_bin() + " audit --json --model " + changed + " --compare " + model());
  EXPECT_EQ(r.status, 1);
  auto j = nlohmann::json::parse(r.output);
  EXPECT_FALSE(j["identical"].get<bool>());
  EXPECT_NE(j["first_difference"].get<std::string>().find("model.layers.0.mlp.experts.5.down_proj.weight"),
            std::string::npos);
}

TEST_F(ParallelCli, InvalidTopologiesAreRefusedBeforeWork) {
  struct Bad {
    int np;
    std::string flags, message;
  };
  // The input file does not exist: the topology must be refused before it is read.
  for (const Bad& b : {Bad{1, "--tensor-model-parallel-size 3", "not divisible by tp*pp = 3"},
                       Bad{3, "--tensor-model-parallel-size 3", "tp=3 is not supported"},
                       Bad{3, "--expert-model-parallel-size 3", "ep=3 does not divide num_experts=8"},
                       Bad{1, "--sequence-parallel", "sequence parallel needs tp > 1"},
                       Bad{1, "--pipeline-model-parallel-size 2", "world size 1 is not divisible"},
                       Bad{8, "--tensor-model-parallel-size 8", "does not divide num_attention_heads=4"},
                       Bad{2, "--pipeline-model-parallel-size 2 --pipeline-layer-split 2,1", "layer"},
                       Bad{1, "--expert-model-parallel-size 2", "must divide tp*dp"}}) {
    const std::string launcher = b.np == 1 ? ptest::lockstep_bin() : ptest::mpirun(b.np);
    auto r = shell(launcher + " score --model " + model() + " --input " + path("missing.jsonl") + " --output " +
                   path("never.jsonl") + " " + b.flags);
    EXPECT_NE(r.status, 0) << b.flags;
    EXPECT_NE(r.output.find(b.message), std::string::npos) << b.flags << "\n" << r.output;
    EXPECT_EQ(r.output.find("missing.jsonl"), std::string::npos) << b.flags << "\n" << r.output;
    EXPECT_FALSE(fs::exists(path("never.jsonl")));
  }
}

// Sharded checkpoints that do not fit the model or whose metadata disagree are refused
// before any weight is read.
TEST_F(ParallelCli, MismatchedCheckpointsAreRefused) {
  const std::string good = path("mm_good");
  auto r = shell(ptest::lockstep_bin() + " convert --input " + model() + " --output " + good +
                 " --tensor-model-parallel-size 2 --data-parallel-size 1");
  ASSERT_EQ(r.status, 0) << r.output;
  auto copy = [&](const std::string& name) {
    const std::string to = path(name);
    fs::copy(good, to, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    return to;
  };
  auto edit_json = [](const std::string& file, const std::function<void(nlohmann::json&)>& f) {
    nlohmann::json j = nlohmann::json::parse(ptest::read_file(file));
    f(j);
    std::ofstream(file) << j.dump();
  };
  auto score = [&](const std::string& dir, const std::string& flags, int np = 1) {
    return shell((np == 1 ? ptest::lockstep_bin() : ptest::mpirun(np)) + " score --model " + dir + " --input " + input() + " --output " +
                 path("mm_out.jsonl") + " " + flags);
  };
  struct Case {
    std::string name, message;
    std::function<void(const std::string&)> damage;
  };
  const std::vector<Case> cases = {
      {"mm_config", "but config.json expects",
       [&](const std::string& d) {  // the config describes another model
         edit_json(d + "/config.json", [](nlohmann::json& j) { j["moe_intermediate_size"] = 16; });
       }},
      {"mm_shape", "pieces",
       [&](const std::string& d) {  // the index claims a shape its pieces do not tile
         edit_json(d + "/lockstep_sharded.json",
                   [](nlohmann::json& j) { j["tensors"]["model.norm.weight"]["shape"] = {128}; });
       }},
      {"mm_topology", "tp8",
       [&](const std::string& d) {  // metadata topology invalid for this model / file count
         edit_json(d + "/lockstep_sharded.json", [](nlohmann::json& j) { j["topology"] = "tp8_pp1_ep1_etp1_dp1"; });
       }},
      {"mm_split", "pipeline_layer_split",
       [&](const std::string& d) {
         edit_json(d + "/lockstep_sharded.json", [](nlohmann::json& j) { j["pipeline_layer_split"] = {1}; });
       }},
  };
  for (const Case& c : cases) {
    const std::string dir = copy(c.name);
    c.damage(dir);
    r = score(dir, "");
    EXPECT_NE(r.status, 0) << c.name;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.name << "\n" << r.output;
  }
  // A topology directory holding shards of another topology.
  const std::string parent = path("mm_parent");
  fs::create_directories(parent);
  fs::copy_file(model() + "/config.json", parent + "/config.json");
  fs::copy(good, parent + "/tp1_pp1_ep2_etp1_dp2", fs::copy_options::recursive);
  r = score(parent, "--expert-model-parallel-size 2", 2);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("written for tp2_pp1_ep1_etp1_dp1, not tp1_pp1_ep2_etp1_dp2"), std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace lockstep
