// The BPE merge step: turns the bytes of one pre-token into token ids by applying
// merges in rank order (lowest rank first, leftmost first among equal ranks).
#pragma once
#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

namespace lockstep::bpe {

// Open-addressing map from an ordered id pair to (rank, merged id). Built once at load
// time; lookups are one multiply and usually one probe.
class MergeTable {
 public:
  struct Merge {
    int32_t rank;
    int32_t merged;
  };
  void reserve(size_t count);
  // Returns false if the pair is already present (the first rank wins).
  bool insert(int32_t left, int32_t right, Merge merge);
  const Merge* find(int32_t left, int32_t right) const {
    if (slots_.empty()) return nullptr;
    const uint64_t key = pack(left, right);
    for (size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == key) return &s.merge;
      if (s.key == kEmpty) return nullptr;
    }
  }
  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t key;
    Merge merge;
  };
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  static uint64_t pack(int32_t l, int32_t r) {
    return (uint64_t{static_cast<uint32_t>(l)} << 32) | static_cast<uint32_t>(r);
  }
  static size_t hash(uint64_t key) { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ULL) >> 20); }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

struct Model {
  std::array<int32_t, 256> byte_id{};  // id of the single-byte token for each byte
  MergeTable merges;

  // Appends the ids for `word` (raw bytes of one pre-token) to `out`.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  // The two merge strategies, exposed so tests can check they agree: a quadratic scan
  // (fast for the short words that dominate) and a heap (for long runs).
  void merge_by_scan(std::vector<int32_t>& ids) const;
  void merge_by_heap(std::vector<int32_t>& ids) const;
};

}  // namespace lockstep::bpe
