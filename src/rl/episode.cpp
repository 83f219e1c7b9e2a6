#include "rl/episode.h"

#include <algorithm>

#include "core/error.h"

namespace lockstep::rl {

std::vector<int32_t> Episode::last_turn() const {
  for (auto it = spans.rbegin(); it != spans.rend(); ++it)
    if (it->policy) return std::vector<int32_t>(response.begin() + it->begin, response.begin() + it->end);
  return {};
}

std::vector<float> Episode::policy_logprobs() const {
  std::vector<float> out;
  for (size_t t = 0; t < response.size(); ++t)
    if (loss_mask[t]) out.push_back(logprobs[t]);
  return out;
}

namespace {

EpisodeSpan& append(Episode& e, const std::vector<int32_t>& tokens, const std::vector<float>* logprobs, bool policy) {
  const int64_t begin = int64_t(e.response.size());
  e.response.insert(e.response.end(), tokens.begin(), tokens.end());
  e.loss_mask.insert(e.loss_mask.end(), tokens.size(), policy ? 1 : 0);
  if (logprobs) {
    LS_CHECK(logprobs->size() == tokens.size(), "the engine gave ", logprobs->size(), " log-probs for ", tokens.size(),
             " tokens");
    e.logprobs.insert(e.logprobs.end(), logprobs->begin(), logprobs->end());
  } else {
    e.logprobs.insert(e.logprobs.end(), tokens.size(), 0.0f);
  }
  e.spans.push_back({begin, int64_t(e.response.size()), policy, "", ""});
  return e.spans.back();
}

}  // namespace

void run_episodes(std::vector<Episode>& episodes, const std::vector<rollout::GenerationRequest>& requests,
                  Environment& env, const GenerateFn& generate, const EpisodeLimits& limits, int64_t step,
                  const char* what) {
  LS_CHECK(requests.size() == episodes.size(), "run_episodes: ", requests.size(), " requests for ", episodes.size(),
           " episodes");
  std::vector<size_t> active(episodes.size());
  for (size_t i = 0; i < active.size(); ++i) active[i] = i;
  while (!active.empty()) {
    std::vector<std::optional<rollout::GenerationRequest>> turn;
    for (size_t i : active) {
      const Episode& e = episodes[i];
      rollout::GenerationRequest r = requests[i];
      r.prompt.insert(r.prompt.end(), e.response.begin(), e.response.end());
      r.max_new_tokens = limits.max_response_len - int64_t(e.response.size());
      if (limits.max_turn_len > 0) r.max_new_tokens = std::min(r.max_new_tokens, limits.max_turn_len);
      turn.push_back(std::move(r));
    }
    auto outcomes = generate(turn);
    std::vector<const Episode*> asked;
    std::vector<bool> used_up(active.size());  // the response budget
    for (size_t a = 0; a < active.size(); ++a) {
      LS_CHECK(outcomes[a].error.empty(), what, " ", step, ": episode ", active[a], " turn ",
               episodes[active[a]].policy_turns + 1, " was refused: ", outcomes[a].error);
      Episode& e = episodes[active[a]];
      const rollout::RequestResult& r = outcomes[a].result;
      append(e, r.output_ids, &r.logprobs, true);
      e.versions.insert(e.versions.end(), r.weight_versions.begin(), r.weight_versions.end());
      ++e.policy_turns;
      e.truncated = r.finish_reason == rollout::FinishReason::length;
      used_up[a] = int64_t(e.response.size()) >= limits.max_response_len;
      asked.push_back(&e);
    }
    const std::vector<EnvReply> replies = env.reply(asked);
    LS_CHECK(replies.size() == asked.size(), "the environment answered ", replies.size(), " of ", asked.size(),
             " episodes");
    std::vector<size_t> next;
    for (size_t a = 0; a < active.size(); ++a) {
      Episode& e = episodes[active[a]];
      const EnvReply& reply = replies[a];
      e.reward = reply.reward;
      if (reply.done || used_up[a] || e.policy_turns >= limits.max_turns) continue;
      // The observation and at least one more policy token must fit the response budget.
      if (int64_t(e.response.size() + reply.observation.size()) >= limits.max_response_len) {
        e.truncated = true;
        continue;
      }
      EpisodeSpan& span = append(e, reply.observation, nullptr, false);
      span.role = reply.role;
      span.content = reply.content;
      next.push_back(active[a]);
    }
    active = std::move(next);
  }
}

}  // namespace lockstep::rl
