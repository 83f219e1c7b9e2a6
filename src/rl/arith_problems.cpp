#include "rl/arith_problems.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "core/philox.h"

namespace lockstep::rl {

namespace {

constexpr int64_t kEvalScan = 1000000;  // indices past train + eval tried for unseen eval problems
constexpr const char* kInstruction = " Put the final answer in \\boxed{}.";

// A uniform integer in [lo, hi] from lane `lane` of problem `index`.
int64_t draw(uint64_t seed, uint64_t index, uint32_t lane, int64_t lo, int64_t hi) {
  const float u = philox_uniform(seed, index, lane / 4, lane % 4);
  return lo + std::min<int64_t>(hi - lo, int64_t(u * float(hi - lo + 1)));
}

const char* const kNames[] = {"Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana"};
const char* const kThings[] = {"apples", "pencils", "stickers", "marbles", "books", "coins"};

struct Fraction {
  int64_t num, den;
};

Fraction reduced(int64_t num, int64_t den) {
  const int64_t g = std::gcd(num, den);
  return {num / g, den / g};
}
std::string label_of(Fraction f) {
  return f.den == 1 ? std::to_string(f.num) : std::to_string(f.num) + "/" + std::to_string(f.den);
}
std::string latex_of(Fraction f) {
  return f.den == 1 ? std::to_string(f.num) : "\\frac{" + std::to_string(f.num) + "}{" + std::to_string(f.den) + "}";
}
std::string s(int64_t v) { return std::to_string(v); }

}  // namespace

namespace {

// Level 1's names and things are one Qwen3 token each (" Ana", " apples"), so every number sits
// a fixed number of tokens before the answer: a tiny model can copy it by position.
const char* const kNames1[] = {"Ana", "Ben", "Chen", "Eli"};
const char* const kThings1[] = {"apples", "pencils", "stickers", "books", "coins"};

// Level 1: one-digit additions and subtractions whose numbers and answer are all one digit (a
// tiny model learns these from a few thousand demonstrations; level 2's products and fractions
// it does not). The worked line is the bare equation: fewer tokens to sample and to get wrong.
ArithProblem level1_problem(uint64_t seed, uint64_t index) {
  const std::string name = kNames1[draw(seed, index, 0, 0, 3)];
  const std::string thing = kThings1[draw(seed, index, 1, 0, 4)];
  ArithProblem p;
  int64_t answer = 0;
  std::string work;
  if (draw(seed, index, 4, 0, 1) == 0) {
    const int64_t a = draw(seed, index, 2, 2, 8), b = draw(seed, index, 3, 1, 9 - a);
    p.prompt = name + " has " + s(a) + " " + thing + " and gets " + s(b) + " more. How many " + thing + " does " +
               name + " have now?";
    answer = a + b;
    work = s(a) + " + " + s(b) + " = " + s(answer) + ".";
  } else {
    const int64_t total = draw(seed, index, 2, 2, 9), b = draw(seed, index, 3, 1, total - 1);
    p.prompt =
        name + " has " + s(total) + " " + thing + " and gives away " + s(b) + ". How many " + thing + " are left?";
    answer = total - b;
    work = s(total) + " - " + s(b) + " = " + s(answer) + ".";
  }
  p.prompt += kInstruction;
  p.label = s(answer);
  p.response = work + "\n\nThe answer is \\boxed{" + s(answer) + "}.";
  return p;
}

}  // namespace

ArithProblem arith_problem(uint64_t seed, uint64_t index, int level) {
  LS_CHECK(level == 1 || level == 2, "arithmetic data: expected --level 1 or 2, got ", level);
  if (level == 1) return level1_problem(seed, index);
  const std::string name = kNames[draw(seed, index, 0, 0, 7)];
  const std::string thing = kThings[draw(seed, index, 1, 0, 5)];
  const int64_t a = draw(seed, index, 2, 2, 40), b = draw(seed, index, 3, 2, 12);
  ArithProblem p;
  Fraction answer{0, 1};
  std::string work;
  switch (draw(seed, index, 4, 0, 4)) {
    case 0:
      p.prompt = name + " has " + s(a) + " " + thing + " and gets " + s(b) + " more. How many " + thing + " does " +
                 name + " have now?";
      answer = {a + b, 1};
      work = name + " has " + s(a) + " + " + s(b) + " = " + s(a + b) + " " + thing + ".";
      break;
    case 1:
      p.prompt =
          name + " has " + s(a + b) + " " + thing + " and gives away " + s(b) + ". How many " + thing + " are left?";
      answer = {a, 1};
      work = "There are " + s(a + b) + " - " + s(b) + " = " + s(a) + " " + thing + " left.";
      break;
    case 2:
      p.prompt = "A box holds " + s(a) + " " + thing + ". How many " + thing + " are in " + s(b) + " boxes?";
      answer = {a * b, 1};
      work = s(b) + " boxes hold " + s(b) + " \\times " + s(a) + " = " + s(a * b) + " " + thing + ".";
      break;
    case 3: {
      p.prompt =
          "A ribbon " + s(a) + " meters long is cut into " + s(b) + " equal pieces. How long is each piece, in meters?";
      answer = reduced(a, b);
      work = "Each piece is " + s(a) + " / " + s(b) + " = " + latex_of(answer) + " meters long.";
      break;
    }
    default: {
      const int64_t eaten = draw(seed, index, 5, 1, b - 1);
      p.prompt = "A pie is cut into " + s(b) + " equal slices and " + name + " eats " + s(eaten) +
                 " of them. What fraction of the pie is left?";
      answer = reduced(b - eaten, b);
      work = s(b - eaten) + " of the " + s(b) + " slices are left, which is " + latex_of(answer) + " of the pie.";
      break;
    }
  }
  p.prompt += kInstruction;
  p.label = label_of(answer);
  p.response = work + "\n\nThe answer is \\boxed{" + latex_of(answer) + "}.";
  return p;
}

void write_arith_data(const std::string& dir, uint64_t seed, int64_t train, int64_t eval, int level, int64_t rl_every) {
  LS_CHECK(level == 1 || level == 2, "arithmetic data: expected --level 1 or 2, got ", level);
  LS_CHECK(train > 0 && eval >= 0 && train <= (int64_t(1) << 31) && eval <= (int64_t(1) << 31),
           "arithmetic data: expected --train in [1, 2^31] and --eval in [0, 2^31], got ", train, " and ", eval);
  LS_CHECK(rl_every >= 0, "arithmetic data: expected --rl-every >= 0, got ", rl_every);
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  std::ofstream train_f(fs::path(dir) / "train.jsonl"), eval_f(fs::path(dir) / "eval.jsonl"),
      sft_f(fs::path(dir) / "sft.jsonl");
  LS_CHECK(train_f && eval_f && sft_f, dir, ": cannot write the data files");
  // The eval set skips any prompt already drawn (train or eval): level 2 draws repeat (2000
  // training draws hold ~1680 distinct prompts) and level 1 has only 1280 distinct problems.
  std::unordered_set<std::string> drawn;
  std::unordered_map<std::string, bool> for_rl;  // training prompt -> an RL problem (with --rl-every)
  int64_t written = 0;
  for (int64_t i = 0; written < train + eval; ++i) {
    LS_CHECK(i < train + eval + kEvalScan, "arithmetic data: too few distinct problems left for --eval ", eval,
             " after --train ", train, " (level 1 has 1280 in all)");
    const ArithProblem p = arith_problem(seed, uint64_t(i), level);
    if (!drawn.insert(p.prompt).second && i >= train) continue;
    bool to_train = true, to_sft = i < train;
    if (i < train && rl_every > 0) {
      const auto [it, first] = for_rl.emplace(p.prompt, false);
      if (first) it->second = int64_t(for_rl.size()) % rl_every == 0;
      to_train = it->second;
      to_sft = !it->second;
    }
    if (to_train)
      (i < train ? train_f : eval_f) << nlohmann::json{{"prompt", p.prompt}, {"label", p.label}}.dump() << "\n";
    if (to_sft) sft_f << nlohmann::json{{"prompt", p.prompt}, {"response", p.response}}.dump() << "\n";
    ++written;
  }
  LS_CHECK(train_f.flush() && eval_f.flush() && sft_f.flush(), dir, ": write failed");  // the last bytes too
}

}  // namespace lockstep::rl
