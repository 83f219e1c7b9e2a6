#include "rl/rewards/command_reward.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/error.h"

namespace lockstep::rl {

namespace fs = std::filesystem;

namespace {

// A private temporary directory, removed with the object.
class ScratchDir {
 public:
  ScratchDir() {
    std::string pattern = (fs::temp_directory_path() / "lockstep_rm_XXXXXX").string();
    LS_CHECK(::mkdtemp(pattern.data()), "--custom-rm-cmd: cannot create a temporary directory in ",
             fs::temp_directory_path().string());
    path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path path_;
};

}  // namespace

std::vector<float> command_rewards(const std::vector<RewardRequest>& samples, const std::string& command) {
  const std::string who = "--custom-rm-cmd '" + command + "'";
  ScratchDir dir;
  const fs::path in = dir.path_ / "samples.jsonl", out = dir.path_ / "rewards.txt";
  {
    std::ofstream f(in, std::ios::binary);
    for (const auto& s : samples) f << s.to_json().dump() << "\n";
    LS_CHECK(f.good(), who, ": cannot write the samples to ", in.string());
  }
  // The scratch paths are ours (no quotes in them); the command is the user's shell text.
  const std::string line = "(" + command + ") < '" + in.string() + "' > '" + out.string() + "'";
  const int raw = std::system(line.c_str());
  LS_CHECK(raw != -1 && WIFEXITED(raw), who, ": could not run it (or it was killed)");
  LS_CHECK(WEXITSTATUS(raw) == 0, who, ": exited with status ", WEXITSTATUS(raw));
  std::vector<float> rewards;
  std::ifstream f(out);
  std::string text;
  int64_t number = 0;
  while (std::getline(f, text)) {
    ++number;
    if (!text.empty() && text.back() == '\r') text.pop_back();
    LS_CHECK(int64_t(rewards.size()) < int64_t(samples.size()), who, ": wrote more than ", samples.size(),
             " reward lines for ", samples.size(), " samples");
    rewards.push_back(parse_reward_answer(text, who + ": output line " + std::to_string(number)));
  }
  LS_CHECK(rewards.size() == samples.size(), who, ": wrote ", rewards.size(), " reward lines for ", samples.size(),
           " samples");
  return rewards;
}

}  // namespace lockstep::rl
