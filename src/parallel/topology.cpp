#include "parallel/topology.h"

#include <algorithm>
#include <charconv>
#include <sstream>

#include "core/error.h"
#include "kernels/canonical.h"
#include "model/config.h"

namespace lockstep {
namespace {

bool divides_tmax(int x) { return is_power_of_two(x) && kTMax % x == 0; }

// Parses "<prefix><positive int>" exactly; nullopt when the token has another shape.
std::optional<int> parse_field(const std::string& tok, const std::string& prefix) {
  if (tok.size() <= prefix.size() || tok.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  int v = 0;
  const char* b = tok.data() + prefix.size();
  const char* e = tok.data() + tok.size();
  auto [p, ec] = std::from_chars(b, e, v);
  if (ec != std::errc() || p != e || v < 1) return std::nullopt;
  return v;
}

}  // namespace

const char* group_kind_name(GroupKind kind) {
  switch (kind) {
    case GroupKind::TP: return "tp";
    case GroupKind::PP: return "pp";
    case GroupKind::DP: return "dp";
    case GroupKind::EP: return "ep";
    case GroupKind::ETP: return "etp";
    case GroupKind::EDP: return "edp";
    case GroupKind::MP: return "mp";
  }
  return "?";
}

std::string Topology::name() const {
  std::ostringstream os;
  os << "tp" << tp << (sp ? "_sp" : "") << "_pp" << pp << "_ep" << ep << "_etp" << etp << "_dp" << dp;
  return os.str();
}

Topology Topology::parse(const std::string& text) {
  std::vector<std::string> toks;
  std::stringstream ss(text);
  for (std::string t; std::getline(ss, t, '_');) toks.push_back(t);
  Topology topo;
  size_t i = 0;
  auto next = [&](const char* prefix, int& out) {
    std::optional<int> v = i < toks.size() ? parse_field(toks[i], prefix) : std::nullopt;
    if (!v)
      fail("topology name '", text, "': expected '", prefix, "<n>' at part ", i + 1,
           " (form: tp<n>[_sp]_pp<n>_ep<n>_etp<n>_dp<n>, e.g. tp2_sp_pp2_ep2_etp1_dp1)");
    out = *v;
    ++i;
  };
  next("tp", topo.tp);
  if (i < toks.size() && toks[i] == "sp") {
    topo.sp = true;
    ++i;
  }
  next("pp", topo.pp);
  next("ep", topo.ep);
  next("etp", topo.etp);
  next("dp", topo.dp);
  LS_CHECK(i == toks.size(), "topology name '", text, "': unexpected trailing part '",
           i < toks.size() ? toks[i] : "", "'");
  return topo;
}

Topology Topology::from_world(int world_size, int tp, bool sp, int pp, int ep, int etp, std::string_view flag_prefix) {
  const auto flag = [&](const char* key) { return "--" + std::string(flag_prefix) + key; };
  LS_CHECK(world_size >= 1 && tp >= 1 && pp >= 1, "topology: sizes must be >= 1 (world ",
           world_size, ", tp ", tp, ", pp ", pp, ")");
  LS_CHECK(world_size % (tp * pp) == 0, "topology: world size ", world_size,
           " is not divisible by tp*pp = ", tp * pp, " (tp=", tp, ", pp=", pp,
           "): launch a multiple of ", tp * pp, " ranks or change ", flag("tensor-model-parallel-size"), " / ",
           flag("pipeline-model-parallel-size"));
  Topology t;
  t.tp = tp;
  t.sp = sp;
  t.pp = pp;
  t.ep = ep;
  t.etp = etp;
  t.dp = world_size / (tp * pp);
  return t;
}

void Topology::validate_sizes(int world_size, std::string_view flag_prefix) const {
  const std::string n = name();
  const auto flag = [&](const char* key) { return "--" + std::string(flag_prefix) + key; };
  LS_CHECK(tp >= 1 && pp >= 1 && ep >= 1 && etp >= 1 && dp >= 1, "topology ", n,
           ": every size must be >= 1");
  LS_CHECK(divides_tmax(tp), "topology ", n, ": tp=", tp,
           " is not supported: canonical reductions split only at the 8 chunk boundaries, so ",
           flag("tensor-model-parallel-size"), " must be 1, 2, 4 or 8");
  LS_CHECK(divides_tmax(etp), "topology ", n, ": etp=", etp,
           " is not supported: expert down_proj reductions split only at the 8 chunk "
           "boundaries, so ", flag("expert-tensor-parallel-size"), " must be 1, 2, 4 or 8");
  LS_CHECK(!sp || tp > 1, "topology ", n,
           ": sequence parallel needs tp > 1: drop ", flag("sequence-parallel"), " or raise ",
           flag("tensor-model-parallel-size"));
  LS_CHECK(world_size % (tp * pp) == 0, "topology ", n, ": world size ", world_size,
           " is not divisible by tp*pp = ", tp * pp, ": launch a multiple of ", tp * pp,
           " ranks or change ", flag("tensor-model-parallel-size"), " / ", flag("pipeline-model-parallel-size"));
  LS_CHECK(tp * pp * dp == world_size, "topology ", n, ": tp*pp*dp = ", tp * pp * dp,
           " but the world has ", world_size, " ranks (dp should be ", world_size / (tp * pp), ")");
  LS_CHECK((tp * dp) % (ep * etp) == 0, "topology ", n, ": ep*etp = ", ep * etp,
           " must divide tp*dp = ", tp * dp,
           " (expert ranks fold into the tp x dp ranks of each pipeline stage): choose ",
           flag("expert-model-parallel-size"), " x ", flag("expert-tensor-parallel-size"), " dividing ", tp * dp,
           ", or launch more data-parallel ranks");
}

void Topology::validate(const ModelConfig& cfg, int world_size, std::string_view flag_prefix) const {
  validate_sizes(world_size, flag_prefix);
  const std::string n = name();
  const auto flag = [&](const char* key) { return "--" + std::string(flag_prefix) + key; };
  if (cfg.num_experts == 0) {
    LS_CHECK(ep == 1 && etp == 1, "topology ", n,
             ": the model has no experts; use ", flag("expert-model-parallel-size"), " 1 ",
             flag("expert-tensor-parallel-size"), " 1");
  } else {
    LS_CHECK(cfg.num_experts % ep == 0, "topology ", n, ": ep=", ep, " does not divide num_experts=",
             cfg.num_experts, ": choose ", flag("expert-model-parallel-size"), " dividing ", cfg.num_experts);
  }
  LS_CHECK(cfg.num_attention_heads % tp == 0, "topology ", n, ": tp=", tp,
           " does not divide num_attention_heads=", cfg.num_attention_heads,
           ": choose ", flag("tensor-model-parallel-size"), " dividing ", cfg.num_attention_heads);
  const int64_t kv = cfg.num_key_value_heads;
  if (tp <= kv) {
    LS_CHECK(kv % tp == 0, "topology ", n, ": tp=", tp, " does not divide num_key_value_heads=", kv,
             ": choose ", flag("tensor-model-parallel-size"), " dividing ", kv, " or a multiple of it");
  } else {
    LS_CHECK(tp % kv == 0, "topology ", n, ": tp=", tp, " > num_key_value_heads=", kv,
             " needs tp to be a multiple of ", kv,
             " (each KV head is replicated on tp/kv ranks): choose another ",
             flag("tensor-model-parallel-size"));
  }
  LS_CHECK(pp <= cfg.num_hidden_layers, "topology ", n, ": pp=", pp, " exceeds num_hidden_layers=",
           cfg.num_hidden_layers, ": every pipeline stage needs at least one layer");
  // o_proj reduces over q_dim = heads * head_dim, split by heads; each rank's heads must be
  // a whole number of canonical chunks or its partial would not be a subtree of tree8.
  // (hidden, intermediate, moe_intermediate and vocab are split by padded chunks, which
  // always aligns.)
  if (tp > 1) {
    const int64_t q = cfg.q_dim();
    const int64_t per_rank_chunks = canonical_chunk(q) * (kTMax / tp);
    LS_CHECK(per_rank_chunks == q / tp, "topology ", n, ": tp=", tp, " splits o_proj's ", q,
             " input columns (", cfg.num_attention_heads, " heads x ", cfg.head_dim,
             ") into ", q / tp, " per rank, which is not a whole number of canonical chunks (",
             kTMax / tp, " chunks of ", canonical_chunk(q), " = ", per_rank_chunks,
             "): q_dim must be a multiple of 8 for tp > 1; use ", flag("tensor-model-parallel-size"), " 1");
  }
}

RankCoords Topology::coords(int rank) const {
  LS_CHECK(rank >= 0 && rank < world_size(), "topology ", name(), ": rank ", rank,
           " out of range [0, ", world_size(), ")");
  RankCoords c;
  c.tp = rank % tp;
  c.dp = (rank / tp) % dp;
  c.pp = rank / (tp * dp);
  const int i = rank % (tp * dp);
  c.etp = i % etp;
  c.ep = (i / etp) % ep;
  c.edp = i / (etp * ep);
  return c;
}

int Topology::rank_of(int tp_rank, int dp_rank, int pp_rank) const {
  return tp_rank + tp * (dp_rank + dp * pp_rank);
}

std::vector<int> Topology::group_ranks(GroupKind kind, int rank) const {
  LS_CHECK((tp * dp) % (ep * etp) == 0, "topology ", name(), ": ep*etp must divide tp*dp");
  const RankCoords c = coords(rank);
  const int stage = c.pp * tp * dp;
  auto expert_rank = [&](int etp_r, int ep_r, int edp_r) { return stage + etp_r + etp * (ep_r + ep * edp_r); };
  std::vector<int> g;
  switch (kind) {
    case GroupKind::TP:
      for (int t = 0; t < tp; ++t) g.push_back(rank_of(t, c.dp, c.pp));
      break;
    case GroupKind::DP:
      for (int d = 0; d < dp; ++d) g.push_back(rank_of(c.tp, d, c.pp));
      break;
    case GroupKind::PP:
      for (int p = 0; p < pp; ++p) g.push_back(rank_of(c.tp, c.dp, p));
      break;
    case GroupKind::MP:
      for (int p = 0; p < pp; ++p)
        for (int t = 0; t < tp; ++t) g.push_back(rank_of(t, c.dp, p));
      break;
    case GroupKind::EP:
      for (int e = 0; e < ep; ++e) g.push_back(expert_rank(c.etp, e, c.edp));
      break;
    case GroupKind::ETP:
      for (int e = 0; e < etp; ++e) g.push_back(expert_rank(e, c.ep, c.edp));
      break;
    case GroupKind::EDP:
      for (int e = 0; e < edp(); ++e) g.push_back(expert_rank(c.etp, c.ep, e));
      break;
  }
  return g;
}

std::vector<std::vector<int>> Topology::all_groups(GroupKind kind) const {
  std::vector<std::vector<int>> groups;
  std::vector<bool> seen(world_size(), false);
  for (int r = 0; r < world_size(); ++r) {
    if (seen[r]) continue;
    groups.push_back(group_ranks(kind, r));
    for (int q : groups.back()) seen[q] = true;
  }
  return groups;
}

std::pair<int, int> Topology::group_color_key(GroupKind kind, int rank) const {
  const auto groups = all_groups(kind);
  for (size_t c = 0; c < groups.size(); ++c) {
    auto it = std::find(groups[c].begin(), groups[c].end(), rank);
    if (it != groups[c].end()) return {static_cast<int>(c), static_cast<int>(it - groups[c].begin())};
  }
  fail("topology ", name(), ": rank ", rank, " is in no ", group_kind_name(kind), " group");
}

std::unique_ptr<dist::Communicator> make_group(dist::Communicator& world, const Topology& topo,
                                               GroupKind kind) {
  LS_CHECK(world.size() == topo.world_size(), "make_group: communicator has ", world.size(),
           " ranks but topology ", topo.name(), " needs ", topo.world_size());
  auto [color, key] = topo.group_color_key(kind, world.rank());
  return world.split(color, key);
}

std::vector<int64_t> pipeline_layer_split(int64_t num_layers, int pp,
                                          const std::optional<std::vector<int64_t>>& explicit_split) {
  LS_CHECK(pp >= 1, "pipeline split: pp=", pp, " must be >= 1");
  LS_CHECK(num_layers >= pp, "pipeline split: ", num_layers, " layers cannot fill pp=", pp,
           " stages (each stage needs at least one layer)");
  if (explicit_split) {
    const auto& s = *explicit_split;
    LS_CHECK(static_cast<int>(s.size()) == pp, "--pipeline-layer-split has ", s.size(),
             " entries but pp=", pp, ": give one layer count per stage");
    int64_t total = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      LS_CHECK(s[i] >= 1, "--pipeline-layer-split: stage ", i, " has ", s[i],
               " layers; every stage needs at least one");
      total += s[i];
    }
    LS_CHECK(total == num_layers, "--pipeline-layer-split sums to ", total, " layers but the model has ",
             num_layers);
    return s;
  }
  std::vector<int64_t> s(pp, num_layers / pp);
  for (int64_t i = 0; i < num_layers % pp; ++i) ++s[i];
  return s;
}

std::vector<int64_t> parse_layer_split(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  for (std::string t; std::getline(ss, t, ',');) {
    int64_t v = 0;
    auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
    LS_CHECK(ec == std::errc() && p == t.data() + t.size() && !t.empty(),
             "--pipeline-layer-split '", text, "': '", t, "' is not a layer count (form: 1,3)");
    out.push_back(v);
  }
  LS_CHECK(!out.empty(), "--pipeline-layer-split is empty (form: 1,3)");
  return out;
}

int64_t first_layer(const std::vector<int64_t>& split, int pp_rank) {
  LS_CHECK(pp_rank >= 0 && pp_rank < static_cast<int>(split.size()), "first_layer: pp rank ",
           pp_rank, " out of range [0, ", split.size(), ")");
  int64_t first = 0;
  for (int i = 0; i < pp_rank; ++i) first += split[i];
  return first;
}

int stage_of_layer(const std::vector<int64_t>& split, int64_t global_layer) {
  int64_t first = 0;
  for (size_t i = 0; i < split.size(); ++i) {
    if (global_layer >= first && global_layer < first + split[i]) return static_cast<int>(i);
    first += split[i];
  }
  fail("layer ", global_layer, " is out of range [0, ", first, ") of the pipeline split");
}

}  // namespace lockstep
