// Runs that could clobber each other: a resume whose run-defining options differ from the
// checkpoint's (every option is tried), a fresh run into a --save that holds a run, and a
// --save that cannot be written, all refused before the first step.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "../error_of.h"
#include "rl/train_checkpoint.h"
#include "rl/trainer.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

namespace fs = std::filesystem;
using lockstep::testing::error_of;
using testing::TempDir;
using testing::tiny_run;

// Another value of every kind of option.
void change(TrainConfig& c, const OptionField& field) {
  std::visit(
      [&](auto member) {
        using T = std::decay_t<decltype(c.*member)>;
        if constexpr (std::is_same_v<T, bool>)
          c.*member = !(c.*member);
        else if constexpr (std::is_same_v<T, std::string>)
          c.*member += "x";
        else if constexpr (std::is_same_v<T, double>)
          c.*member = c.*member * 2 + 1;
        else
          c.*member += 1;
      },
      field);
}

// The config of a one-step run whose checkpoint is in dir/save.
TrainConfig one_saved_step(const TempDir& dir) {
  TrainConfig c = tiny_run(dir, "a");
  c.num_rollout = 1;
  c.save = dir.sub("save");
  run_training(c);
  return c;
}

TEST(RunClobber, EveryOptionThatDefinesTheRunIsComparedOnResume) {
  TempDir dir("clobber_options");
  const TrainConfig base;
  std::ofstream(dir.sub("train_config.toml")) << to_toml(base);
  EXPECT_NO_THROW(check_same_run(dir.path().string(), to_toml(base)));
  for (const auto& option : train_options()) {
    TrainConfig other = base;
    change(other, option.field);
    const std::string err = error_of([&] { check_same_run(dir.path().string(), to_toml(other)); });
    EXPECT_EQ(err.rfind("--resume: --" + option.name + " differs from the run being resumed (", 0), 0u)
        << option.name << ": " << err;
  }
}

TEST(RunClobber, AResumeThatChangesTheRunIsRefusedByName) {
  TempDir dir("clobber_resume");
  TrainConfig c = one_saved_step(dir);
  c.resume = true;
  for (auto edit : std::vector<std::pair<std::string, std::function<void(TrainConfig&)>>>{
           {"lr", [](TrainConfig& t) { t.lr *= 2; }},
           {"dtype", [](TrainConfig& t) { t.dtype = "bfloat16"; }},
           {"lr-decay-style", [](TrainConfig& t) { t.lr_decay_style = "linear"; }},
           {"seed", [](TrainConfig& t) { t.seed += 1; }}}) {
    TrainConfig changed = c;
    edit.second(changed);
    const std::string err = error_of([&] { run_training(changed); });
    EXPECT_EQ(err.rfind("--resume: --" + edit.first + " differs", 0), 0u) << err;
  }
  // The topology and where output goes may change on resume.
  TrainConfig moved = c;
  moved.output_dir = dir.sub("elsewhere");
  moved.num_threads = 1;
  EXPECT_EQ(error_of([&] { run_training(moved); }), "");
}

TEST(RunClobber, AFreshRunNeverOverwritesARunUnlessAsked) {
  TempDir dir("clobber_fresh");
  TrainConfig c = one_saved_step(dir);
  const std::string checkpoint = checkpoint_dir(c.save, 1);
  const auto written = fs::last_write_time(fs::path(checkpoint) / "model.safetensors");
  const std::string err = error_of([&] { run_training(c); });
  EXPECT_NE(err.find("--save " + c.save + " already holds a run"), std::string::npos) << err;
  EXPECT_EQ(fs::last_write_time(fs::path(checkpoint) / "model.safetensors"), written);
  c.overwrite_save = true;
  EXPECT_EQ(error_of([&] { run_training(c); }), "");
  EXPECT_TRUE(fs::exists(checkpoint));
}

TEST(RunClobber, ASaveDirThatCannotBeWrittenFailsBeforeTheFirstStep) {
  TempDir dir("clobber_unwritable");
  std::ofstream(dir.sub("file")) << "a file, not a directory";
  TrainConfig c = tiny_run(dir, "a");
  c.save = dir.sub("file/save");
  const std::string err = error_of([&] { run_training(c); });
  EXPECT_EQ(err.rfind("--save " + c.save + ": cannot create the directory", 0), 0u) << err;
  EXPECT_FALSE(fs::exists(fs::path(c.output_dir) / "metrics.jsonl"));  // no step ran
}

}  // namespace
}  // namespace lockstep::rl
