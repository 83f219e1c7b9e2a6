// Built-in tasks: prompts, answers and exact rewards.
#include <gtest/gtest.h>

#include <algorithm>

#include "core/error.h"
#include "rl/tasks.h"

namespace lockstep::rl {
namespace {

std::vector<int32_t> digits_of(const std::vector<int32_t>& ids, size_t begin, size_t end) {
  std::vector<int32_t> d;
  for (size_t i = begin; i < end; ++i) d.push_back(ids[i] - vocab::kDigit0);
  return d;
}

TEST(RlTasks, ReverseReversesTheDigits) {
  auto task = make_task("reverse", 5);
  for (uint64_t i = 0; i < 20; ++i) {
    TaskExample ex = task->example(9, i);
    ASSERT_EQ(ex.prompt.size(), 8u);
    EXPECT_EQ(ex.prompt[0], vocab::kBos);
    EXPECT_EQ(ex.prompt[1], vocab::kTaskReverse);
    EXPECT_EQ(ex.prompt.back(), vocab::kSep);
    ASSERT_EQ(ex.answer.size(), 6u);
    EXPECT_EQ(ex.answer.back(), vocab::kEos);
    for (int k = 0; k < 5; ++k) EXPECT_EQ(ex.answer[k], ex.prompt[2 + 4 - k]);
    EXPECT_EQ(task->reward(ex, ex.answer), 1.0f);
    std::vector<int32_t> wrong = ex.answer;
    wrong.pop_back();  // no <eos>
    EXPECT_EQ(task->reward(ex, wrong), 0.0f);
  }
}

TEST(RlTasks, SortSortsAndAddAdds) {
  auto sort = make_task("sort", 4);
  TaskExample s = sort->example(3, 7);
  auto in = digits_of(s.prompt, 2, 6), out = digits_of(s.answer, 0, 4);
  std::sort(in.begin(), in.end());
  EXPECT_EQ(in, out);
  auto add = make_task("add", 2);
  for (uint64_t i = 0; i < 30; ++i) {
    TaskExample ex = add->example(5, i);
    ASSERT_EQ(ex.prompt[4], vocab::kPlus);
    auto a = digits_of(ex.prompt, 2, 4), b = digits_of(ex.prompt, 5, 7);
    int sum = (a[0] * 10 + a[1]) + (b[0] * 10 + b[1]);
    std::string expected = std::to_string(sum) + "<eos>";
    EXPECT_EQ(vocab::text(ex.answer), expected);
  }
}

TEST(RlTasks, ExamplesAreAFunctionOfSeedAndIndex) {
  auto task = make_task("reverse", 3);
  EXPECT_EQ(task->example(1, 2).prompt, task->example(1, 2).prompt);
  int differ = 0;
  for (uint64_t i = 0; i < 10; ++i) differ += task->example(1, i).prompt != task->example(2, i).prompt;
  EXPECT_GT(differ, 5);
}

TEST(RlTasks, UnknownTaskIsAnError) {
  EXPECT_THROW(make_task("copy", 3), Error);
  EXPECT_THROW(make_task("reverse", 0), Error);
}

}  // namespace
}  // namespace lockstep::rl
