// lockstep reward: scores responses against labels with a training reward (`--rm-type`, or an
// outside one: `--rm-url`, `--custom-rm-cmd`), so a user can check a data set and its labels, or a
// reward server, before a run. JSONL in, JSONL out, in input order ("prompt" and "metadata" are
// optional and go to outside rewards):
//   {"response": "... \\boxed{3/4}", "label": "0.75"}  ->  {"reward": 1}
// Every line is read and checked before any is scored; errors name the file, line and key.
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "command_registry.h"
#include "core/error.h"
#include "core/jsonl.h"
#include "core/output_path.h"
#include "rl/rewards/command_reward.h"
#include "rl/rewards/local_reward.h"
#include "rl/rewards/remote_reward.h"

namespace lockstep::cli {
namespace {

struct RewardOptions {
  std::string rm_type = "math", input = "-", output = "-";
  rl::RemoteRewardOptions remote;  // remote.url empty: not remote
  std::string custom_rm_cmd;
};

int run_reward(const RewardOptions& o) {
  check_output_differs(o.output, {o.input}, "--output");
  const rl::RewardType type = rl::reward_type_from_name(o.rm_type);
  LS_CHECK(o.remote.url.empty() || o.custom_rm_cmd.empty(), "--rm-url and --custom-rm-cmd: give one reward, not both");
  if (!o.remote.url.empty()) rl::parse_http_url(o.remote.url);
  std::vector<rl::RewardRequest> items;
  for (const auto& r : read_jsonl(o.input)) {
    const std::string where = o.input + ":" + std::to_string(r.line);
    LS_CHECK(r.value.contains("response"), where, ": missing key 'response'");
    LS_CHECK(r.value["response"].is_string(), where, ": key 'response': expected a string, found ",
             r.value["response"].type_name());
    LS_CHECK(r.value.contains("label"), where, ": missing key 'label'");
    rl::RewardRequest item;
    item.response = r.value["response"].get<std::string>();
    item.label = rl::label_text(r.value["label"], where + ": key 'label'");
    if (r.value.contains("prompt")) {
      LS_CHECK(r.value["prompt"].is_string(), where, ": key 'prompt': expected a string, found ",
               r.value["prompt"].type_name());
      item.prompt = r.value["prompt"].get<std::string>();
    }
    if (r.value.contains("metadata")) item.metadata = r.value["metadata"];
    items.push_back(std::move(item));
  }
  std::vector<float> rewards;
  if (!o.remote.url.empty()) {
    rewards = rl::remote_rewards(items, o.remote);
  } else if (!o.custom_rm_cmd.empty()) {
    rewards = rl::command_rewards(items, o.custom_rm_cmd);
  } else {
    for (const auto& item : items) rewards.push_back(rl::local_reward(type, item.response, item.label));
  }
  JsonlWriter out(o.output);
  for (float reward : rewards) out.write_line(nlohmann::json{{"reward", reward}}.dump());
  out.close();
  return 0;
}

const bool registered = register_command(
    {"reward", "Score responses against labels with a reward (JSONL in, JSONL out)", [](CLI::App& sub) {
       auto o = std::make_shared<RewardOptions>();
       sub.add_option("--rm-type", o->rm_type, std::string("reward: ") + rl::reward_type_names());
       sub.add_option("--input", o->input, "input JSONL of {\"response\", \"label\"} ('-' = stdin)");
       sub.add_option("--output", o->output, "output JSONL of {\"reward\"} ('-' = stdout)");
       sub.add_option("--rm-url", o->remote.url, "reward model at http://HOST:PORT/PATH instead of --rm-type");
       sub.add_option("--custom-rm-cmd", o->custom_rm_cmd, "reward program: JSON lines in, rewards a line out");
       sub.add_option("--rm-concurrency", o->remote.concurrency, "--rm-url requests in flight at once");
       sub.add_option("--rm-timeout", o->remote.timeout_s, "--rm-url seconds per attempt");
       sub.add_option("--rm-retries", o->remote.retries, "--rm-url retries of a failed request");
       return std::function<int()>([o] { return run_reward(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
