// Built-in verifiable tasks on a tiny token vocabulary, so the default training run needs
// no download: each task makes prompts from a seed and an index, and scores an answer
// exactly (reward 1 for the right digits followed by EOS, else 0).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lockstep::rl {

// The task vocabulary (ids below kTaskVocabSize; the model's vocabulary may be larger).
namespace vocab {
constexpr int32_t kPad = 0, kBos = 1, kEos = 2, kSep = 3;  // kSep: "=" before the answer
constexpr int32_t kDigit0 = 4;                             // digits 0..9 are 4..13
constexpr int32_t kPlus = 14;
constexpr int32_t kTaskReverse = 15, kTaskSort = 16, kTaskAdd = 17;
constexpr int32_t kTaskVocabSize = 18;
std::string token_text(int32_t id);  // "0".."9", "<eos>", "+", ...
std::string text(const std::vector<int32_t>& ids);
}  // namespace vocab

struct TaskExample {
  std::vector<int32_t> prompt;  // <bos> <task> operands <sep>
  std::vector<int32_t> answer;  // the correct response, ending with <eos>
};

class Task {
 public:
  virtual ~Task() = default;
  virtual std::string name() const = 0;
  // A deterministic function of (seed, index) (docs/numerics.md, D5).
  virtual TaskExample example(uint64_t seed, uint64_t index) const = 0;
  // 1 when the response is exactly the answer (its digits then <eos>), else 0.
  float reward(const TaskExample& ex, const std::vector<int32_t>& response) const {
    return response == ex.answer ? 1.0f : 0.0f;
  }
  // Longest answer (with <eos>), for --rollout-max-response-len checks.
  virtual int64_t max_answer_len() const = 0;
};

// reverse: reverse a digit string; sort: sort digits ascending; add: a + b of `digits`-digit
// numbers (answer most significant digit first, no leading zeros).
std::unique_ptr<Task> make_task(const std::string& name, int64_t digits);

}  // namespace lockstep::rl
