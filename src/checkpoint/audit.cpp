#include "checkpoint/audit.h"

#include <algorithm>
#include <cctype>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/finite.h"

namespace lockstep {

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t h) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < bytes; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

bool global_name_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const bool da = std::isdigit(static_cast<unsigned char>(a[i])), db = std::isdigit(static_cast<unsigned char>(b[j]));
    if (da && db) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      const std::string na = a.substr(i, ie - i), nb = b.substr(j, je - j);
      if (na.size() != nb.size()) return na.size() < nb.size();  // no leading zeros in names
      if (na != nb) return na < nb;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

std::string audit_group(const std::string& name) {
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) == 0) {
    const size_t dot = name.find('.', prefix.size());
    const std::string layer = name.substr(prefix.size(), dot - prefix.size());
    const std::string rest = dot == std::string::npos ? "" : name.substr(dot + 1);
    std::string part = "other";
    if (rest.find("norm") != std::string::npos) part = "norms";
    else if (rest.rfind("self_attn.", 0) == 0) part = "attention";
    else if (rest.rfind("mlp.gate.", 0) == 0) part = "router";
    else if (rest.rfind("mlp.experts.", 0) == 0) part = "experts";
    else if (rest.rfind("mlp.", 0) == 0) part = "mlp";
    return "layer " + layer + " " + part;
  }
  if (name == "model.embed_tokens.weight") return "embedding";
  if (name == "model.norm.weight") return "final_norm";
  if (name == "lm_head.weight") return "lm_head";
  return "other";
}

CheckpointAudit audit_checkpoint(const CheckpointSource& src) {
  CheckpointAudit a;
  a.source = src.describe();
  std::vector<std::string> names = src.names();
  std::sort(names.begin(), names.end(), global_name_less);
  std::map<std::string, size_t> group_index;
  std::vector<double> group_sq;
  for (const std::string& name : names) {
    const Tensor t = src.read_full(name);
    TensorAudit ta{name, t.shape(), t.dtype(), fnv1a64(t.raw(), t.nbytes()), 0.0};
    if (t.dtype() == DType::i32 || t.dtype() == DType::i64 || t.dtype() == DType::u8) {
      ta.norm = 0;  // integer tensors: hash only
    } else {
      const Tensor f = t.to_f32();
      ta.non_finite = find_non_finite(f.data<float>(), f.numel()).count;
      double sq = 0;
      for (int64_t i = 0; i < f.numel(); ++i) sq += double(f.data<float>()[i]) * double(f.data<float>()[i]);
      ta.norm = std::sqrt(sq);
    }
    const std::string g = audit_group(name);
    auto [it, fresh] = group_index.try_emplace(g, a.groups.size());
    if (fresh) {
      a.groups.push_back({g, 0, 0xcbf29ce484222325ull, 0});
      group_sq.push_back(0);
    }
    GroupAudit& ga = a.groups[it->second];
    ga.tensors += 1;
    ga.hash = fnv1a64(&ta.hash, sizeof ta.hash, ga.hash);
    group_sq[it->second] += ta.norm * ta.norm;
    a.tensors.push_back(std::move(ta));
  }
  for (size_t i = 0; i < a.groups.size(); ++i) a.groups[i].norm = std::sqrt(group_sq[i]);
  return a;
}

namespace {
std::string hex(uint64_t h) {
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016" PRIx64, h);
  return buf;
}
std::string describe(const TensorAudit& t) {
  std::ostringstream os;
  os << dtype_name(t.dtype) << shape_str(t.shape) << " hash " << hex(t.hash) << " norm " << t.norm;
  if (t.non_finite) os << " non-finite " << t.non_finite;
  return os.str();
}
}  // namespace

std::optional<std::string> first_difference(const CheckpointAudit& a, const CheckpointAudit& b) {
  size_t i = 0, j = 0;
  while (i < a.tensors.size() || j < b.tensors.size()) {
    if (j == b.tensors.size() || (i < a.tensors.size() && global_name_less(a.tensors[i].name, b.tensors[j].name)))
      return "tensor '" + a.tensors[i].name + "' is in " + a.source + " but not in " + b.source;
    if (i == a.tensors.size() || global_name_less(b.tensors[j].name, a.tensors[i].name))
      return "tensor '" + b.tensors[j].name + "' is in " + b.source + " but not in " + a.source;
    const TensorAudit &x = a.tensors[i], &y = b.tensors[j];
    std::string what;
    if (x.shape != y.shape) what = "shape";
    else if (x.dtype != y.dtype) what = "dtype";
    else if (x.hash != y.hash) what = "contents";
    if (!what.empty())
      return "tensor '" + x.name + "' differs (" + what + "): " + describe(x) + " in " + a.source + " vs " +
             describe(y) + " in " + b.source;
    ++i;
    ++j;
  }
  return std::nullopt;
}

std::vector<std::string> differing_groups(const CheckpointAudit& a, const CheckpointAudit& b) {
  std::map<std::string, uint64_t> ha, hb;
  for (const auto& g : a.groups) ha[g.group] = g.hash;
  for (const auto& g : b.groups) hb[g.group] = g.hash;
  std::vector<std::string> out;
  for (const auto& [g, h] : ha)
    if (!hb.count(g) || hb[g] != h) out.push_back(g);
  for (const auto& [g, h] : hb)
    if (!ha.count(g)) out.push_back(g);
  std::sort(out.begin(), out.end(), global_name_less);
  return out;
}

std::vector<std::string> non_finite_tensors(const CheckpointAudit& audit) {
  std::vector<std::string> out;
  for (const auto& t : audit.tensors)
    if (t.non_finite)
      out.push_back("tensor '" + t.name + "' holds " + std::to_string(t.non_finite) + " non-finite value" +
                    (t.non_finite == 1 ? "" : "s"));
  return out;
}

std::string audit_text(const CheckpointAudit& audit) {
  std::ostringstream os;
  os << "source: " << audit.source << "\n";
  for (const auto& t : audit.tensors) os << t.name << "  " << describe(t) << "\n";
  os << "summaries:\n";
  for (const auto& g : audit.groups)
    os << "  " << g.group << "  tensors " << g.tensors << " hash " << hex(g.hash) << " norm " << g.norm << "\n";
  return os.str();
}

nlohmann::json audit_json(const CheckpointAudit& audit) {
  nlohmann::json j = {{"source", audit.source}, {"tensors", nlohmann::json::array()}, {"groups", nlohmann::json::array()}};
  for (const auto& t : audit.tensors)
    j["tensors"].push_back({{"name", t.name},
                            {"shape", t.shape},
                            {"dtype", dtype_name(t.dtype)},
                            {"hash", hex(t.hash)},
                            {"norm", t.norm},
                            {"non_finite", t.non_finite}});
  for (const auto& g : audit.groups)
    j["groups"].push_back({{"group", g.group}, {"tensors", g.tensors}, {"hash", hex(g.hash)}, {"norm", g.norm}});
  return j;
}

}  // namespace lockstep
