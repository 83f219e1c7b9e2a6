// The `lockstep` command line: one binary, one subcommand per job.
#include <cstdio>
#include <exception>
#include <map>

#include "command_registry.h"
#include "core/error.h"
#include "dist/mpi_communicator.h"

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
  // One rank's failure ends every rank of an mpirun job with its message (the others would
  // otherwise wait in a collective forever).
  auto failed = [](const std::string& message, int code) {
    lockstep::dist::MpiRuntime::abort_job_if_parallel(message, code);
    std::fprintf(stderr, "lockstep: %s\n", message.c_str());
    return code;
  };
  try {
    if (lockstep::dist::MpiRuntime::launched_by_mpirun()) {
      std::string command_line;
      for (int i = 1; i < argc; ++i) command_line += std::string(i > 1 ? " " : "") + argv[i];
      lockstep::dist::MpiRuntime::instance().check_ranks_agree(command_line);
    }
    for (auto* sub : app.get_subcommands()) return runners.at(sub->get_name())();
  } catch (const lockstep::Error& e) {
    return failed(std::string("error: ") + e.what(), 1);
  } catch (const std::exception& e) {
    return failed(std::string("internal error: ") + e.what(), 2);
  }
  return 0;
}
