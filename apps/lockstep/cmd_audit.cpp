// lockstep audit: fingerprints of a checkpoint (HF or sharded) and the first difference
// between two. Exit code 0: audited / no difference; 1: the checkpoints differ; 2: a tensor
// holds NaN or infinity (each named on stderr; the report is still written).
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "checkpoint/audit.h"
#include "command_registry.h"
#include "core/error.h"
#include "core/output_path.h"
#include "core/text_file.h"

namespace lockstep::cli {
namespace {

struct AuditOptions {
  std::string model, compare, output = "-";
  bool json = false;
};

void emit(const std::string& text, const std::string& path) {
  if (path != "-") return write_text_file(path, text);
  LS_CHECK(std::fwrite(text.data(), 1, text.size(), stdout) == text.size() && std::fflush(stdout) == 0,
           "<stdout>: write failed");
}

// Names each non-finite tensor of `audit` on stderr; true if there is any.
bool report_non_finite(const CheckpointAudit& audit) {
  const auto bad = non_finite_tensors(audit);
  for (const auto& line : bad) std::fprintf(stderr, "lockstep audit: %s: %s\n", audit.source.c_str(), line.c_str());
  return !bad.empty();
}

int run_audit(const AuditOptions& o) {
  check_output_outside(o.output, o.model, "--output");
  if (!o.compare.empty()) check_output_outside(o.output, o.compare, "--output");
  const CheckpointAudit a = audit_checkpoint(*open_checkpoint(o.model));
  if (o.compare.empty()) {
    emit(o.json ? audit_json(a).dump(1) + "\n" : audit_text(a), o.output);
    return report_non_finite(a) ? 2 : 0;
  }
  const CheckpointAudit b = audit_checkpoint(*open_checkpoint(o.compare));
  const auto diff = first_difference(a, b);
  const auto groups = differing_groups(a, b);
  if (o.json) {
    nlohmann::json j = {{"a", audit_json(a)},
                        {"b", audit_json(b)},
                        {"identical", !diff.has_value()},
                        {"first_difference", diff ? nlohmann::json(*diff) : nlohmann::json(nullptr)},
                        {"differing_groups", groups}};
    emit(j.dump(1) + "\n", o.output);
  } else {
    std::string text = "a: " + a.source + "\nb: " + b.source + "\n";
    text += "tensors: " + std::to_string(a.tensors.size()) + " vs " + std::to_string(b.tensors.size()) + "\n";
    if (!diff) {
      text += "no difference\n";
    } else {
      text += "first difference: " + *diff + "\ndiffering summaries:";
      for (const auto& g : groups) text += " [" + g + "]";
      text += "\n";
    }
    emit(text, o.output);
  }
  const bool non_finite = report_non_finite(a) | report_non_finite(b);
  return non_finite ? 2 : diff ? 1 : 0;
}

const bool registered = register_command(
    {"audit", "Per-tensor hashes, norms and layer summaries; compare two checkpoints", [](CLI::App& sub) {
       auto o = std::make_shared<AuditOptions>();
       sub.add_option("--model", o->model, "checkpoint directory (HF or sharded)")->required();
       sub.add_option("--compare", o->compare, "a second checkpoint: report the first difference");
       sub.add_flag("--json", o->json, "JSON output");
       sub.add_option("--output", o->output, "report file ('-' = stdout)");
       return std::function<int()>([o] { return run_audit(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
