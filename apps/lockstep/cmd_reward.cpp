// lockstep reward: scores responses against labels with a training reward (`--rm-type`), so a
// user can check a data set and its labels before a run. JSONL in, JSONL out, in input order:
//   {"response": "... \\boxed{3/4}", "label": "0.75"}  ->  {"reward": 1}
// Every line is read and checked before any is scored; errors name the file, line and key.
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "command_registry.h"
#include "core/error.h"
#include "core/jsonl.h"
#include "rl/rewards/local_reward.h"

namespace lockstep::cli {
namespace {

struct RewardOptions {
  std::string rm_type = "math", input = "-", output = "-";
};

int run_reward(const RewardOptions& o) {
  const rl::RewardType type = rl::reward_type_from_name(o.rm_type);
  struct Item {
    std::string response, label;
  };
  std::vector<Item> items;
  for (const auto& r : read_jsonl(o.input)) {
    const std::string where = o.input + ":" + std::to_string(r.line);
    LS_CHECK(r.value.contains("response"), where, ": missing key 'response'");
    LS_CHECK(r.value["response"].is_string(), where, ": key 'response': expected a string, found ",
             r.value["response"].type_name());
    LS_CHECK(r.value.contains("label"), where, ": missing key 'label'");
    items.push_back(
        {r.value["response"].get<std::string>(), rl::label_text(r.value["label"], where + ": key 'label'")});
  }
  JsonlWriter out(o.output);
  for (const auto& item : items) {
    const float reward = rl::local_reward(type, item.response, item.label);
    out.write_line(nlohmann::json{{"reward", reward}}.dump());
  }
  return 0;
}

const bool registered = register_command(
    {"reward", "Score responses against labels with a reward (JSONL in, JSONL out)", [](CLI::App& sub) {
       auto o = std::make_shared<RewardOptions>();
       sub.add_option("--rm-type", o->rm_type, std::string("reward: ") + rl::reward_type_names());
       sub.add_option("--input", o->input, "input JSONL of {\"response\", \"label\"} ('-' = stdin)");
       sub.add_option("--output", o->output, "output JSONL of {\"reward\"} ('-' = stdout)");
       return std::function<int()>([o] { return run_reward(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
