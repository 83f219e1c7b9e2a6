// Helpers of the newcomer-config tests (CPU and GPU): a config file's job pointed at arith-data
// files in a test directory, at a tiny batch, and the counts of its metrics records.
#pragma once
#include <string>

#include "rl/arith_problems.h"
#include "rl/train_config.h"
#include "rl_data_util.h"
#include "rl_test_util.h"

namespace lockstep::rl::testing {

// `toml` (relative to the source tree) with its data written to `dir`/data (4 training, 1 eval
// problem per `train`/`eval`), the fixture tokenizer, its init-config made absolute, small
// batches and no progress display.
inline TrainConfig newcomer_config(const std::string& toml, const TempDir& dir, int64_t train = 4, int64_t eval = 1) {
  TrainConfig c;
  apply_toml_file(c, std::string(LOCKSTEP_SOURCE_DIR) + "/" + toml);
  write_arith_data(dir.sub("data"), 1, train, eval);
  c.init_config = std::string(LOCKSTEP_SOURCE_DIR) + "/" + c.init_config;
  c.tokenizer = fixture_tokenizer_dir();
  c.prompt_data = dir.sub("data") + "/train.jsonl";
  c.sft_data = dir.sub("data") + "/sft.jsonl";
  c.eval_prompt_data = "arith " + dir.sub("data") + "/eval.jsonl";
  small_batches(c);
  c.progress = false;
  c.output_dir = dir.sub("out");
  return c;
}

struct RecordCounts {
  int sft = 0, steps = 0, evals = 0;  // SFT steps, RL steps, eval/arith records
};

inline RecordCounts count_records(const TrainConfig& c) {
  RecordCounts n;
  for (const auto& m : read_metrics(c)) {
    n.sft += m.contains("sft_step");
    n.steps += m.contains("rollout/rewards");
    n.evals += m.contains("eval/arith");
  }
  return n;
}

}  // namespace lockstep::rl::testing
