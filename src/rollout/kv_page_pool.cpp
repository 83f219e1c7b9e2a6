#include "rollout/kv_page_pool.h"

#include "core/error.h"
#include "core/philox.h"

namespace lockstep::rollout {

size_t KvPagePool::KeyHash::operator()(const Key& k) const {
  uint64_t h = mix_seed(k.parent, k.tokens.size());
  for (int32_t t : k.tokens) h = mix_seed(h, uint64_t(uint32_t(t)));
  return size_t(h);
}

KvPagePool::KvPagePool(int64_t num_pages, int64_t page_size) : page_size_(page_size), pages_(num_pages) {
  LS_CHECK(num_pages > 0, "KV pool: the number of pages must be positive, got ", num_pages);
  LS_CHECK(page_size > 0, "KV pool: the page size must be positive, got ", page_size);
  // Hand out low page ids first (pop from the back).
  for (int64_t p = num_pages - 1; p >= 0; --p) free_.push_back(int32_t(p));
}

std::optional<int32_t> KvPagePool::allocate() {
  int32_t page;
  if (!free_.empty()) {
    page = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    page = lru_.front();
    lru_.pop_front();
    drop_entry(page);
  } else {
    return std::nullopt;
  }
  pages_[page].refs = 1;
  return page;
}

void KvPagePool::retain(int32_t page) {
  Page& p = pages_[page];
  if (p.refs == 0) {
    LS_CHECK(p.cached, "KV pool: retain of free page ", page);
    lru_.erase(p.lru);
  }
  ++p.refs;
}

void KvPagePool::release(int32_t page) {
  Page& p = pages_[page];
  LS_CHECK(p.refs > 0, "KV pool: release of unreferenced page ", page);
  if (--p.refs > 0) return;
  if (p.cached) {
    p.lru = lru_.insert(lru_.end(), page);
  } else {
    free_.push_back(page);
  }
}

std::optional<KvPagePool::Hit> KvPagePool::lookup_and_retain(uint64_t parent, std::span<const int32_t> tokens) {
  auto it = index_.find(Key{parent, std::vector<int32_t>(tokens.begin(), tokens.end())});
  if (it == index_.end()) return std::nullopt;
  retain(it->second.page);
  return Hit{it->second.page, it->second.content};
}

uint64_t KvPagePool::publish(int32_t page, uint64_t parent, std::span<const int32_t> tokens) {
  LS_CHECK(int64_t(tokens.size()) == page_size_, "KV pool: only full pages can be cached");
  LS_CHECK(pages_[page].refs > 0 && !pages_[page].cached, "KV pool: publish of page ", page,
           " that is free or already cached");
  Key key{parent, std::vector<int32_t>(tokens.begin(), tokens.end())};
  auto it = index_.find(key);
  if (it != index_.end()) return it->second.content;
  uint64_t content = next_content_++;
  index_.emplace(key, Entry{page, content});
  pages_[page].cached = true;
  pages_[page].key = std::move(key);
  return content;
}

void KvPagePool::drop_entry(int32_t page) {
  Page& p = pages_[page];
  if (!p.cached) return;
  index_.erase(p.key);
  p.cached = false;
  p.key = Key{};
}

void KvPagePool::flush() {
  for (int32_t page : lru_) {
    drop_entry(page);
    free_.push_back(page);
  }
  lru_.clear();
  for (int64_t page = 0; page < num_pages(); ++page) drop_entry(int32_t(page));
}

}  // namespace lockstep::rollout
