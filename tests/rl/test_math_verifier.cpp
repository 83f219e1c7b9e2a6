// The `--rm-type math` verifier: box extraction, normalisation, exact rational comparison,
// tuples and intervals, and the dapo / exact reward types.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "rl/rewards/local_reward.h"
#include "rl/rewards/math_verifier.h"
#include "rl/rewards/rational.h"

namespace lockstep::rl {
namespace {

struct Case {
  const char* given;
  const char* expected;
  bool match;
};

// Each case is checked both ways round: matching is symmetric.
const std::vector<Case> kCases = {
    // Plain numbers, signs, decimals.
    {"42", "42", true},
    {"42", "43", false},
    {"+3", "3", true},
    {"-5", "5", false},
    {"0", "-0", true},
    {"\xE2\x88\x92"
     "3",
     "-3", true},  // U+2212 minus sign
    {".5", "0.5", true},
    {"-.5", "-\\frac{1}{2}", true},
    {"2.50", "2.5", true},
    {"3.000", "3", true},
    {"3.", "3", true},
    {"5", "5.0001", false},
    {"3.14", "3.14159", false},
    {"0.1", "1/10", true},
    {"0.333", "1/3", false},
    {"\\frac{1}{3}", "0.3333333333", false},
    // Integers of any length.
    {"123456789012345678901234567890.0", "123456789012345678901234567890", true},
    {"246913578024691357802469135780/2", "123456789012345678901234567890", true},
    {"1000000000000000000001", "1000000000000000000000", false},
    {"99999999999999999999999999/99999999999999999999999999", "1", true},
    // Fractions.
    {"0.5", "\\frac{1}{2}", true},
    {"\\dfrac{1}{2}", "1/2", true},
    {"\\tfrac12", "0.5", true},
    {"\\frac12", "\\frac{1}{2}", true},
    {"\\frac1{2}", "0.5", true},
    {"\\frac{1}2", "0.5", true},
    {"\\frac 3 4", "0.75", true},
    {"7/14", "\\frac{1}{2}", true},
    {"\\frac{2}{4}", "\\frac{1}{2}", true},
    {"-\\frac{3}{4}", "\\frac{-3}{4}", true},
    {"\\frac{3}{-4}", "-0.75", true},
    {"-\\frac{-3}{4}", "0.75", true},
    {"\\frac{0.5}{2}", "1/4", true},
    {"\\frac{1}{\\frac{1}{2}}", "2", true},
    {"\\frac{1}{0}", "0", false},
    {"\\frac{3}{4}", "\\frac{4}{3}", false},
    // LaTeX wrappers, units and signs.
    {"\\left( 1, 2 \\right)", "(1,2)", true},
    {"\\displaystyle \\frac{1}{2}", "1/2", true},
    {"\\$5", "5", true},
    {"$5$", "5", true},
    {"5\\%", "5", true},
    {"50%", "50", true},
    {"90^\\circ", "90", true},
    {"90^{\\circ}", "90", true},
    {"10 \\text{ cm}", "10", true},
    {"10\\text{cm}^2", "10", true},
    {"10 \\mbox{ meters}", "10", true},
    {"\\text{(B)}", "(B)", true},
    {"\\mbox{yes}", "yes", true},
    {"\\text{yes}", "no", false},
    {"{7}", "7", true},
    {"x = 5", "5", true},
    {"y=\\frac{1}{2}", "0.5", true},
    {"x = 5", "6", false},
    // Thousands separators.
    {"1,000,000", "1000000", true},
    {"1{,}000", "1000", true},
    {"1\\,000", "1000", true},
    {"\\$1,234.50", "1234.5", true},
    {"12,34", "1234", false},
    {"1,000", "1", false},
    // Roots and symbols compare as normalised text.
    {"\\sqrt2", "\\sqrt{2}", true},
    {"\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", true},
    {"\\frac{\\pi}{2}", "\\frac\\pi2", true},
    {"2\\pi", "2 \\pi", true},
    {"\\sqrt{8}", "2\\sqrt{2}", false},
    {"\\sqrt[3]{2}", "\\sqrt{2}", false},
    // Tuples and intervals, element by element in order.
    {"(1, \\frac12)", "(1,0.5)", true},
    {"(1,2)", "(2,1)", false},
    {"(1,2)", "[1,2]", false},
    {"[1,2)", "[1,2]", false},
    {"(1,2,3)", "(1,2)", false},
    {"[-1, 3)", "[-1.0,3)", true},
    {"(-\\infty, 3]", "(-\\infty,3]", true},
    {"\\left[ 0, \\infty \\right)", "[0,\\infty)", true},
    {"\\frac{1}{2}, \\frac{3}{4}", "0.5, 0.75", true},
    {"((1,2),(3,4))", "((1, 2), (3, 4.0))", true},
    {"((1,2),(3,4))", "((1,2),(4,3))", false},
};

TEST(MathVerifier, AnswerCases) {
  ASSERT_GE(kCases.size(), 60u);
  for (const auto& c : kCases) {
    EXPECT_EQ(answers_match(c.given, c.expected), c.match)
        << "'" << c.given << "' vs '" << c.expected << "' (normalised '" << normalize_answer(c.given) << "' vs '"
        << normalize_answer(c.expected) << "')";
    EXPECT_EQ(answers_match(c.expected, c.given), c.match) << "'" << c.expected << "' vs '" << c.given << "'";
  }
}

TEST(MathVerifier, LastBoxedTakesTheLastBoxWithNestedBraces) {
  EXPECT_EQ(last_boxed("The answer is \\boxed{\\frac{1}{2}}."), "\\frac{1}{2}");
  EXPECT_EQ(last_boxed("first \\boxed{1}, then \\boxed{2}"), "2");
  EXPECT_EQ(last_boxed("\\boxed{\\{1, 2\\}}"), "\\{1, 2\\}");
  EXPECT_EQ(last_boxed("\\boxed{{a}{b{c}}}"), "{a}{b{c}}");
  EXPECT_EQ(last_boxed("\\fbox{4}"), "4");
  EXPECT_EQ(last_boxed("so $\\boxed 5$ it is"), "5");
  EXPECT_EQ(last_boxed("\\boxed{}"), "");
  EXPECT_FALSE(last_boxed("no box here, 42"));
  EXPECT_FALSE(last_boxed("\\boxed{3"));
  EXPECT_FALSE(last_boxed("\\boxed{1} and then \\boxed{2"));  // the last box is broken
}

TEST(MathVerifier, RewardNeedsABoxAndUsesItsLastOne) {
  EXPECT_EQ(math_reward("so the answer is \\boxed{\\dfrac{1}{2}}", "0.5"), 1.0f);
  EXPECT_EQ(math_reward("\\boxed{3} is wrong, it is \\boxed{4}", "4"), 1.0f);
  EXPECT_EQ(math_reward("\\boxed{4} is wrong, it is \\boxed{3}", "4"), 0.0f);
  EXPECT_EQ(math_reward("the answer is 4", "4"), 0.0f);  // no box: 0
  EXPECT_EQ(math_reward("\\boxed{4", "4"), 0.0f);
  EXPECT_EQ(math_reward("so \\boxed{\\frac{1}{2}}", "\\boxed{0.5}"), 1.0f);  // a boxed label
  EXPECT_EQ(math_reward("\\boxed{}", ""), 1.0f);
}

TEST(MathVerifier, HostileInputIsBoundedAndWrong) {
  // 1 / 2^20000 as nested fractions: balanced, far deeper than any parser should recurse.
  std::string deep;
  for (int i = 0; i < 20000; ++i) deep += "\\frac{";
  deep += "1";
  for (int i = 0; i < 20000; ++i) deep += "}{2}";
  EXPECT_EQ(math_reward("\\boxed{" + deep + "}", "1"), 0.0f);
  EXPECT_EQ(math_reward("\\boxed{" + deep + "}", "\\boxed{" + deep + "}"), 1.0f);
  std::string shallow = "1";
  for (int i = 0; i < 10; ++i) shallow = "\\frac{" + shallow + "}{2}";
  EXPECT_EQ(math_reward("\\boxed{" + shallow + "}", "0.0009765625"), 1.0f);  // 2^-10
  std::string nested = "1";
  for (int i = 0; i < 200; ++i) nested = "{" + nested + "}";
  EXPECT_EQ(answers_match(nested, "1"), true);  // brace groups around a value unwrap
  std::string tuple = "1";
  for (int i = 0; i < 200; ++i) tuple = "(" + tuple + ",1)";
  EXPECT_TRUE(answers_match(tuple, tuple));
  EXPECT_FALSE(answers_match(tuple, "(" + tuple + ")"));
}

TEST(RewardTypes, DapoIsPlusOrMinusOneAndExactIsTrimmedEquality) {
  EXPECT_EQ(local_reward(RewardType::dapo, "\\boxed{6}", "6"), 1.0f);
  EXPECT_EQ(local_reward(RewardType::dapo, "\\boxed{7}", "6"), -1.0f);
  EXPECT_EQ(local_reward(RewardType::dapo, "6", "6"), -1.0f);
  EXPECT_EQ(local_reward(RewardType::math, "\\boxed{7}", "6"), 0.0f);
  EXPECT_EQ(local_reward(RewardType::exact, "  Paris\n", "Paris"), 1.0f);
  EXPECT_EQ(local_reward(RewardType::exact, "paris", "Paris"), 0.0f);
  EXPECT_EQ(local_reward(RewardType::exact, "\\boxed{6}", "6"), 0.0f);
  EXPECT_EQ(reward_type_from_name("dapo"), RewardType::dapo);
  try {
    reward_type_from_name("rm");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--rm-type: expected math | dapo | exact, got 'rm'"), std::string::npos);
  }
}

TEST(RewardTypes, LabelsAreStringsOrNumbers) {
  EXPECT_EQ(label_text(nlohmann::json("3/4"), "f:1"), "3/4");
  EXPECT_EQ(label_text(nlohmann::json(12), "f:1"), "12");
  EXPECT_EQ(label_text(nlohmann::json(-7), "f:1"), "-7");
  EXPECT_TRUE(answers_match(label_text(nlohmann::json(0.25), "f:1"), "1/4"));
  try {
    label_text(nlohmann::json::array({1}), "data.jsonl:3: key 'label'");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "data.jsonl:3: key 'label': expected a string or a number, found array");
  }
}

TEST(Rational, ParsesDecimalsAndComparesExactly) {
  auto r = [](const char* s) { return Rational::from_decimal(s); };
  for (const char* bad : {"", "-", ".", "1.2.3", "1a", "--1", " 1"}) EXPECT_FALSE(r(bad)) << bad;
  EXPECT_EQ(*r("7."), *r("7"));
  EXPECT_EQ(*r("-0.0"), *r("0"));
  EXPECT_FALSE(*r("0.1") == *r("0.10000000000000000000000000001"));
  // (10^20 + 1)(10^20 - 1) / (10^40 - 1) == 1: products across limbs carry correctly.
  auto a = *r("100000000000000000001"), b = *r("99999999999999999999");
  auto big = *r(("9999999999999999999999999999999999999999"));
  auto q = Rational::divide(*Rational::divide(a, big), *Rational::divide(*r("1"), b));
  ASSERT_TRUE(q);
  EXPECT_EQ(*q, *r("1"));
  EXPECT_FALSE(Rational::divide(*r("1"), *r("0.000")));
}

}  // namespace
}  // namespace lockstep::rl
