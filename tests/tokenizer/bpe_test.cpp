// The two merge strategies (scan for short words, heap for long ones) must agree.
#include <gtest/gtest.h>

#include <random>

#include "tokenizer/bpe.h"
#include "tokenizer/utf8.h"

namespace lockstep {
namespace {

TEST(Bpe, ScanAndHeapAgreeOnRandomModels) {
  std::mt19937 rng(3);
  for (int model_no = 0; model_no < 20; ++model_no) {
    bpe::Model model;
    for (int b = 0; b < 256; ++b) model.byte_id[b] = b;
    // Random merges over a small alphabet so that long words merge a lot.
    const int alphabet = 4;
    int32_t next_id = 256;
    std::vector<int32_t> known = {'a', 'b', 'c', 'd'};
    model.merges.reserve(64);
    for (int rank = 0; rank < 60; ++rank) {
      const int32_t l = known[rng() % known.size()], r = known[rng() % known.size()];
      if (model.merges.insert(l, r, {rank, next_id})) known.push_back(next_id++);
    }
    for (int word_no = 0; word_no < 50; ++word_no) {
      std::vector<int32_t> word(1 + rng() % 120);
      for (auto& id : word) id = 'a' + static_cast<int32_t>(rng() % alphabet);
      auto by_scan = word, by_heap = word;
      model.merge_by_scan(by_scan);
      model.merge_by_heap(by_heap);
      ASSERT_EQ(by_scan, by_heap);
    }
  }
}

TEST(Utf8, RepairFollowsMaximalSubparts) {
  EXPECT_EQ(utf8::repair("a\xf0\x9f\x98" "b"), "a\ufffd" "b");
  EXPECT_EQ(utf8::repair("\xed\xa0\x80"), "\ufffd\ufffd\ufffd");  // surrogate: three subparts
  EXPECT_EQ(utf8::repair("\xf4\x90"), "\ufffd\ufffd");
  EXPECT_EQ(utf8::emittable_prefix("ab\xe4\xb8"), 2u);
  EXPECT_EQ(utf8::emittable_prefix("ab\xff"), 3u);
}

}  // namespace
}  // namespace lockstep
