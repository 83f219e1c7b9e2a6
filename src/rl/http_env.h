// --rollout-env-url http://HOST:PORT/PATH: an environment server. After each policy turn it gets
// one JSON POST per episode with the conversation so far and answers the next observation, a
// reward and whether the episode is done (the format is in docs/rollout.md). Requests run
// --rm-concurrency at a time and are retried like --rm-url's (--rollout-env-timeout,
// --rollout-env-retries); an answer that is not the format is retried too, and after the last
// retry the run stops with an error naming the URL, the episode and what was wrong.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "rl/episode.h"
#include "rl/train_config.h"

namespace lockstep::dist {
class Communicator;
}

namespace lockstep::rl {

// What the server receives for `episode`.
nlohmann::json env_request(const Episode& episode, const PromptSample& sample, const Tokenizer& tokenizer);

// Checks and reads one answer; throws lockstep::Error saying what is wrong with it.
EnvReply parse_env_answer(const std::string& answer);

std::unique_ptr<Environment> make_http_env(const TrainConfig& config, EpisodeData& source, dist::Communicator* world);

}  // namespace lockstep::rl
