#include "rl/tasks.h"

#include <algorithm>

#include "core/error.h"
#include "core/philox.h"

namespace lockstep::rl {

namespace vocab {

std::string token_text(int32_t id) {
  if (id >= kDigit0 && id < kDigit0 + 10) return std::string(1, char('0' + id - kDigit0));
  switch (id) {
    case kPad: return "<pad>";
    case kBos: return "<bos>";
    case kEos: return "<eos>";
    case kSep: return "=";
    case kPlus: return "+";
    case kTaskReverse: return "<reverse>";
    case kTaskSort: return "<sort>";
    case kTaskAdd: return "<add>";
  }
  return "<" + std::to_string(id) + ">";
}

std::string text(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += token_text(id);
  return s;
}

}  // namespace vocab

namespace {

int32_t digit_token(int64_t d) { return int32_t(vocab::kDigit0 + d); }

// Uniform digit number `lane` of example `index`.
int64_t draw_digit(uint64_t seed, uint64_t index, uint64_t lane) {
  return std::min<int64_t>(9, int64_t(philox_uniform(seed, index, lane) * 10.0f));
}

class DigitListTask : public Task {
 public:
  DigitListTask(bool sort, int64_t digits) : sort_(sort), digits_(digits) {}
  std::string name() const override { return sort_ ? "sort" : "reverse"; }
  TaskExample example(uint64_t seed, uint64_t index) const override {
    TaskExample ex;
    ex.prompt = {vocab::kBos, sort_ ? vocab::kTaskSort : vocab::kTaskReverse};
    std::vector<int32_t> digits;
    for (int64_t i = 0; i < digits_; ++i) digits.push_back(digit_token(draw_digit(seed, index, uint64_t(i))));
    ex.prompt.insert(ex.prompt.end(), digits.begin(), digits.end());
    ex.prompt.push_back(vocab::kSep);
    if (sort_)
      std::sort(digits.begin(), digits.end());
    else
      std::reverse(digits.begin(), digits.end());
    ex.answer = digits;
    ex.answer.push_back(vocab::kEos);
    return ex;
  }
  int64_t max_answer_len() const override { return digits_ + 1; }

 private:
  bool sort_;
  int64_t digits_;
};

class AddTask : public Task {
 public:
  explicit AddTask(int64_t digits) : digits_(digits) {}
  std::string name() const override { return "add"; }
  TaskExample example(uint64_t seed, uint64_t index) const override {
    TaskExample ex;
    ex.prompt = {vocab::kBos, vocab::kTaskAdd};
    int64_t a = 0, b = 0;
    for (int64_t i = 0; i < digits_; ++i) {
      int64_t da = draw_digit(seed, index, uint64_t(i)), db = draw_digit(seed, index, uint64_t(digits_ + i));
      a = a * 10 + da;
      b = b * 10 + db;
    }
    auto push_number = [](std::vector<int32_t>& out, int64_t v, int64_t width) {
      std::string s = std::to_string(v);
      if (width > 0) s = std::string(size_t(std::max<int64_t>(0, width - int64_t(s.size()))), '0') + s;
      for (char ch : s) out.push_back(digit_token(ch - '0'));
    };
    push_number(ex.prompt, a, digits_);
    ex.prompt.push_back(vocab::kPlus);
    push_number(ex.prompt, b, digits_);
    ex.prompt.push_back(vocab::kSep);
    push_number(ex.answer, a + b, 0);
    ex.answer.push_back(vocab::kEos);
    return ex;
  }
  int64_t max_answer_len() const override { return digits_ + 2; }

 private:
  int64_t digits_;
};

}  // namespace

std::unique_ptr<Task> make_task(const std::string& name, int64_t digits) {
  LS_CHECK(digits >= 1 && digits <= 16, "--task-digits: expected 1..16, got ", digits);
  if (name == "reverse") return std::make_unique<DigitListTask>(false, digits);
  if (name == "sort") return std::make_unique<DigitListTask>(true, digits);
  if (name == "add") return std::make_unique<AddTask>(digits);
  fail("--task: expected 'reverse', 'sort' or 'add', got '", name, "'");
}

}  // namespace lockstep::rl
