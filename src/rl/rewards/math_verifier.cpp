#include "rl/rewards/math_verifier.h"

#include <cctype>
#include <vector>

#include "rl/rewards/rational.h"

namespace lockstep::rl {

namespace {

// Deeper nesting than this is compared as text (a hostile response cannot exhaust the stack).
constexpr int kMaxDepth = 32;

bool is_letter(char c) { return std::isalpha(static_cast<unsigned char>(c)) != 0; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
}

// Removes the LaTeX command `name` (e.g. "\left") where it is not the prefix of a longer
// command name ("\leftarrow" stays).
void remove_command(std::string& s, std::string_view name) {
  for (size_t pos = s.find(name); pos != std::string::npos; pos = s.find(name, pos)) {
    const size_t end = pos + name.size();
    if (end < s.size() && is_letter(s[end])) {
      pos = end;
      continue;
    }
    s.erase(pos, name.size());
  }
}

// The index just past the brace group that opens at `open` (s[open] == '{'), skipping \{ and
// \}; npos when it does not close.
size_t skip_group(std::string_view s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
      ++i;
    } else if (s[i] == '{') {
      ++depth;
    } else if (s[i] == '}' && --depth == 0) {
      return i + 1;
    }
  }
  return std::string_view::npos;
}

// One argument of a command written without braces: a single character, or a command name
// ("\frac\pi2" has \pi and 2). Returns its end.
size_t skip_bare_argument(std::string_view s, size_t i) {
  if (i >= s.size()) return i;
  if (s[i] != '\\') return i + 1;
  size_t j = i + 1;
  while (j < s.size() && is_letter(s[j])) ++j;
  return j == i + 1 ? std::min(s.size(), j + 1) : j;
}

// Rewrites the shorthands \frac12, \frac1{2}, \frac{1}2 and \sqrt2 with braces (below
// kMaxDepth levels of nesting; deeper text is kept as written).
std::string brace_arguments(std::string_view s, int depth = 0) {
  if (depth > kMaxDepth) return std::string(s);
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const bool frac = s.substr(i, 5) == "\\frac" && (i + 5 >= s.size() || !is_letter(s[i + 5]));
    const bool sqrt = s.substr(i, 5) == "\\sqrt" && (i + 5 >= s.size() || !is_letter(s[i + 5]));
    if (!frac && !sqrt) {
      out += s[i++];
      continue;
    }
    out += frac ? "\\frac" : "\\sqrt";
    i += 5;
    if (sqrt && i < s.size() && s[i] == '[') {  // \sqrt[3]{x}: keep the index as written
      const size_t close = s.find(']', i);
      if (close == std::string_view::npos) continue;
      out += s.substr(i, close + 1 - i);
      i = close + 1;
    }
    for (int arg = 0; arg < (frac ? 2 : 1) && i < s.size(); ++arg) {
      size_t end = s[i] == '{' ? skip_group(s, i) : skip_bare_argument(s, i);
      if (end == std::string_view::npos) end = s.size();
      std::string_view a = s.substr(i, end - i);
      out += '{';
      if (!a.empty() && a.front() == '{') {
        out += brace_arguments(a.substr(1, a.size() >= 2 ? a.size() - 2 : 0), depth + 1);
      } else {
        out += a;
      }
      out += '}';
      i = end;
    }
  }
  return out;
}

// \text{...} and its kin: a trailing one after a value is a unit and goes; any other is
// replaced by its content ("\text{(B)}" is "(B)").
void strip_text_commands(std::string& s) {
  for (std::string_view cmd : {"\\text", "\\textbf", "\\textrm", "\\mbox", "\\mathrm", "\\mathbf"}) {
    for (size_t pos = s.find(cmd); pos != std::string::npos; pos = s.find(cmd, pos)) {
      size_t open = pos + cmd.size();
      while (open < s.size() && s[open] == ' ') ++open;
      if (open >= s.size() || s[open] != '{') {
        pos += cmd.size();
        continue;
      }
      const size_t end = skip_group(s, open);
      if (end == std::string::npos) break;
      std::string content = s.substr(open + 1, end - open - 2);
      // A unit: the group ends the answer (maybe with ^2 or ^3) and something comes before it.
      size_t tail = end;
      if (s.compare(tail, 1, "^") == 0) {
        tail += 1;
        if (s.compare(tail, 1, "{") == 0) {
          const size_t close = skip_group(s, tail);
          tail = close == std::string::npos ? s.size() + 1 : close;
        } else {
          tail += 1;
        }
      }
      std::string before = s.substr(0, pos);
      while (!before.empty() && before.back() == ' ') before.pop_back();
      if (tail == s.size() && !before.empty()) {
        s.erase(pos);
      } else {
        s.replace(pos, end - pos, content);
      }
    }
  }
}

