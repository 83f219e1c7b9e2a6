// The built-in calculator tool's arithmetic: integers, + - * /, unary minus and parentheses, on
// exact fractions of 64-bit integers. The result is an integer ("42") or a reduced fraction
// ("-7/2"); bad input, division by zero and overflow are errors whose message the tool answers.
#pragma once
#include <string>
#include <string_view>

namespace lockstep::rl {

// Throws lockstep::Error naming the problem and the offset in `expression`.
std::string calculate(std::string_view expression);

}  // namespace lockstep::rl
