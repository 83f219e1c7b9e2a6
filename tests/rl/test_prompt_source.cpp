// Prompt data in `lockstep train`: the data source's prompts, stops and rewards, its checks
// before any work, and whole runs on a data set with the real tokenizer (true on-policy, and a
// resume mid-epoch that continues bit for bit).
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>

#include "core/error.h"
#include "rl/prompt_source.h"
#include "rl/train_checkpoint.h"
#include "rl/trainer.h"
#include "rl_data_util.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

namespace fs = std::filesystem;
using testing::read_bytes;
using testing::read_metrics;
using testing::TempDir;
using testing::without_perf;

const char* kData = R"({"prompt": "What is 2 + 2? Put the answer in \\boxed{}.", "label": "4"})"
                    "\n"
                    R"({"prompt": "What is 1 / 2?", "label": "0.5"})"
                    "\n"
                    R"({"prompt": "What is 3 + 4?", "label": 7})"
                    "\n";

TrainConfig data_config(const TempDir& dir) {
  TrainConfig c;
  c.prompt_data = dir.sub("data.jsonl");
  if (!fs::exists(c.prompt_data)) std::ofstream(c.prompt_data) << kData;
  c.tokenizer = testing::fixture_tokenizer_dir();
  c.sft_warmup_steps = 0;
  c.progress = false;
  c.output_dir = dir.sub("out");
  return c;
}

