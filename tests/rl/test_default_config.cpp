// configs/default.toml mirrors the embedded default of `lockstep train`.
#include <gtest/gtest.h>

#include "rl/train_config.h"

namespace lockstep::rl {
namespace {

TEST(RlDefaultConfig, FileMirrorsTheEmbeddedDefault) {
  TrainConfig from_file;
  from_file.num_rollout = -7;  // so a key missing from the file shows up
  apply_toml_file(from_file, std::string(LOCKSTEP_SOURCE_DIR) + "/configs/default.toml");
  TrainConfig embedded;
  embedded.num_rollout = from_file.num_rollout == -7 ? -8 : embedded.num_rollout;
  EXPECT_EQ(to_toml(from_file), to_toml(embedded));
  validate(embedded);
}

}  // namespace
}  // namespace lockstep::rl