bool is_thousands_number(std::string_view s) {
  size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
  size_t lead = 0;
  while (i < s.size() && is_digit(s[i])) ++i, ++lead;
  if (lead < 1 || lead > 3) return false;
  int groups = 0;
  while (i < s.size() && s[i] == ',') {
    for (size_t k = 1; k <= 3; ++k)
      if (i + k >= s.size() || !is_digit(s[i + k])) return false;
    i += 4;
    ++groups;
  }
  if (groups == 0) return false;
  if (i < s.size() && s[i] == '.') {
    ++i;
    while (i < s.size() && is_digit(s[i])) ++i;
  }
  return i == s.size();
}

// ".5" -> "0.5" where a number starts with its point, and "2.50" -> "2.5", "3.0" -> "3".
std::string canonical_decimals(std::string_view s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const bool starts_number = is_digit(s[i]) || (s[i] == '.' && i + 1 < s.size() && is_digit(s[i + 1]));
    const bool inside_word = i > 0 && (is_letter(s[i - 1]) || is_digit(s[i - 1]));
    if (!starts_number || inside_word) {
      out += s[i++];
      continue;
    }
    size_t j = i;
    while (j < s.size() && is_digit(s[j])) ++j;
    std::string whole(s.substr(i, j - i));
    if (whole.empty()) whole.push_back('0');
    if (j < s.size() && s[j] == '.' && (j + 1 >= s.size() || s[j + 1] != '.')) {
      size_t k = j + 1;
      while (k < s.size() && is_digit(s[k])) ++k;
      std::string frac(s.substr(j + 1, k - j - 1));
      while (!frac.empty() && frac.back() == '0') frac.pop_back();
      out += whole;
      if (!frac.empty()) {
        out += '.';
        out += frac;
      }
      i = k;
    } else {
      out += whole;
      i = j;
    }
  }
  return out;
}

// A leading "x=" or "y =" (a short variable name) is dropped: "x=5" is the answer 5.
void strip_variable_prefix(std::string& s) {
  const size_t eq = s.find('=');
  if (eq == std::string::npos || s.find('=', eq + 1) != std::string::npos) return;
  if (eq == 0 || eq > 2) return;
  for (size_t i = 0; i < eq; ++i)
    if (!is_letter(s[i])) return;
  s.erase(0, eq + 1);
}

// ---- Exact values. ----

struct ValueParser {
  std::string_view s;
  size_t i = 0;
  int depth = 0;

  bool eat(std::string_view tok) {
    if (s.substr(i, tok.size()) != tok) return false;
    i += tok.size();
    return true;
  }
  // value := sign atom ('/' sign atom)?
  std::optional<Rational> value() {
    if (++depth > kMaxDepth) return std::nullopt;
    auto a = signed_atom();
    if (a && eat("/")) {
      auto b = signed_atom();
      a = b ? Rational::divide(*a, *b) : std::nullopt;
    }
    --depth;
    return a;
  }
  std::optional<Rational> signed_atom() {
    bool negative = false;
    while (i < s.size() && (s[i] == '-' || s[i] == '+')) negative ^= s[i++] == '-';
    auto a = atom();
    if (a && negative) a = a->negated();
    return a;
  }
  // atom := decimal | \frac{value}{value} | {value}
  std::optional<Rational> atom() {
    if (eat("\\frac{")) {
      auto num = value();
      if (!num || !eat("}{")) return std::nullopt;
      auto den = value();
      if (!den || !eat("}")) return std::nullopt;
      return Rational::divide(*num, *den);
    }
    if (eat("{")) {
      auto v = value();
      if (!v || !eat("}")) return std::nullopt;
      return v;
    }
    const size_t begin = i;
    while (i < s.size() && (is_digit(s[i]) || s[i] == '.')) ++i;
    return Rational::from_decimal(s.substr(begin, i - begin));
  }
};

std::optional<Rational> exact_value(std::string_view s) {
  ValueParser p{s};
  auto v = p.value();
  if (!v || p.i != s.size()) return std::nullopt;
  return v;
}

// ---- Tuples and intervals. ----

struct Tuple {
  char open = 0, close = 0;  // 0 for a bare list "1,2,3"
  std::vector<std::string> elements;
};

