// Advantage estimators, hand-checked.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "train/advantages.h"

namespace lockstep {
namespace {

TEST(LossAdvantages, GrpoNormalisesEachGroupByItsStd) {
  auto a = compute_advantages(AdvantageEstimator::grpo, {1, 0, 0, 1, 1, 1}, {2, 1, 3, 1, 1, 1}, 3);
  // Group 0: mean 1/3, std sqrt(1/3).
  double s = std::sqrt(1.0 / 3.0);
  EXPECT_NEAR(a[0][0], (2.0 / 3.0) / (s + 1e-6), 1e-5);
  EXPECT_EQ(a[0].size(), 2u);
  EXPECT_EQ(a[0][0], a[0][1]);
  EXPECT_NEAR(a[1][0], (-1.0 / 3.0) / (s + 1e-6), 1e-5);
  // Group 1: all equal rewards -> zero advantage.
  EXPECT_EQ(a[4][0], 0.0f);
}

TEST(LossAdvantages, DrGrpoOnlyCentres) {
  auto a = compute_advantages(AdvantageEstimator::dr_grpo, {1, 0, 0, 1}, {1, 1, 1, 1}, 4);
  EXPECT_FLOAT_EQ(a[0][0], 0.5f);
  EXPECT_FLOAT_EQ(a[1][0], -0.5f);
}

TEST(LossAdvantages, ReinforcePlusPlusNormalisesOverBatchTokens) {
  auto a = compute_advantages(AdvantageEstimator::reinforce_plus_plus, {1, 0}, {3, 1}, 1);
  // Tokens: 1,1,1,0 -> mean 0.75, sample std 0.5.
  EXPECT_NEAR(a[0][0], 0.25 / 0.5, 1e-5);
  EXPECT_NEAR(a[1][0], -0.75 / 0.5, 1e-5);
}

TEST(LossAdvantages, GspoUsesGrpoAdvantages) {
  auto g = compute_advantages(AdvantageEstimator::grpo, {0.5f, 0.1f}, {1, 2}, 2);
  auto s = compute_advantages(AdvantageEstimator::gspo, {0.5f, 0.1f}, {1, 2}, 2);
  EXPECT_EQ(g, s);
}

TEST(LossAdvantages, BadGroupsAreErrors) {
  EXPECT_THROW(compute_advantages(AdvantageEstimator::grpo, {1, 0, 1}, {1, 1, 1}, 2), Error);
  EXPECT_THROW(advantage_estimator_from_name("ppo"), Error);
}

}  // namespace
}  // namespace lockstep
