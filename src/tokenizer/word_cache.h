// Thread-safe cache from a pre-token's bytes to its ids. Most pre-tokens repeat, so
// this skips the merge loop for the bulk of real text. Sharded to limit contention;
// a shard that fills up is simply cleared (cheap, and keeps memory bounded).
#pragma once
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace lockstep {

class WordCache {
 public:
  static constexpr size_t kMaxWordBytes = 128;  // longer words are not cached

  // Appends the cached ids of `word` to `out` and returns true on a hit.
  bool lookup(std::string_view word, std::vector<int32_t>& out) const {
    Shard& s = shard(word);
    std::lock_guard lock(s.mutex);
    auto it = s.map.find(word);
    if (it == s.map.end()) return false;
    out.insert(out.end(), it->second.begin(), it->second.end());
    return true;
  }
  void store(std::string_view word, const int32_t* ids, size_t count) const {
    if (word.size() > kMaxWordBytes) return;
    Shard& s = shard(word);
    std::lock_guard lock(s.mutex);
    if (s.map.size() >= kShardCapacity) s.map.clear();
    s.map.emplace(std::string(word), std::vector<int32_t>(ids, ids + count));
  }

 private:
  static constexpr size_t kShards = 16;
  static constexpr size_t kShardCapacity = 16384;
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  struct Shard {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>, Hash, std::equal_to<>> map;
  };
  Shard& shard(std::string_view word) const { return shards_[std::hash<std::string_view>{}(word) % kShards]; }
  mutable Shard shards_[kShards];
};

}  // namespace lockstep
