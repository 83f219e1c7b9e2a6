// lockstep train: the RL loop (rollout engine + trainer) on a built-in task. With no
// arguments it runs the embedded default (configs/default.toml mirrors it). Under
// `mpirun -np N` with the topology flags (--tensor-model-parallel-size, ...) the trainer runs
// at that topology, the engine at its own (--rollout-* flags; default a single-rank engine on
// every rank), and the run writes the single-rank metrics and checkpoints (docs/numerics.md, D4).
#include <cstdio>
#include <map>
#include <memory>

#include "command_registry.h"
#include "core/error.h"
#include "dist/mpi_communicator.h"
#include "rl/train_config.h"
#include "rl/trainer.h"

namespace lockstep::cli {
namespace {

struct TrainArgs {
  std::string config;
  std::map<std::string, std::string> values;  // option name -> text, when given
  std::map<std::string, CLI::Option*> options;
};

int run_train(const TrainArgs& a) {
  rl::TrainConfig c;
  if (!a.config.empty()) rl::apply_toml_file(c, a.config);
  for (const auto& o : rl::train_options()) {
    CLI::Option* opt = a.options.at(o.name);
    if (opt->count() > 0) rl::apply_flag(c, o.name, a.values.at(o.name));
  }
  auto world = dist::world_communicator();
  rl::TrainSummary s = rl::run_training(c, world.get());
  if (world->rank() != 0) return 0;
  std::fprintf(stderr, "lockstep train: %lld steps in %.1f s, reward %.3f -> %.3f, max abs_diff %g\n",
               static_cast<long long>(s.steps_run), s.seconds, s.first_reward, s.last_reward, s.max_abs_diff);
  return 0;
}

const bool registered = register_command(
    {"train", "RL post-training on a built-in verifiable task (rollout engine + trainer in one process)",
     [](CLI::App& sub) {
       auto a = std::make_shared<TrainArgs>();
       sub.add_option("--config", a->config, "TOML config file (any key is also a flag; flags win)");
       for (const auto& o : rl::train_options()) {
         std::string& slot = a->values[o.name];
         CLI::Option* opt;
         if (std::holds_alternative<bool rl::TrainConfig::*>(o.field)) {
           // `--flag` sets true; `--flag=false` sets false.
           opt = sub.add_flag("--" + o.name + "{true}", slot, o.help);
         } else {
           opt = sub.add_option("--" + o.name, slot, o.help);
           const char* kind = std::holds_alternative<int64_t rl::TrainConfig::*>(o.field)  ? "INT"
                              : std::holds_alternative<double rl::TrainConfig::*>(o.field) ? "FLOAT"
                                                                                          : "TEXT";
           opt->type_name(kind);
         }
         if (o.name == "eval-prompt-data")  // NAME FILE [NAME FILE ...]: the words are joined for the parser
           opt->expected(2, CLI::detail::expected_max_vector_size)
               ->allow_extra_args()
               ->multi_option_policy(CLI::MultiOptionPolicy::Join);
         if (o.help.empty()) opt->group("");  // hidden test hooks
         a->options[o.name] = opt;
       }
       return std::function<int()>([a] { return run_train(*a); });
     }});

}  // namespace
}  // namespace lockstep::cli
