#include "rl/http_env.h"

#include "core/error.h"
#include "core/json_parse.h"
#include "dist/communicator.h"
#include "rl/chat_observation.h"
#include "rl/rewards/http_post.h"

namespace lockstep::rl {

using nlohmann::json;

json env_request(const Episode& e, const PromptSample& sample, const Tokenizer& tokenizer) {
  json messages = json::array();
  for (const EpisodeSpan& s : e.spans) {
    if (!s.policy) {
      messages.push_back({{"role", s.role}, {"content", s.content}});
      continue;
    }
    const std::vector<int32_t> turn(e.response.begin() + s.begin, e.response.begin() + s.end);
    messages.push_back({{"role", "assistant"}, {"content", decode_sampled(tokenizer, turn, true)}});
  }
  return {{"prompt", sample.prompt},   {"label", sample.label}, {"metadata", sample.metadata},
          {"turn", e.policy_turns},    {"messages", messages},  {"prompt_ids", e.example.prompt},
          {"response_ids", e.response}};
}

EnvReply parse_env_answer(const std::string& answer) {
  json j = json(json::value_t::discarded);
  try {
    j = parse_json(answer, "the environment's answer");
  } catch (const Error&) {  // reported below with the answer itself
  }
  const std::string shown = answer.size() > 200 ? answer.substr(0, 200) + "..." : answer;
  LS_CHECK(!j.is_discarded() && j.is_object(),
           "expected a JSON object {\"observation\": text, \"reward\": number, \"done\": bool}, got '", shown, "'");
  EnvReply r;
  const auto done = j.find("done");
  LS_CHECK(done != j.end() && done->is_boolean(), "\"done\": expected true or false, got '", shown, "'");
  r.done = done->get<bool>();
  if (const auto reward = j.find("reward"); reward != j.end()) {
    LS_CHECK(reward->is_number() && std::isfinite(reward->get<double>()), "\"reward\": expected a number, got '", shown,
             "'");
    r.reward = reward->get<float>();
  }
  r.role = "user";
  if (const auto role = j.find("role"); role != j.end()) {
    LS_CHECK(role->is_string() && (*role == "user" || *role == "tool"),
             "\"role\": expected \"user\" or \"tool\", got '", shown, "'");
    r.role = role->get<std::string>();
  }
  const auto obs = j.find("observation");
  LS_CHECK(r.done || (obs != j.end() && obs->is_string()),
           "\"observation\": expected text when \"done\" is false, got '", shown, "'");
  if (obs != j.end() && obs->is_string()) r.content = obs->get<std::string>();
  return r;
}

namespace {

class HttpEnv : public Environment {
 public:
  HttpEnv(const TrainConfig& c, EpisodeData& source, dist::Communicator* world)
      : cfg_(c), source_(source), tokenizer_(*source.tokenizer()), world_(world) {
    post_.url = c.rollout_env_url;
    post_.url_flag = "--rollout-env-url";
    post_.timeout_flag = "--rollout-env-timeout";
    post_.item = "episode";
    post_.concurrency = c.rm_concurrency;
    post_.timeout_s = c.rollout_env_timeout;
    post_.retries = c.rollout_env_retries;
    im_end_ = tokenizer_.token_id("<|im_end|>").value_or(-1);
  }
  std::vector<EnvReply> reply(const std::vector<const Episode*>& episodes) override {
    std::vector<std::string> answers = ask_on_rank0(episodes);
    std::vector<EnvReply> out;
    for (size_t i = 0; i < episodes.size(); ++i) {
      EnvReply r = parse_env_answer(answers[i]);
      if (!r.done) r.observation = observation_tokens(*episodes[i], r);
      out.push_back(std::move(r));
    }
    return out;
  }

 private:
  // The server's answers, asked once (on rank 0) and sent to every rank with any error.
  std::vector<std::string> ask_on_rank0(const std::vector<const Episode*>& episodes) {
    std::vector<std::string> answers(episodes.size());
    std::string error;
    if (!world_ || world_->rank() == 0) {
      std::vector<std::string> bodies;
      for (const Episode* e : episodes)
        bodies.push_back(env_request(*e, *source_.data_sample(e->position), tokenizer_).dump());
      try {
        post_json_all(bodies, post_, [&](size_t i, const std::string& answer) {
          parse_env_answer(answer);  // a malformed answer is retried
          answers[i] = answer;
        });
      } catch (const Error& e) {
        error = e.what();
      }
    }
    if (world_ && world_->size() > 1) {
      std::string all = error.empty() ? json(answers).dump() : "";
      for (std::string* s : {&error, &all}) {
        uint64_t size = s->size();
        world_->broadcast_n(&size, 1, 0);
        s->resize(size);
        world_->broadcast(s->data(), size, 0);
      }
      if (error.empty()) answers = parse_json(all, "the environment's answers").get<std::vector<std::string>>();
    }
    if (!error.empty()) fail(error);
    return answers;
  }
  std::vector<int32_t> observation_tokens(const Episode& e, const EnvReply& r) const {
    if (!cfg_.apply_chat_template) return tokenizer_.encode(r.content);
    const std::vector<int32_t> turn = e.last_turn();
    const bool ended = !turn.empty() && turn.back() == im_end_;
    const bool thinking = source_.data_sample(e.position)->enable_thinking;
    return tokenizer_.encode(chat_observation_text(tokenizer_, {ChatMessage(r.role, r.content)}, thinking, ended));
  }

  const TrainConfig& cfg_;
  EpisodeData& source_;
  const Tokenizer& tokenizer_;
  dist::Communicator* world_;
  HttpPostOptions post_;
  int32_t im_end_ = -1;
};

}  // namespace

std::unique_ptr<Environment> make_http_env(const TrainConfig& c, EpisodeData& source, dist::Communicator* world) {
  LS_CHECK(source.tokenizer(), "--rollout-env-url needs --prompt-data with a tokenizer");
  return std::make_unique<HttpEnv>(c, source, world);
}

}  // namespace lockstep::rl