std::string error_of(const TrainConfig& c) {
  try {
    validate(c);
    make_prompt_source(c);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(PromptSource, PromptsInFileOrderAndRewardsFromTheirLabels) {
  TempDir dir("source");
  TrainConfig c = data_config(dir);
  auto source = make_prompt_source(c);
  const Tokenizer tok = Tokenizer::load(c.tokenizer);
  EXPECT_EQ(source->prompt(5, 0).prompt, tok.encode("What is 2 + 2? Put the answer in \\boxed{}."));
  EXPECT_EQ(source->prompt(5, 4).prompt, tok.encode("What is 1 / 2?"));  // epoch 2, second line
  EXPECT_EQ(source->max_prompt_len(), int64_t(tok.encode("What is 2 + 2? Put the answer in \\boxed{}.").size()));
  std::vector<std::vector<int32_t>> responses = {
      tok.encode("So \\boxed{4}.<|im_end|>"),
      tok.encode("\\boxed{\\frac12}<|im_end|>"),
      tok.encode("\\boxed{8}<|im_end|>"),
      tok.encode("it is 7"),
      tok.encode("\\boxed{7}"),
  };
  std::vector<TaskExample> prompts(responses.size());
  EXPECT_EQ(source->rewards({0, 1, 2, 2, 5}, prompts, responses), (std::vector<float>{1, 1, 0, 0, 1}));
  c.rm_type = "dapo";
  EXPECT_EQ(make_prompt_source(c)->rewards({0, 1, 2}, prompts, {responses[0], responses[1], responses[2]}),
            (std::vector<float>{1, 1, -1}));
  rollout::GenerationRequest req;
  c.rollout_stop = R"(["\n\n", "Question:"])";
  make_prompt_source(c)->set_stops(req);
  EXPECT_NE(std::find(req.stop_token_ids.begin(), req.stop_token_ids.end(), *tok.token_id("<|im_end|>")),
            req.stop_token_ids.end());
  EXPECT_NE(std::find(req.stop_token_ids.begin(), req.stop_token_ids.end(), *tok.token_id("<|endoftext|>")),
            req.stop_token_ids.end());
  EXPECT_EQ(req.stop_strings, (std::vector<std::string>{"\n\n", "Question:"}));
}

TEST(PromptSource, ShuffleIsKeyedBySeedAndCoversEachEpoch) {
  TempDir dir("source_shuffle");
  TrainConfig c = data_config(dir);
  c.rollout_shuffle = true;
  auto a = make_prompt_source(c), b = make_prompt_source(c);
  std::vector<std::vector<int32_t>> epoch, seen_b;
  for (int64_t p = 0; p < 3; ++p) epoch.push_back(a->prompt(9, p).prompt);
  for (int64_t p = 2; p >= 0; --p) seen_b.insert(seen_b.begin(), b->prompt(9, p).prompt);
  EXPECT_EQ(epoch, seen_b);
  std::sort(epoch.begin(), epoch.end());
  EXPECT_EQ(std::unique(epoch.begin(), epoch.end()), epoch.end());  // three different prompts
}

TEST(PromptSource, BadDataFlagsAreErrorsBeforeAnyWork) {
  TempDir dir("source_errors");
  TrainConfig c = data_config(dir);
  c.sft_warmup_steps = 5;
  EXPECT_EQ(error_of(c),
            "--sft-warmup-steps 5: the SFT warm start needs demonstrations: give --sft-data F.jsonl or set it to 0");
  c = data_config(dir);
  c.num_epoch = 1;
  c.num_rollout = 2;
  c.rollout_batch_size = 2;
  c.global_batch_size = 16;
  EXPECT_EQ(error_of(c), "--num-rollout 2 x --rollout-batch-size 2 = 4 prompts exceeds --num-epoch 1 x 3 prompts of " +
                             c.prompt_data);
  c = data_config(dir);
  c.tokenizer = "";
  EXPECT_NE(error_of(c).find("--prompt-data needs a tokenizer: --tokenizer DIR or --load DIR with tokenizer.json"),
            std::string::npos);
  c = data_config(dir);
  c.prompt_data = dir.sub("missing.jsonl");
  EXPECT_EQ(error_of(c), "--prompt-data " + c.prompt_data + ": file not found");
  c = data_config(dir);
  c.rm_type = "rouge";
  EXPECT_EQ(error_of(c), "--rm-type: expected math | dapo | exact, got 'rouge'");
  c.rm_type = "math";
  c.rollout_stop = R"(["ok", 3])";
  EXPECT_EQ(error_of(c), "--rollout-stop: element 1 must be a non-empty string, got 3");
  TrainConfig task_run;
  task_run.rollout_stop = "x";
  EXPECT_EQ(error_of(task_run), "--rollout-stop needs --prompt-data (the built-in tasks have no text)");
  task_run.rollout_stop = "";
  task_run.custom_rm_cmd = "cat";
  EXPECT_EQ(error_of(task_run),
            "--rm-url and --custom-rm-cmd need --prompt-data (the built-in tasks score themselves)");
  task_run.rm_url = "http://127.0.0.1:1/";
  EXPECT_EQ(error_of(task_run), "--rm-url and --custom-rm-cmd: give one reward, not both");
  task_run.custom_rm_cmd = "";
  task_run.rm_url = "ftp://x";
  EXPECT_EQ(error_of(task_run), "--rm-url: expected http://HOST:PORT/PATH, got 'ftp://x'");
  task_run.rm_url = "";
  task_run.rm_timeout = 0;
  EXPECT_EQ(error_of(task_run), "--rm-timeout: expected seconds > 0, got 0");
  c = data_config(dir);
  EXPECT_NE(error_of(c), "x");
  c.label_key = "answer";
  EXPECT_EQ(error_of(c), c.prompt_data + ":1: missing key 'answer' (the answer; see --label-key)");
  // The embedded tiny model cannot hold the tokenizer's ids: an error before any work.
  c = data_config(dir);
  try {
    run_training(c);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the embedded tiny model: vocab_size 32 is smaller than the tokenizer's"),
              std::string::npos)
        << e.what();
  }
}

// A few steps on the data set with the real tokenizer: 2 prompts x 2 samples, short answers.
TrainConfig data_run(const TempDir& dir, const std::string& name) {
  TrainConfig c = data_config(dir);
  c.load = testing::make_text_model_dir(dir.sub("model"));
  c.tokenizer = "";  // from --load
  c.rollout_shuffle = true;
  c.num_rollout = 3;
  testing::small_batches(c);
  c.rollout_max_response_len = 6;
  c.output_dir = dir.sub(name + "_out");
  return c;
}

TEST(PromptDataRun, TrainsOnPolicyAndResumesMidEpochBitForBit) {
  TempDir dir("data_run");
  TrainConfig full = data_run(dir, "full"), part = data_run(dir, "part");
  full.save = dir.sub("save_full");
  part.save = dir.sub("save_part");
  TrainSummary s = run_training(full);
  EXPECT_EQ(s.steps_run, 3);
  EXPECT_EQ(s.max_abs_diff, 0.0);
  auto metrics = read_metrics(full);
  ASSERT_EQ(metrics.size(), 3u);
  for (const auto& m : metrics) {
    EXPECT_EQ(m["train/train_rollout_logprob_abs_diff"], 0.0);
    EXPECT_LE(m["rollout/response_lengths"].get<double>(), 6.0);
    EXPECT_EQ(m["rollout/skipped_long_prompts"], 0);
    const double reward = m["rollout/rewards"].get<double>();
    EXPECT_TRUE(reward >= 0.0 && reward <= 1.0);
  }
  EXPECT_DOUBLE_EQ(metrics[2]["rollout/epoch"].get<double>(), 2.0);  // 6 prompts of 3
  part.debug_stop_after = 1;  // killed after step 1: data position 2 of 3, mid-epoch
  EXPECT_EQ(run_training(part).steps_run, 1);
  part.debug_stop_after = -1;
  part.resume = true;
  EXPECT_EQ(run_training(part).steps_run, 2);
  EXPECT_EQ(without_perf(read_metrics(full)), without_perf(read_metrics(part)));
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "trainer_state.json"})
    EXPECT_EQ(read_bytes(fs::path(checkpoint_dir(full.save, 3)) / f),
              read_bytes(fs::path(checkpoint_dir(part.save, 3)) / f))
        << f;
}

}  // namespace
}  // namespace lockstep::rl

namespace lockstep::rl {
namespace {

// The random model almost never samples an end token, so without stop strings every response
// runs to the length limit; with a stop string as common as "e" most stop early, at the string.
TEST(PromptDataRun, RolloutStopStringsEndResponses) {
  TempDir dir("data_stop");
  TrainConfig plain = data_run(dir, "plain"), stopped = data_run(dir, "stopped");
  plain.num_rollout = stopped.num_rollout = 1;
  stopped.rollout_stop = R"(["e", "a"])";
  run_training(plain);
  run_training(stopped);
  const auto p = read_metrics(plain).at(0), s = read_metrics(stopped).at(0);
  EXPECT_EQ(p["rollout/truncated_ratio"], 1.0);
  EXPECT_LT(s["rollout/truncated_ratio"].get<double>(), 1.0);
  EXPECT_LT(s["rollout/response_len/mean"].get<double>(), p["rollout/response_len/mean"].get<double>());
}

}  // namespace
}  // namespace lockstep::rl
