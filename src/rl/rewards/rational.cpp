#include "rl/rewards/rational.h"

#include <algorithm>
#include <string>

namespace lockstep::rl {

namespace {
constexpr uint64_t kBase = 1000000000;
constexpr size_t kLimbDigits = 9;
}  // namespace

BigUint::BigUint(uint32_t v) {
  if (v >= kBase)
    limbs_ = {uint32_t(v % kBase), uint32_t(v / kBase)};
  else if (v)
    limbs_ = {v};
}

std::optional<BigUint> BigUint::from_decimal(std::string_view digits) {
  if (digits.empty()) return std::nullopt;
  for (char ch : digits)
    if (ch < '0' || ch > '9') return std::nullopt;
  BigUint out;
  // Limbs from the right: each takes up to nine digits.
  for (size_t end = digits.size(); end > 0;) {
    const size_t begin = end >= kLimbDigits ? end - kLimbDigits : 0;
    uint32_t limb = 0;
    for (size_t i = begin; i < end; ++i) limb = limb * 10 + uint32_t(digits[i] - '0');
    out.limbs_.push_back(limb);
    end = begin;
  }
  out.trim();
  return out;
}

void BigUint::trim() {
  while (!limbs_.empty() && limbs_.back() == 0) limbs_.pop_back();
}

BigUint BigUint::operator*(const BigUint& o) const {
  BigUint out;
  if (is_zero() || o.is_zero()) return out;
  std::vector<uint64_t> acc(limbs_.size() + o.limbs_.size() + 1, 0);
  for (size_t i = 0; i < limbs_.size(); ++i) {
    uint64_t carry = 0;
    for (size_t j = 0; j < o.limbs_.size(); ++j) {
      const uint64_t cur = acc[i + j] + uint64_t(limbs_[i]) * o.limbs_[j] + carry;
      acc[i + j] = cur % kBase;
      carry = cur / kBase;
    }
    for (size_t k = i + o.limbs_.size(); carry; ++k) {
      const uint64_t cur = acc[k] + carry;
      acc[k] = cur % kBase;
      carry = cur / kBase;
    }
  }
  out.limbs_.assign(acc.begin(), acc.end());
  out.trim();
  return out;
}

std::optional<Rational> Rational::from_decimal(std::string_view text) {
  Rational r;
  if (!text.empty() && (text[0] == '-' || text[0] == '+')) {
    r.negative_ = text[0] == '-';
    text.remove_prefix(1);
  }
  const size_t point = text.find('.');
  std::string_view whole = text.substr(0, point), frac;
  if (point != std::string_view::npos) frac = text.substr(point + 1);
  if (whole.empty() && frac.empty()) return std::nullopt;  // "", "-", "."
  std::string digits(whole);
  digits += frac;
  auto num = BigUint::from_decimal(digits);
  if (!num) return std::nullopt;
  r.num_ = *num;
  std::string power_of_ten(frac.size() + 1, '0');
  power_of_ten[0] = '1';
  r.den_ = *BigUint::from_decimal(power_of_ten);
  return r;
}

std::optional<Rational> Rational::divide(const Rational& a, const Rational& divisor) {
  if (divisor.is_zero()) return std::nullopt;
  Rational r;
  r.negative_ = a.negative_ != divisor.negative_;
  r.num_ = a.num_ * divisor.den_;
  r.den_ = a.den_ * divisor.num_;
  return r;
}

Rational Rational::negated() const {
  Rational r = *this;
  r.negative_ = !negative_;
  return r;
}

bool Rational::operator==(const Rational& o) const {
  if (is_zero() || o.is_zero()) return is_zero() && o.is_zero();  // -0 == 0
  return negative_ == o.negative_ && num_ * o.den_ == o.num_ * den_;
}

}  // namespace lockstep::rl
