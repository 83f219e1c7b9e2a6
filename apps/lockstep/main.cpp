// The `lockstep` command line: one binary, one subcommand per job.
#include <cstdio>
#include <exception>
#include <map>

#include "command_registry.h"
#include "core/error.h"

namespace lockstep::cli {

static std::vector<Command>& commands() {
  static std::vector<Command> list;
  return list;
}

bool register_command(Command command) {
  commands().push_back(std::move(command));
  return true;
}

const std::vector<Command>& registered_commands() { return commands(); }

}  // namespace lockstep::cli

int main(int argc, char** argv) {
  CLI::App app{"lockstep: truly on-policy RL post-training for Qwen3-MoE"};
  app.require_subcommand(1);
  std::map<std::string, std::function<int()>> runners;
  for (const auto& command : lockstep::cli::registered_commands()) {
    CLI::App* sub = app.add_subcommand(command.name, command.help);
    runners[command.name] = command.setup(*sub);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto* sub : app.get_subcommands()) return runners.at(sub->get_name())();
  } catch (const lockstep::Error& e) {
    std::fprintf(stderr, "lockstep: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lockstep: internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}
