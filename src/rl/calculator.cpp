#include "rl/calculator.h"

#include <cctype>
#include <cstdint>
#include <numeric>

#include "core/error.h"

namespace lockstep::rl {

namespace {

struct Fraction {
  int64_t num = 0, den = 1;  // den > 0, reduced
};

void check_fits(bool overflow) { LS_CHECK(!overflow, "the result does not fit 64-bit integers"); }

int64_t mul(int64_t a, int64_t b) {
  int64_t r = 0;
  check_fits(__builtin_mul_overflow(a, b, &r));
  return r;
}

int64_t add(int64_t a, int64_t b) {
  int64_t r = 0;
  check_fits(__builtin_add_overflow(a, b, &r));
  return r;
}

Fraction reduced(int64_t num, int64_t den) {
  if (den < 0) num = mul(num, -1), den = mul(den, -1);
  const int64_t g = std::gcd(num, den);
  return {num / g, den / g};
}

// Recursive descent: sum := product (('+'|'-') product)*, product := unary (('*'|'/') unary)*,
// unary := '-' unary | '(' sum ')' | digits.
class Parser {
 public:
  explicit Parser(std::string_view text) : s_(text) {}
  Fraction parse() {
    const Fraction v = sum();
    skip_space();
    LS_CHECK(i_ == s_.size(), "unexpected '", s_[i_], "' at offset ", i_);
    return v;
  }

 private:
  void skip_space() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool take(char c) {
    skip_space();
    if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
    return false;
  }
  Fraction sum() {
    Fraction v = product();
    for (;;) {
      if (take('+')) {
        const Fraction w = product();
        v = reduced(add(mul(v.num, w.den), mul(w.num, v.den)), mul(v.den, w.den));
      } else if (take('-')) {
        const Fraction w = product();
        v = reduced(add(mul(v.num, w.den), mul(mul(w.num, -1), v.den)), mul(v.den, w.den));
      } else {
        return v;
      }
    }
  }
  Fraction product() {
    Fraction v = unary();
    for (;;) {
      if (take('*')) {
        const Fraction w = unary();
        v = reduced(mul(v.num, w.num), mul(v.den, w.den));
      } else if (take('/')) {
        const size_t at = i_;
        const Fraction w = unary();
        LS_CHECK(w.num != 0, "division by zero at offset ", at);
        v = reduced(mul(v.num, w.den), mul(v.den, w.num));
      } else {
        return v;
      }
    }
  }
  Fraction unary() {
    if (++depth_ > 64) fail("more than 64 nested operations");
    Fraction v;
    if (take('-')) {
      v = unary();
      v.num = mul(v.num, -1);
    } else if (take('(')) {
      v = sum();
      LS_CHECK(take(')'), "expected ')' at offset ", i_);
    } else {
      v = number();
    }
    --depth_;
    return v;
  }
  Fraction number() {
    skip_space();
    LS_CHECK(i_ < s_.size(), "expected a number at the end");
    LS_CHECK(std::isdigit(static_cast<unsigned char>(s_[i_])), "expected a number at offset ", i_, ", found '", s_[i_],
             "'");
    int64_t v = 0;
    while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) v = add(mul(v, 10), s_[i_++] - '0');
    return {v, 1};
  }

  std::string_view s_;
  size_t i_ = 0;
  int depth_ = 0;
};

}  // namespace

std::string calculate(std::string_view expression) {
  const Fraction v = Parser(expression).parse();
  return v.den == 1 ? std::to_string(v.num) : std::to_string(v.num) + "/" + std::to_string(v.den);
}

}  // namespace lockstep::rl
