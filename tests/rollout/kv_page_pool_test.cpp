// The block allocator and prefix cache: references, LRU eviction, exact keys, flush; and a
// randomized run against a plain model of which pages are in use.
#include <gtest/gtest.h>

#include <random>
#include <set>

#include "core/error.h"
#include "rollout/kv_page_pool.h"

namespace lockstep::rollout {
namespace {

std::vector<int32_t> page_tokens(int32_t first, int64_t n) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = first + int32_t(i);
  return t;
}

TEST(KvPagePool, AllocatesEveryPageOnceThenRunsOut) {
  KvPagePool pool(4, 2);
  std::set<int32_t> got;
  for (int i = 0; i < 4; ++i) got.insert(*pool.allocate());
  EXPECT_EQ(got.size(), 4u);
  EXPECT_FALSE(pool.allocate().has_value());
  pool.release(2);
  EXPECT_EQ(*pool.allocate(), 2);
  EXPECT_THROW(KvPagePool(0, 16), Error);
}

TEST(KvPagePool, CachedPagesAreFoundByParentAndTokensAndEvictedLeastRecentFirst) {
  KvPagePool pool(3, 2);
  int32_t a = *pool.allocate(), b = *pool.allocate();
  uint64_t ca = pool.publish(a, 0, page_tokens(10, 2));
  uint64_t cb = pool.publish(b, ca, page_tokens(20, 2));
  EXPECT_NE(ca, cb);
  // Same tokens under another parent, or other tokens: misses.
  EXPECT_FALSE(pool.lookup_and_retain(cb, page_tokens(20, 2)).has_value());
  EXPECT_FALSE(pool.lookup_and_retain(ca, page_tokens(21, 2)).has_value());
  pool.release(b);
  pool.release(a);  // LRU order: b, then a
  EXPECT_EQ(pool.available(), 3);
  auto hit = pool.lookup_and_retain(ca, page_tokens(20, 2));
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->page, b);
  EXPECT_EQ(hit->content, cb);
  pool.release(b);  // LRU order: a, b
  int32_t c = *pool.allocate();  // the free page first
  int32_t d = *pool.allocate();  // then evicts a
  EXPECT_NE(c, a);
  EXPECT_EQ(d, a);
  EXPECT_FALSE(pool.lookup_and_retain(0, page_tokens(10, 2)).has_value());
  // b's parent content is gone; b is still cached under its own key until evicted or flushed.
  EXPECT_EQ(pool.cached_pages(), 1);
  pool.flush();
  EXPECT_EQ(pool.cached_pages(), 0);
  EXPECT_FALSE(pool.lookup_and_retain(ca, page_tokens(20, 2)).has_value());
  EXPECT_EQ(pool.available(), 1);  // b became free; c and d are referenced
}

TEST(KvPagePool, DuplicateContentKeepsTheFirstEntry) {
  KvPagePool pool(2, 2);
  int32_t a = *pool.allocate(), b = *pool.allocate();
  uint64_t ca = pool.publish(a, 0, page_tokens(1, 2));
  EXPECT_EQ(pool.publish(b, 0, page_tokens(1, 2)), ca);
  pool.release(b);  // private: straight back to the free list
  EXPECT_EQ(*pool.allocate(), b);
  EXPECT_EQ(pool.cached_pages(), 1);
}

TEST(KvPagePool, RandomizedAgainstAPlainModel) {
  std::mt19937_64 rng(42);
  KvPagePool pool(16, 4);
  std::map<int32_t, int64_t> refs;  // page -> references held by the test
  std::map<int32_t, uint64_t> content;
  uint64_t key = 1;
  for (int iter = 0; iter < 5000; ++iter) {
    int op = int(rng() % 4);
    if (op == 0) {
      auto p = pool.allocate();
      int64_t in_use = 0;
      for (auto& [page, n] : refs) in_use += n > 0;
      ASSERT_EQ(p.has_value(), in_use < 16);
      if (p) {
        ASSERT_EQ(refs[*p], 0) << "allocated a page still in use";
        refs[*p] = 1;
        content.erase(*p);
      }
    } else if (op == 1 && !refs.empty()) {
      auto it = refs.begin();
      std::advance(it, rng() % refs.size());
      if (it->second > 0) {
        pool.release(it->first);
        --it->second;
      }
    } else if (op == 2 && !refs.empty()) {
      auto it = refs.begin();
      std::advance(it, rng() % refs.size());
      if (it->second > 0 && !content.count(it->first)) {
        uint64_t parent = rng() % 3;
        auto toks = page_tokens(int32_t(key++), 4);
        pool.publish(it->first, parent, toks);
        content[it->first] = parent;
        // Found again with the same key.
        auto hit = pool.lookup_and_retain(parent, toks);
        ASSERT_TRUE(hit.has_value());
        ASSERT_EQ(hit->page, it->first);
        ++it->second;
      }
    } else if (op == 3 && iter % 500 == 0) {
      pool.flush();
      content.clear();
    }
    for (auto& [page, n] : refs) ASSERT_EQ(pool.ref_count(page), n);
  }
}

}  // namespace
}  // namespace lockstep::rollout
