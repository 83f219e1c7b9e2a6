// Non-finite numbers: config values that must be positive and finite, weights holding NaN
// or infinity (named at load and by audit), and JSONL output that never prints NaN.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>

#include "../error_of.h"
#include "checkpoint/audit.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "core/finite.h"
#include "core/jsonl.h"
#include "model/config.h"
#include "model/weights.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;

const std::string kModel = std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe";
constexpr double kInf = std::numeric_limits<double>::infinity();
const double kBadPositive[] = {0.0, -1e-6, -1.0, std::nan(""), kInf, -kInf};

using testing::error_of;

nlohmann::json fixture_config() {
  std::ifstream in(kModel + "/config.json");
  return nlohmann::json::parse(in);
}

TEST(NonFinite, ConfigFieldsMustBePositiveAndFinite) {
  EXPECT_NO_THROW(ModelConfig::from_json(fixture_config(), "config.json"));
  for (const char* field : {"rms_norm_eps", "rope_theta"}) {
    for (double v : kBadPositive) {
      auto j = fixture_config();
      j[field] = v;  // NaN and infinity stand for what a config built in code may hold
      EXPECT_EQ(error_of([&] { ModelConfig::from_json(j, "config.json"); }),
                "config.json: field '" + std::string(field) + "' must be a positive finite number, got " +
                    (std::ostringstream() << v).str())
          << field << " = " << v;
    }
  }
  auto nested = fixture_config();
  nested.erase("rope_theta");
  nested["rope_parameters"] = {{"rope_theta", -5.0}};
  EXPECT_NE(error_of([&] { ModelConfig::from_json(nested, "config.json"); }).find("rope_theta"), std::string::npos);
  for (int64_t v : {int64_t(0), int64_t(-1), std::numeric_limits<int64_t>::min()}) {
    auto j = fixture_config();
    j["max_position_embeddings"] = v;
    EXPECT_NE(
        error_of([&] { ModelConfig::from_json(j, "config.json"); }).find("'max_position_embeddings' must be positive"),
        std::string::npos);
  }
}

// A copy of the fixture model whose tensor `name` holds `value` at flat index 1.
class PoisonedModel : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("lockstep_non_finite_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    fs::copy_file(kModel + "/config.json", dir_ / "config.json", fs::copy_options::overwrite_existing);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void poison(const std::string& name, float value) {
    const auto reader = SafetensorsReader::open(kModel);
    std::map<std::string, Tensor> tensors;
    for (const auto& n : reader.names()) tensors[n] = reader.get(n).clone();
    Tensor t = tensors.at(name).to_f32();
    t.data<float>()[1] = value;
    tensors[name] = t;
    write_safetensors((dir_ / "model.safetensors").string(), tensors);
  }
  fs::path dir_;
};

TEST_F(PoisonedModel, LoadNamesTheTensorAndAuditCountsIt) {
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  for (float v : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity()}) {
    poison(name, v);
    const std::string err = error_of([&] { ModelWeights::load(dir_.string(), Precision::float32); });
    EXPECT_NE(err.find("tensor '" + name + "' holds 1 non-finite value (the first, "), std::string::npos) << err;
    EXPECT_NE(err.find("at flat index 1)"), std::string::npos) << err;
    const CheckpointAudit a = audit_checkpoint(*open_checkpoint(dir_.string()));
    EXPECT_EQ(non_finite_tensors(a), std::vector<std::string>{"tensor '" + name + "' holds 1 non-finite value"});
  }
  poison(name, 3.0e38f);  // large but finite: loads
  EXPECT_NO_THROW(ModelWeights::load(dir_.string(), Precision::float32));
  EXPECT_TRUE(non_finite_tensors(audit_checkpoint(*open_checkpoint(dir_.string()))).empty());
}

TEST(NonFinite, FindAndPrintNeverPassNaN) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float values[] = {1.0f, nan, -2.0f, inf, -inf, 3.4e38f};
  const NonFinite bad = find_non_finite(values, 6);
  EXPECT_EQ(bad.count, 3);
  EXPECT_EQ(bad.first, 1);
  EXPECT_EQ(find_non_finite(values + 5, 1).count, 0);
  EXPECT_EQ(format_floats(values, 1), "[1]");
  for (int i : {1, 3, 4})
    EXPECT_NE(error_of([&] { format_floats(values, size_t(i) + 1); }).find("is not finite"), std::string::npos);
}

}  // namespace
}  // namespace lockstep
