#include "rl/calculator_env.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_parse.h"
#include "rl/calculator.h"
#include "rl/chat_observation.h"

namespace lockstep::rl {

std::string calculator_tool_definition() {
  // Key order as a Python dict would keep it: the template prints the definition verbatim.
  nlohmann::ordered_json expression = {{"type", "string"}, {"description", "for example (12 + 3) * 4 / 5"}};
  nlohmann::ordered_json parameters = {
      {"type", "object"}, {"properties", {{"expression", expression}}}, {"required", {"expression"}}};
  nlohmann::ordered_json function = {
      {"name", "calculator"},
      {"description", "Evaluates an arithmetic expression of integers with + - * / and parentheses, exactly"},
      {"parameters", parameters}};
  return nlohmann::ordered_json{{"type", "function"}, {"function", function}}.dump();
}

namespace {

std::string answer_call(const std::string& call) {
  nlohmann::json j = nlohmann::json(nlohmann::json::value_t::discarded);
  try {
    j = parse_json(call, "tool call");
  } catch (const Error&) {  // answered as a tool error below
  }
  if (j.is_discarded() || !j.is_object())
    return "error: a tool call must be a JSON object {\"name\": ..., \"arguments\": {...}}";
  const auto name = j.find("name");
  if (name == j.end() || !name->is_string() || *name != "calculator")
    return "error: unknown tool " + (name == j.end() ? std::string("(no \"name\")") : name->dump()) +
           " (the only tool is calculator)";
  const auto args = j.find("arguments");
  if (args == j.end() || !args->is_object() || !args->contains("expression") || !(*args)["expression"].is_string())
    return "error: calculator: \"arguments\" must be {\"expression\": \"...\"}";
  try {
    return calculate((*args)["expression"].get<std::string>());
  } catch (const Error& e) {
    return std::string("error: calculator: ") + e.what();
  }
}

class CalculatorEnv : public Environment {
 public:
  explicit CalculatorEnv(EpisodeData& source) : source_(source), tokenizer_(*source.tokenizer()) {
    im_end_ = tokenizer_.token_id("<|im_end|>").value_or(-1);
  }
  std::vector<EnvReply> reply(const std::vector<const Episode*>& episodes) override {
    std::vector<EnvReply> out(episodes.size());
    std::vector<size_t> answered;  // final answers, scored together
    for (size_t i = 0; i < episodes.size(); ++i) {
      const Episode& e = *episodes[i];
      const std::vector<int32_t> turn = e.last_turn();
      const std::vector<std::string> results = answer_calculator_calls(decode_sampled(tokenizer_, turn, false));
      if (results.empty()) {
        answered.push_back(i);
        continue;
      }
      std::vector<ChatMessage> messages;
      out[i].role = "tool";
      for (const auto& r : results) {
        messages.emplace_back("tool", r);
        out[i].content += (out[i].content.empty() ? "" : "\n") + r;
      }
      const bool thinking = source_.data_sample(e.position)->enable_thinking;
      const bool ended = !turn.empty() && turn.back() == im_end_;
      out[i].observation = tokenizer_.encode(chat_observation_text(tokenizer_, messages, thinking, ended));
      out[i].done = false;
    }
    std::vector<int64_t> positions;
    std::vector<TaskExample> prompts;
    std::vector<std::vector<int32_t>> finals;
    for (size_t i : answered) {
      positions.push_back(episodes[i]->position);
      prompts.push_back(episodes[i]->example);
      finals.push_back(episodes[i]->last_turn());
    }
    const std::vector<float> rewards = source_.rewards(positions, prompts, finals);
    for (size_t k = 0; k < answered.size(); ++k) out[answered[k]].reward = rewards[k];
    return out;
  }

 private:
  EpisodeData& source_;
  const Tokenizer& tokenizer_;
  int32_t im_end_ = -1;
};

}  // namespace

std::vector<std::string> answer_calculator_calls(const std::string& text) {
  const std::string open = "<tool_call>", close = "</tool_call>";
  std::vector<std::string> out;
  for (size_t at = text.find(open); at != std::string::npos; at = text.find(open, at)) {
    at += open.size();
    const size_t end = text.find(close, at);
    if (end == std::string::npos) {
      out.push_back("error: a tool call must end with </tool_call>");
      break;
    }
    out.push_back(answer_call(text.substr(at, end - at)));
    at = end + close.size();
  }
  return out;
}

std::unique_ptr<Environment> make_calculator_env(EpisodeData& source) {
  LS_CHECK(source.tokenizer(), "--rollout-tool calculator needs --prompt-data with a tokenizer");
  return std::make_unique<CalculatorEnv>(source);
}

}  // namespace lockstep::rl
