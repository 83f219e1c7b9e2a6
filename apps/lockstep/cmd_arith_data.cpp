// lockstep arith-data: writes the newcomer job's data (rl/arith_problems.h): arithmetic word
// problems with integer and fraction answers as train.jsonl / eval.jsonl ({"prompt", "label"})
// and worked demonstrations as sft.jsonl ({"prompt", "response"}), the same for the same seed;
// --rl-every N keeps the RL prompts and the demonstrations on different problems.
#include <memory>

#include "command_registry.h"
#include "rl/arith_problems.h"

namespace lockstep::cli {
namespace {

struct ArithDataOptions {
  std::string output_dir;
  int64_t train = 2000, eval = 200, seed = 1, rl_every = 0;
  int level = 2;
};

const bool registered = register_command(
    {"arith-data", "Write arithmetic word problems (train/eval JSONL and SFT demonstrations)", [](CLI::App& sub) {
       auto o = std::make_shared<ArithDataOptions>();
       sub.add_option("--output-dir", o->output_dir, "directory for train.jsonl, eval.jsonl, sft.jsonl")->required();
       sub.add_option("--train", o->train, "training problems (default 2000)");
       sub.add_option("--eval", o->eval, "evaluation problems (default 200)");
       sub.add_option("--seed", o->seed, "generator seed (default 1)");
       sub.add_option("--level", o->level,
                      "2: two-digit sums, differences, products and fractions (default); "
                      "1: one-digit sums and differences");
       sub.add_option("--rl-every", o->rl_every,
                      "N > 0: every Nth distinct training problem is an RL prompt only (train.jsonl) and the "
                      "others are SFT demonstrations only (sft.jsonl); 0: both hold every problem (default)");
       return std::function<int()>([o] {
         rl::write_arith_data(o->output_dir, uint64_t(o->seed), o->train, o->eval, o->level, o->rl_every);
         return 0;
       });
     }});

}  // namespace
}  // namespace lockstep::cli
