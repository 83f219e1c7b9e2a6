// Arithmetic word problems for the newcomer job: a deterministic generator (problem i of a seed is
// a function of the two) of one-step problems whose answers are integers or reduced fractions,
// with a worked demonstration ending in \boxed{answer}. The math verifier scores the
// demonstration of every problem 1 against its label (tested).
#pragma once
#include <cstdint>
#include <string>

namespace lockstep::rl {

struct ArithProblem {
  std::string prompt;    // the question and "Put the final answer in \boxed{}."
  std::string label;     // "12" or "3/4"
  std::string response;  // a worked demonstration ending in \boxed{...}
};

// Level 2 (the default): additions, subtractions, products and fractions of two-digit numbers.
// Level 1: one-digit additions and subtractions with one-digit answers, for a tiny model.
ArithProblem arith_problem(uint64_t seed, uint64_t index, int level = 2);

// Writes DIR/train.jsonl and DIR/eval.jsonl ({"prompt", "label"}) and DIR/sft.jsonl
// ({"prompt", "response"}, demonstrations of the training problems). Train problems are indices
// [0, train), eval problems the next indices of the same seed whose prompt was not drawn before,
// so the sets never share a problem (and the eval set repeats none). With `rl_every` N > 0 the
// training problems are split between the two phases: every Nth distinct one (in draw order: the
// Nth, 2Nth, ...) is an RL problem, whose draws go to train.jsonl only, and the others' draws go to
// sft.jsonl only, so that RL prompts are problems the SFT warm start never saw (0: both files hold
// every training draw).
void write_arith_data(const std::string& dir, uint64_t seed, int64_t train, int64_t eval, int level = 2,
                      int64_t rl_every = 0);

}  // namespace lockstep::rl
