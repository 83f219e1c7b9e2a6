// Rollouts of one or more turns (docs/rollout.md, "Multi-turn rollouts"): the policy answers, an
// environment replies with observation tokens, a reward and whether the episode is done, and the
// policy goes on from the whole sequence so far. The policy's tokens stay exactly as sampled
// (token in, token out: never decoded and re-encoded); the environment's tokens enter the
// sequence with loss mask 0. A single-turn rollout is the environment that ends every episode
// after the first turn with the run's reward.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rl/eval.h"
#include "rl/tasks.h"
#include "rollout/request.h"

namespace lockstep::rl {

// A stretch of an episode's response: the policy's turn or the environment's observation.
struct EpisodeSpan {
  int64_t begin = 0, end = 0;  // [begin, end) in Episode::response
  bool policy = true;
  std::string role, content;  // an observation as a chat message ("user" or "tool")
};

struct Episode {
  int64_t position = 0;            // the data position of the prompt
  TaskExample example;             // the prompt (and a built-in task's answer)
  std::vector<int32_t> response;   // everything after the prompt: the policy's and the environment's tokens
  std::vector<uint8_t> loss_mask;  // per response token: 1 sampled by the policy, 0 from the environment
  std::vector<float> logprobs;     // per response token: the engine's log-prob (0 where loss_mask is 0)
  std::vector<int64_t> versions;   // per policy token: the weight version that sampled it
  std::vector<EpisodeSpan> spans;  // the turns and observations, in order
  int64_t policy_turns = 0;
  bool truncated = false;  // the last turn was cut by a length limit, or the last observation did not fit
  float reward = 0;
  // The policy's latest turn.
  std::vector<int32_t> last_turn() const;
  // The log-probs of the policy's tokens, in order (the trained tokens).
  std::vector<float> policy_logprobs() const;
};

// What the environment answers after a policy turn.
struct EnvReply {
  std::vector<int32_t> observation;  // appended with loss mask 0 when the episode goes on
  float reward = 0;                  // the episode's reward if it ends here
  bool done = true;
  std::string role, content;  // the observation as a chat message, for the conversation's record
};

// What an environment may ask about the episodes it answers: the data set's sample an episode's
// prompt came from (keyed by Episode::position), the tokenizer, and the run's reward of final
// answers. The prompt source serves the rollouts; the evaluator serves its eval sets.
class EpisodeData {
 public:
  virtual ~EpisodeData() = default;
  // Rewards of final answers, in order: response i answers the prompt at positions[i].
  virtual std::vector<float> rewards(const std::vector<int64_t>& positions, const std::vector<TaskExample>& prompts,
                                     const std::vector<std::vector<int32_t>>& responses) = 0;
  // The data set's sample at `position`, and the tokenizer; null for built-in tasks.
  virtual const PromptSample* data_sample(int64_t position) { return nullptr; }
  virtual const Tokenizer* tokenizer() const { return nullptr; }
};

class Environment {
 public:
  virtual ~Environment() = default;
  // Replies to each episode that has just ended a policy turn, in order. Errors are
  // lockstep::Error naming the flag and the episode.
  virtual std::vector<EnvReply> reply(const std::vector<const Episode*>& episodes) = 0;
};

struct EpisodeLimits {
  int64_t max_turns = 1;         // policy turns per episode
  int64_t max_response_len = 0;  // response tokens (policy and environment) per episode
  int64_t max_turn_len = 0;      // tokens per policy turn (0: what is left of max_response_len)
};

// Runs every episode to its end. `requests[i]` is episode i's first turn (its prompt, sampling
// and stops); each later turn is the same request over the prompt and the response so far, with
// at most the tokens left to the response budget. The unfinished episodes' turns are generated as
// one batch. A turn cut by max_turn_len still goes to the environment. An episode ends when the
// environment says done, at the last turn, or (truncated) when the response budget is used up or
// the observation does not fit it; its reward is the last reply's. A refused turn's error names
// `what` and `step` ("rollout step 3", "evaluation at step 3").
void run_episodes(std::vector<Episode>& episodes, const std::vector<rollout::GenerationRequest>& requests,
                  Environment& env, const GenerateFn& generate, const EpisodeLimits& limits, int64_t step,
                  const char* what = "rollout step");

}  // namespace lockstep::rl
