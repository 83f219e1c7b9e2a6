// The engine's view of the runner's KV page pool: a ref-counted block allocator with a
// prefix cache. The runner holds the page contents; this class only decides which pages a
// sequence uses (docs/numerics.md, rule 3: attention reads any page table the same way).
//
// Prefix cache: a full page is identified by its content, (parent content id, the page's
// token ids), where the parent is the page before it in the sequence (0 at the start). Its
// K/V then depend only on the whole token prefix and the weights, so any sequence with the
// same prefix may read it and get the same bits. Content ids are never reused, so a stale
// child of an evicted parent can never be found again. Keys are compared in full (no
// reliance on a hash being collision free). Unreferenced cached pages stay in an LRU list and
// are evicted only when a free page is needed; flush() forgets every entry (weight update).
#pragma once
#include <cstdint>
#include <list>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace lockstep::rollout {

class KvPagePool {
 public:
  KvPagePool(int64_t num_pages, int64_t page_size);

  int64_t num_pages() const { return int64_t(pages_.size()); }
  int64_t page_size() const { return page_size_; }
  // Pages that allocate() can hand out now: free ones plus unreferenced cached ones.
  int64_t available() const { return int64_t(free_.size() + lru_.size()); }
  int64_t cached_pages() const { return int64_t(index_.size()); }
  int64_t ref_count(int32_t page) const { return pages_[page].refs; }

  // A page with one reference, or nothing when every page is referenced. Takes a free page
  // first, else evicts the least recently used unreferenced cached page.
  std::optional<int32_t> allocate();
  void retain(int32_t page);
  // Drops one reference; an unreferenced page stays cached (LRU) if it holds a cache entry.
  void release(int32_t page);

  // The cached page holding `tokens` after content `parent`, retained for the caller, and
  // its content id; nothing on a miss.
  struct Hit {
    int32_t page;
    uint64_t content;
  };
  std::optional<Hit> lookup_and_retain(uint64_t parent, std::span<const int32_t> tokens);
  // Records that `page` (referenced, full) holds `tokens` after content `parent`; returns its
  // content id. When that content is already cached elsewhere, returns the existing id and
  // the page stays private.
  uint64_t publish(int32_t page, uint64_t parent, std::span<const int32_t> tokens);
  // Forgets every cache entry; unreferenced cached pages become free.
  void flush();

 private:
  struct Key {
    uint64_t parent;
    std::vector<int32_t> tokens;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const;
  };
  struct Page {
    int64_t refs = 0;
    bool cached = false;               // holds the entry `key` in index_
    Key key;
    std::list<int32_t>::iterator lru;  // valid when cached and refs == 0
  };
  struct Entry {
    int32_t page;
    uint64_t content;
  };
  void drop_entry(int32_t page);

  int64_t page_size_;
  std::vector<Page> pages_;
  std::vector<int32_t> free_;
  std::list<int32_t> lru_;  // unreferenced cached pages, least recently used first
  std::unordered_map<Key, Entry, KeyHash> index_;
  uint64_t next_content_ = 1;
};

}  // namespace lockstep::rollout