// Splits at the commas outside any bracket or brace.
std::vector<std::string> split_top_level(std::string_view s) {
  std::vector<std::string> parts;
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
      ++i;
    } else if (c == '(' || c == '[' || c == '{') {
      ++depth;
    } else if (c == ')' || c == ']' || c == '}') {
      --depth;
    } else if (c == ',' && depth == 0) {
      parts.emplace_back(s.substr(start, i - start));
      start = i + 1;
    }
  }
  parts.emplace_back(s.substr(start));
  return parts;
}

std::optional<Tuple> as_tuple(std::string_view s) {
  Tuple t;
  std::string_view inner = s;
  if (s.size() >= 2 && (s.front() == '(' || s.front() == '[') && (s.back() == ')' || s.back() == ']')) {
    // The opening bracket must close at the end: "(1)+(2)" is not a tuple.
    int depth = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '(' || s[i] == '[') ++depth;
      if (s[i] == ')' || s[i] == ']') --depth;
      if (depth == 0 && i + 1 < s.size()) return std::nullopt;
    }
    t.open = s.front(), t.close = s.back();
    inner = s.substr(1, s.size() - 2);
  }
  t.elements = split_top_level(inner);
  if (t.elements.size() < 2) return std::nullopt;
  return t;
}

bool normalized_match(const std::string& a, const std::string& b, int depth) {
  if (a == b) return true;
  if (depth > kMaxDepth) return false;
  auto va = exact_value(a), vb = exact_value(b);
  if (va && vb) return *va == *vb;
  if (va || vb) return false;
  auto ta = as_tuple(a), tb = as_tuple(b);
  if (!ta || !tb || ta->open != tb->open || ta->close != tb->close || ta->elements.size() != tb->elements.size())
    return false;
  for (size_t i = 0; i < ta->elements.size(); ++i)
    if (!normalized_match(ta->elements[i], tb->elements[i], depth + 1)) return false;
  return true;
}

}  // namespace

std::optional<std::string> last_boxed(std::string_view text) {
  size_t pos = std::string_view::npos, name_len = 0;
  for (std::string_view cmd : {"\\boxed", "\\fbox"}) {
    const size_t p = text.rfind(cmd);
    if (p != std::string_view::npos && (pos == std::string_view::npos || p > pos)) pos = p, name_len = cmd.size();
  }
  if (pos == std::string_view::npos) return std::nullopt;
  size_t i = pos + name_len;
  if (i < text.size() && text[i] == '{') {
    const size_t end = skip_group(text, i);
    if (end == std::string_view::npos) return std::nullopt;
    return std::string(text.substr(i + 1, end - i - 2));
  }
  // "\boxed 5": the argument runs to the next space or dollar sign.
  if (i >= text.size() || text[i] != ' ') return std::nullopt;
  while (i < text.size() && text[i] == ' ') ++i;
  size_t end = i;
  while (end < text.size() && !std::isspace(static_cast<unsigned char>(text[end])) && text[end] != '$') ++end;
  if (end == i) return std::nullopt;
  return std::string(text.substr(i, end - i));
}

std::string normalize_answer(std::string_view answer) {
  std::string s(answer);
  replace_all(s, "\xE2\x88\x92", "-");  // U+2212 MINUS SIGN
  replace_all(s, "\n", " ");
  for (std::string_view cmd : {"\\left", "\\right", "\\displaystyle", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr"})
    remove_command(s, cmd);
  replace_all(s, "\\dfrac", "\\frac");
  replace_all(s, "\\tfrac", "\\frac");
  strip_text_commands(s);
  for (std::string_view gone :
       {"\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\$", "$", "\\%", "%", "^{\\circ}", "^\\circ", "\\circ", "\xC2\xB0"})
    replace_all(s, gone, "");
  replace_all(s, "{,}", ",");
  std::string compact;
  for (char c : s)
    if (!std::isspace(static_cast<unsigned char>(c))) compact += c;
  s = brace_arguments(compact);
  strip_variable_prefix(s);
  // A whole answer that is one brace group: "{5}" is 5.
  while (s.size() >= 2 && s.front() == '{' && skip_group(s, 0) == s.size()) s = s.substr(1, s.size() - 2);
  if (is_thousands_number(s)) replace_all(s, ",", "");
  return canonical_decimals(s);
}

bool answers_match(std::string_view given, std::string_view expected) {
  return normalized_match(normalize_answer(given), normalize_answer(expected), 0);
}

float math_reward(std::string_view response, std::string_view label) {
  auto given = last_boxed(response);
  if (!given) return 0.0f;
  std::string expected(label);
  if (auto boxed = last_boxed(label)) expected = *boxed;
  return answers_match(*given, expected) ? 1.0f : 0.0f;
}

}  // namespace lockstep::rl
