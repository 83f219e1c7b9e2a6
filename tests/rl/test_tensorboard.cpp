// --tensorboard-dir: event files that read back (CRCs checked) to the metrics.jsonl values.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "core/error.h"
#include "rl/tensorboard.h"
#include "rl/trainer.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

namespace fs = std::filesystem;

TEST(TensorBoard, Crc32cMatchesTheStandardCheckValue) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);  // the CRC-32C check value
  EXPECT_EQ(crc32c("", 0), 0u);
}

TEST(TensorBoard, WrittenScalarsReadBackAndCorruptionIsCaught) {
  testing::TempDir dir("tb_unit");
  std::string path;
  {
    TensorBoardWriter w(dir.sub("tb"));
    path = w.path();
    w.write(3, {{"step", 3}, {"train/loss", 0.25}, {"note", "text"}, {"rollout/rewards", 1}});
    w.write(4, {{"step", 4}, {"train/loss", -1.5}});
  }
  EXPECT_EQ(fs::path(path).filename().string().rfind("events.out.tfevents.", 0), 0u);
  auto scalars = read_tensorboard_scalars(path);
  ASSERT_EQ(scalars.size(), 3u);  // the text value and the step keys are not scalars
  EXPECT_EQ(scalars[0].step, 3);
  EXPECT_EQ(scalars[0].tag, "rollout/rewards");
  EXPECT_EQ(scalars[0].value, 1.0f);
  EXPECT_EQ(scalars[1].tag, "train/loss");
  EXPECT_EQ(scalars[1].value, 0.25f);
  EXPECT_EQ(scalars[2].step, 4);
  EXPECT_EQ(scalars[2].value, -1.5f);
  std::string bytes = testing::read_bytes(path);
  bytes[bytes.size() - 9] ^= 1;  // inside the last event's data
  std::ofstream(path, std::ios::binary) << bytes;
  try {
    read_tensorboard_scalars(path);
    FAIL() << "expected a CRC error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("data CRC mismatch"), std::string::npos) << e.what();
  }
}

TEST(TensorBoard, TrainingRunWritesEveryMetric) {
  testing::TempDir dir("tb_run");
  TrainConfig c = testing::tiny_run(dir, "tb");
  c.tensorboard_dir = dir.sub("tb");
  run_training(c);
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(c.tensorboard_dir)) files.push_back(e.path());
  ASSERT_EQ(files.size(), 1u);
  auto scalars = read_tensorboard_scalars(files[0].string());
  size_t expected = 0;
  for (const auto& m : testing::read_metrics(c)) {
    const int64_t step = m.contains("step") ? m["step"].get<int64_t>() : m["sft_step"].get<int64_t>();
    for (const auto& [key, value] : m.items()) {
      if (key == "step" || key == "sft_step") continue;
      ++expected;
      bool found = false;
      for (const auto& s : scalars)
        if (s.step == step && s.tag == key && s.value == value.get<float>()) found = true;
      EXPECT_TRUE(found) << key << " at step " << step;
    }
  }
  EXPECT_EQ(scalars.size(), expected);
}

}  // namespace
}  // namespace lockstep::rl
