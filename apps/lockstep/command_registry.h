// Subcommands of the `lockstep` binary. Each cmd_<name>.cpp registers itself with
// `static const bool registered = register_command({...});`.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace lockstep::cli {

struct Command {
  std::string name;
  std::string help;
  // Adds the subcommand's options to `sub` and returns the function that runs it
  // (called after parsing; returns the process exit code).
  std::function<std::function<int()>(CLI::App& sub)> setup;
};

bool register_command(Command command);
const std::vector<Command>& registered_commands();

}  // namespace lockstep::cli
