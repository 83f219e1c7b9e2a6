#include "tokenizer/bpe.h"

#include <bit>
#include <limits>
#include <queue>

namespace lockstep::bpe {

void MergeTable::reserve(size_t count) {
  const size_t capacity = std::bit_ceil(count * 2 + 16);
  slots_.assign(capacity, Slot{kEmpty, {0, 0}});
  mask_ = capacity - 1;
  size_ = 0;
}

bool MergeTable::insert(int32_t left, int32_t right, Merge merge) {
  if (size_ * 2 + 2 > slots_.size()) {
    // Grow: rehash into a table twice the size.
    std::vector<Slot> old = std::move(slots_);
    reserve(old.size());
    for (const Slot& s : old)
      if (s.key != kEmpty) insert(static_cast<int32_t>(s.key >> 32), static_cast<int32_t>(s.key), s.merge);
  }
  const uint64_t key = pack(left, right);
  for (size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
    Slot& s = slots_[i];
    if (s.key == key) return false;
    if (s.key == kEmpty) {
      s = Slot{key, merge};
      ++size_;
      return true;
    }
  }
}

namespace {
// Words up to this many bytes use the quadratic scan; longer ones the heap.
constexpr size_t kScanLimit = 48;
}  // namespace

void Model::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  std::vector<int32_t> ids;
  ids.reserve(word.size());
  for (char c : word) ids.push_back(byte_id[static_cast<uint8_t>(c)]);
  if (ids.size() <= kScanLimit) {
    merge_by_scan(ids);
  } else {
    merge_by_heap(ids);
  }
  out.insert(out.end(), ids.begin(), ids.end());
}

void Model::merge_by_scan(std::vector<int32_t>& ids) const {
  while (ids.size() > 1) {
    int32_t best_rank = std::numeric_limits<int32_t>::max();
    int32_t best_merged = -1;
    size_t best_pos = 0;
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      const MergeTable::Merge* m = merges.find(ids[i], ids[i + 1]);
      if (m && m->rank < best_rank) {
        best_rank = m->rank;
        best_merged = m->merged;
        best_pos = i;
      }
    }
    if (best_merged < 0) break;
    ids[best_pos] = best_merged;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_pos) + 1);
  }
}

void Model::merge_by_heap(std::vector<int32_t>& ids) const {
  const size_t n = ids.size();
  if (n < 2) return;
  // Symbols form a linked list over the original positions; a merged-away symbol gets
  // id -1. Positions never move, so ordering by position is ordering left to right.
  std::vector<int32_t> prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  struct Candidate {
    int32_t rank;
    int32_t pos;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto consider = [&](int32_t pos) {
    if (pos < 0 || next[pos] < 0) return;
    if (const MergeTable::Merge* m = merges.find(ids[pos], ids[next[pos]])) heap.push({m->rank, pos});
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(static_cast<int32_t>(i));
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    // Stale entries: the symbol was merged away, or its right neighbour changed. A
    // pair's rank identifies the pair, so an equal rank means the entry is current.
    if (ids[c.pos] < 0 || next[c.pos] < 0) continue;
    const MergeTable::Merge* m = merges.find(ids[c.pos], ids[next[c.pos]]);
    if (!m || m->rank != c.rank) continue;
    const int32_t right = next[c.pos];
    ids[c.pos] = m->merged;
    ids[right] = -1;
    next[c.pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = c.pos;
    consider(prev[c.pos]);
    consider(c.pos);
  }
  size_t out = 0;
  for (size_t i = 0; i < n; ++i)
    if (ids[i] >= 0) ids[out++] = ids[i];
  ids.resize(out);
}

}  // namespace lockstep::bpe
