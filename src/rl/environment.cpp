#include "rl/environment.h"

#include "core/error.h"
#include "rl/calculator_env.h"
#include "rl/http_env.h"
#include "rl/rewards/http_post.h"

namespace lockstep::rl {

namespace {

// One turn: every episode ends after the policy's answer, with the run's reward of it.
class SingleTurn : public Environment {
 public:
  explicit SingleTurn(EpisodeData& source) : source_(source) {}
  std::vector<EnvReply> reply(const std::vector<const Episode*>& episodes) override {
    std::vector<int64_t> positions;
    std::vector<TaskExample> prompts;
    std::vector<std::vector<int32_t>> responses;
    for (const Episode* e : episodes) {
      positions.push_back(e->position);
      prompts.push_back(e->example);
      responses.push_back(e->last_turn());
    }
    std::vector<EnvReply> out;
    for (float r : source_.rewards(positions, prompts, responses)) {
      EnvReply reply;
      reply.reward = r;
      out.push_back(std::move(reply));
    }
    return out;
  }

 private:
  EpisodeData& source_;
};

}  // namespace

std::unique_ptr<Environment> make_environment(const TrainConfig& c, EpisodeData& source, dist::Communicator* world) {
  if (!c.rollout_env_url.empty()) return make_http_env(c, source, world);
  if (c.rollout_tool == "calculator") return make_calculator_env(source);
  return std::make_unique<SingleTurn>(source);
}

std::vector<std::string> rollout_tool_definitions(const std::string& tool) {
  if (tool == "calculator") return {calculator_tool_definition()};
  return {};
}

void validate_environment_options(const TrainConfig& c) {
  LS_CHECK(c.rollout_tool.empty() || c.rollout_tool == "calculator", "--rollout-tool: expected calculator, got '",
           c.rollout_tool, "'");
  LS_CHECK(c.rollout_max_turns >= 1, "--rollout-max-turns: expected >= 1, got ", c.rollout_max_turns);
  LS_CHECK(c.rollout_max_turn_len >= 0, "--rollout-max-turn-len: expected >= 0, got ", c.rollout_max_turn_len);
  LS_CHECK(c.rollout_env_timeout > 0, "--rollout-env-timeout: expected seconds > 0, got ", c.rollout_env_timeout);
  LS_CHECK(c.rollout_env_retries >= 0, "--rollout-env-retries: expected >= 0, got ", c.rollout_env_retries);
  const bool multi_turn = !c.rollout_tool.empty() || !c.rollout_env_url.empty();
  if (!multi_turn) return;
  LS_CHECK(c.rollout_tool.empty() || c.rollout_env_url.empty(),
           "--rollout-tool and --rollout-env-url: give one environment, not both");
  LS_CHECK(!c.prompt_data.empty(), c.rollout_tool.empty() ? "--rollout-env-url" : "--rollout-tool",
           " needs --prompt-data (an environment speaks text; the built-in tasks have none)");
  LS_CHECK(c.rollout_tool.empty() || c.apply_chat_template,
           "--rollout-tool needs --apply-chat-template (tool calls use the chat template's format)");
  if (!c.rollout_env_url.empty()) parse_http_url(c.rollout_env_url, "--rollout-env-url");
}

}  // namespace lockstep::rl
