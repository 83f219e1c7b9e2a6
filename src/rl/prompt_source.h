// Where the prompts of `lockstep train` come from and how their answers are scored: a built-in
// task (its own token vocabulary, exact token rewards, demonstrations for the SFT warm start), or
// a prompt data set (--prompt-data) with a real tokenizer, its end tokens and --rollout-stop
// strings, responses decoded to text and scored by --rm-type.
//
// Every draw is keyed by the seed the trainer passes and a position, never by stream state, so
// the data position in a checkpoint is all a resumed run needs.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/config.h"
#include "rl/episode.h"
#include "rl/eval.h"
#include "rl/prompt_dataset.h"
#include "rl/tasks.h"
#include "rl/train_config.h"
#include "rollout/request.h"

namespace lockstep::dist {
class Communicator;
}

namespace lockstep::rl {

// An EpisodeData for the rollouts: data_sample(position) is the sample drawn at that data
// position by prompt() (multi-turn environments need it; null for built-in tasks).
class PromptSource : public EpisodeData {
 public:
  // The prompt at the run's data `position`; `data_seed` keys the draw (and the shuffle).
  virtual TaskExample prompt(uint64_t data_seed, int64_t position) = 0;
  // SFT demonstration number `index` (prompt and the response to imitate).
  virtual TaskExample demonstration(uint64_t data_seed, int64_t index) = 0;
  // The longest prompt this source can give, in tokens.
  virtual int64_t max_prompt_len() const = 0;
  // The longest prompt + response of a rollout or an evaluation (sizes the engine's KV pool).
  virtual int64_t max_sequence_len() const = 0;
  // Checks the model can hold the vocabulary and prompt + response; errors name `where`.
  virtual void check_model(const ModelConfig& config, const std::string& where) const = 0;
  // Stop conditions for a request (the engine also stops at the model config's EOS ids).
  virtual void set_stops(rollout::GenerationRequest& request) const = 0;
  // Turns ids into text (stop strings, error messages, rewards).
  virtual std::string text(const std::vector<int32_t>& ids) const = 0;
  // Per-step metrics of the source beyond the trainer's own (none for built-in tasks).
  virtual void add_metrics(nlohmann::json& metrics) const {}
  // The run's ranks (mpirun or threads): an outside reward (--rm-url, --custom-rm-cmd) is then
  // called on rank 0 only and its rewards (or its error) sent to every rank.
  virtual void set_world(dist::Communicator* world) {}
  // Whether an evaluation runs after RL step `step` (0: before the first), and running it: the
  // metrics record (rl/eval.h). Built-in tasks have no evaluation.
  virtual bool eval_due(int64_t step) const { return false; }
  // Evaluation episodes run in the run's environment (one turn, the tool or the env server).
  virtual nlohmann::json evaluate(int64_t step, uint64_t seed, const GenerateFn& generate) { return {}; }
};

// The built-in task, or the prompt data set when --prompt-data is set. Reads and checks all
// data before returning; errors name the flag, file, line and key.
std::unique_ptr<PromptSource> make_prompt_source(const TrainConfig& config);

// The checks of the data and reward flags that need no file read (part of validate()).
void validate_prompt_source_options(const TrainConfig& config);

// --rollout-stop as given: a JSON array of strings, or one plain string ("" = none).
std::vector<std::string> parse_rollout_stop(const std::string& value);

}  // namespace lockstep::rl
