// Checks on an output path before anything is written to it: it is not one of the inputs
// (through "./", "dir/..", symlinks or hard links), not inside an input directory, and not
// a special file that a rename would destroy or an open would block on.
#pragma once
#include <string>
#include <vector>

namespace lockstep {

// Throws Error "<flag> <output> is the same file as <input>" when `output` names any of
// `inputs` ("-" for stdin/stdout is never a file and is skipped).
void check_output_differs(const std::string& output, const std::vector<std::string>& inputs, const std::string& flag);

// Throws when `output` is the directory `dir`, lies anywhere inside it, or holds it
// (convert's, audit's and grad's output must never go into their own input model).
void check_output_outside(const std::string& output, const std::string& dir, const std::string& flag);

// Throws when `path` exists (not followed through a symlink) and is not a regular file: a
// symlink, directory, device, FIFO or socket is never replaced by a rename or truncated.
void check_replaceable(const std::string& path);

}  // namespace lockstep
