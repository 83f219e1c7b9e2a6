// The `--rm-type math` verifier: is the last \boxed{...} of a response the label's answer?
//
// Both sides are normalised (LaTeX spacing and sizing commands, \dfrac/\tfrac, \frac12 and
// \sqrt2 shorthands, \text{...} units, dollar and percent signs, degrees, thousands separators,
// "x = " prefixes, leading ".5", trailing zeros, whitespace), then compared: as exact rationals
// when both are numbers (integers of any length, decimals, a/b, \frac{a}{b}, signs), element
// by element in order when both are tuples or intervals with the same brackets, otherwise as
// normalised strings. No symbolic algebra: "\sqrt{8}" and "2\sqrt{2}" differ.
#pragma once
#include <optional>
#include <string>
#include <string_view>

namespace lockstep::rl {

// The content of the last \boxed{...} (or \fbox{...}, or "\boxed x") of `text`, nested braces
// matched and \{ \} skipped; nullopt when there is none or its braces do not close.
std::optional<std::string> last_boxed(std::string_view text);

// The canonical text of an answer (the normalisation above, before any comparison).
std::string normalize_answer(std::string_view answer);

// Whether two answers (box contents, or bare labels) are the same answer.
bool answers_match(std::string_view given, std::string_view expected);

// 1 when the last boxed answer of `response` matches `label` (itself boxed or bare), else 0.
float math_reward(std::string_view response, std::string_view label);

}  // namespace lockstep::rl
