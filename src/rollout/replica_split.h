// Running a batch of requests on independent data-parallel engine replicas
// (parallel/parallel_runner.h): replica r runs the requests i with i % replicas == r, and
// every rank gets every request's outcome. A request's tokens and log-probs do not depend on
// what runs beside it (docs/numerics.md, D1, D5: sampling is keyed by its own seed), so the outcomes
// are the bits of one engine running them all.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "rollout/engine.h"

namespace lockstep::rollout {

struct RequestOutcome {
  RequestResult result;
  std::string error;  // non-empty: add_request refused the request with this message
};

// Every replica's blob (identical on the ranks of one replica) on every rank, in replica
// order; collective over the ranks (ParallelRunner::gather_from_replicas).
using ReplicaGather = std::function<std::vector<std::string>(const std::string&)>;

// Runs this replica's share of `requests` (nullopt entries are skipped: no outcome) to
// completion on `engine` and gathers every outcome; with replicas == 1 runs them all here
// and `gather` is not called. Collective when replicas > 1.
std::vector<RequestOutcome> run_on_replicas(Engine& engine, const std::vector<std::optional<GenerationRequest>>& requests,
                                            int replicas, int replica, const ReplicaGather& gather);

// The wire form of (request index, outcome) pairs; decode checks every length.
std::string encode_outcomes(const std::vector<std::pair<uint64_t, RequestOutcome>>& outcomes);
std::vector<std::pair<uint64_t, RequestOutcome>> decode_outcomes(const std::string& bytes);

}  // namespace lockstep::rollout
