// Exact rational numbers of any length, for comparing math answers: "0.50", "1/2" and
// "\frac{2}{4}" are one value. Only what answer checking needs: parse a decimal literal,
// divide, negate, and compare for equality (by cross-multiplication, no reduction).
#pragma once
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace lockstep::rl {

// A non-negative integer in base 1e9, least significant limb first, no leading zero limbs.
class BigUint {
 public:
  BigUint() = default;
  explicit BigUint(uint32_t v);
  // Digits only ("0042" is 42); nullopt for an empty string or a non-digit.
  static std::optional<BigUint> from_decimal(std::string_view digits);
  bool is_zero() const { return limbs_.empty(); }
  BigUint operator*(const BigUint& o) const;
  bool operator==(const BigUint& o) const = default;

 private:
  void trim();
  std::vector<uint32_t> limbs_;
};

class Rational {
 public:
  // A decimal literal: optional sign, digits with an optional point ("-12", "3.50", ".5", "7.").
  static std::optional<Rational> from_decimal(std::string_view text);
  // nullopt when `divisor` is zero.
  static std::optional<Rational> divide(const Rational& a, const Rational& divisor);
  Rational negated() const;
  bool is_zero() const { return num_.is_zero(); }
  bool operator==(const Rational& o) const;

 private:
  bool negative_ = false;
  BigUint num_, den_{1};
};

}  // namespace lockstep::rl
