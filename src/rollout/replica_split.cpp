#include "rollout/replica_split.h"

#include <cstring>

#include "core/error.h"

namespace lockstep::rollout {

namespace {

template <typename T>
void put(std::string& out, const T& v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
template <typename T>
void put_vector(std::string& out, const std::vector<T>& v) {
  put(out, uint64_t(v.size()));
  out.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

class Reader {
 public:
  explicit Reader(const std::string& bytes) : bytes_(bytes) {}
  bool done() const { return at_ == bytes_.size(); }
  template <typename T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, bytes_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  template <typename T>
  std::vector<T> get_vector() {
    const uint64_t n = get<uint64_t>();
    LS_CHECK(n <= (bytes_.size() - at_) / sizeof(T), "replica outcomes: a list of ", n, " values at byte ", at_,
             " runs past the end (", bytes_.size(), " bytes)");
    std::vector<T> v(n);
    if (n) std::memcpy(v.data(), bytes_.data() + at_, n * sizeof(T));
    at_ += n * sizeof(T);
    return v;
  }

 private:
  void need(size_t n) const {
    LS_CHECK(bytes_.size() - at_ >= n, "replica outcomes: truncated at byte ", at_, " of ", bytes_.size());
  }
  const std::string& bytes_;
  size_t at_ = 0;
};

}  // namespace

std::string encode_outcomes(const std::vector<std::pair<uint64_t, RequestOutcome>>& outcomes) {
  std::string out;
  for (const auto& [index, o] : outcomes) {
    put(out, index);
    put_vector(out, std::vector<char>(o.error.begin(), o.error.end()));
    put_vector(out, o.result.output_ids);
    put_vector(out, o.result.logprobs);
    put_vector(out, o.result.weight_versions);
    put(out, int32_t(o.result.finish_reason));
  }
  return out;
}

std::vector<std::pair<uint64_t, RequestOutcome>> decode_outcomes(const std::string& bytes) {
  std::vector<std::pair<uint64_t, RequestOutcome>> out;
  Reader in(bytes);
  while (!in.done()) {
    std::pair<uint64_t, RequestOutcome> e;
    e.first = in.get<uint64_t>();
    const auto error = in.get_vector<char>();
    e.second.error.assign(error.begin(), error.end());
    e.second.result.output_ids = in.get_vector<int32_t>();
    e.second.result.logprobs = in.get_vector<float>();
    e.second.result.weight_versions = in.get_vector<int64_t>();
    const int32_t reason = in.get<int32_t>();
    LS_CHECK(reason >= int32_t(FinishReason::none) && reason <= int32_t(FinishReason::abort),
             "replica outcomes: finish reason ", reason, " of request ", e.first, " is not one of 0..3");
    e.second.result.finish_reason = FinishReason(reason);
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<RequestOutcome> run_on_replicas(Engine& engine, const std::vector<std::optional<GenerationRequest>>& requests,
                                            int replicas, int replica, const ReplicaGather& gather) {
  LS_CHECK(replicas >= 1 && replica >= 0 && replica < replicas, "run_on_replicas: replica ", replica, " of ",
           replicas);
  std::vector<std::pair<uint64_t, RequestOutcome>> mine;
  std::vector<std::pair<uint64_t, RequestId>> ids;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (!requests[i] || int(i % size_t(replicas)) != replica) continue;
    try {
      ids.push_back({i, engine.add_request(*requests[i])});
    } catch (const Error& e) {
      mine.push_back({i, RequestOutcome{{}, e.what()}});
    }
  }
  engine.run_to_completion();
  for (const auto& [i, id] : ids) mine.push_back({i, RequestOutcome{engine.take_result(id), {}}});
  std::vector<RequestOutcome> all(requests.size());
  std::vector<bool> seen(requests.size(), false);
  auto place = [&](std::vector<std::pair<uint64_t, RequestOutcome>>&& outcomes) {
    for (auto& [i, o] : outcomes) {
      LS_CHECK(i < requests.size() && requests[i] && !seen[i], "run_on_replicas: unexpected outcome for request ", i);
      seen[i] = true;
      all[i] = std::move(o);
    }
  };
  if (replicas == 1) {
    place(std::move(mine));
  } else {
    const std::vector<std::string> blobs = gather(encode_outcomes(mine));
    LS_CHECK(int(blobs.size()) == replicas, "run_on_replicas: ", blobs.size(), " replica blobs for ", replicas,
             " replicas");
    for (const auto& b : blobs) place(decode_outcomes(b));
  }
  for (size_t i = 0; i < requests.size(); ++i)
    LS_CHECK(!requests[i] || seen[i], "run_on_replicas: no replica returned request ", i);
  return all;
}

}  // namespace lockstep::rollout
