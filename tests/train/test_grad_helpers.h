// Helpers for the backward tests: double-precision random data, finite differences and
// error measures ("double-checked": each op's plain float64 reference backward is checked by
// central differences, and the fp32 kernel is compared with that reference).
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "../kernels/random.h"

namespace lockstep::testing {

inline std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// max |got - ref| / max |ref|.
inline double rel_err(const std::vector<float>& got, const std::vector<double>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  return max_rel_err(got, ref);
}

inline double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num = std::max(num, std::abs(got[i] - ref[i]));
    den = std::max(den, std::abs(ref[i]));
  }
  return num / (den + 1e-30);
}

// Central differences of `loss` with respect to up to `max_checks` entries of x (evenly
// spread), compared with `analytic`; returns the worst error relative to max |analytic|.
inline double finite_difference_error(std::vector<double>& x, const std::vector<double>& analytic,
                                      const std::function<double()>& loss, int max_checks = 48, double h = 1e-6) {
  double scale = 0;
  for (double a : analytic) scale = std::max(scale, std::abs(a));
  double worst = 0;
  const size_t stride = std::max<size_t>(1, x.size() / size_t(max_checks));
  for (size_t i = 0; i < x.size(); i += stride) {
    const double keep = x[i];
    x[i] = keep + h;
    double up = loss();
    x[i] = keep - h;
    double down = loss();
    x[i] = keep;
    worst = std::max(worst, std::abs((up - down) / (2 * h) - analytic[i]));
  }
  return worst / (scale + 1e-30);
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace lockstep::testing
