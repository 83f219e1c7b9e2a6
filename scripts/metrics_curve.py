#!/usr/bin/env python3
"""Prints a `lockstep train` run's learning curve from its metrics.jsonl as compact tables.

  scripts/metrics_curve.py OUTPUT_DIR/metrics.jsonl [--rows N]

Three tables: the SFT warm start (train/sft_loss), the RL steps (rollout/rewards, response
length, truncation, the trainer/rollout log-prob difference) and each evaluation set
(eval/NAME mean reward and pass@k), each thinned to about --rows evenly spaced rows (the first
and the last always kept), then the wall time of the SFT and RL phases. Plain Python, no
packages: it runs wherever the job ran.
"""
import argparse
import json
import sys


def thin(rows, n):
    """About n evenly spaced rows, the first and the last included."""
    if len(rows) <= n:
        return rows
    step = (len(rows) - 1) / (n - 1)
    return [rows[round(i * step)] for i in range(n)]


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def table(title, header, rows):
    print(f"\n{title}")
    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for k, c in enumerate(cells):
        print("  " + "  ".join(s.rjust(w) for s, w in zip(c, widths)))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def records_of(path):
    """The JSON objects of a JSONL file; a bad line stops with its file and line number."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                yield json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not JSON: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="metrics.jsonl of a lockstep train run")
    ap.add_argument("--rows", type=int, default=12, help="rows per table (about)")
    a = ap.parse_args()
    if a.rows < 2:
        sys.exit("--rows must be at least 2")
    records = [r for r in records_of(a.metrics) if r is not None]
    sft = [r for r in records if "sft_step" in r]
    rl = [r for r in records if "rollout/rewards" in r]
    evals = {}
    for r in records:
        for k in r:
            if k.startswith("eval/") and k.count("/") == 1:
                evals.setdefault(k[5:], []).append(r)
    if not (sft or rl or evals):
        sys.exit(f"{a.metrics}: no SFT, RL or eval records")
    if sft:
        table("SFT warm start", ["sft_step", "sft_loss", "grad_norm"],
              [[r["sft_step"], r.get("train/sft_loss"), r.get("train/grad_norm")] for r in thin(sft, a.rows)])
    if rl:
        table("GRPO", ["step", "reward", "resp_len", "truncated", "abs_diff", "step_s"],
              [[r["step"], r["rollout/rewards"], r.get("rollout/response_lengths"), r.get("rollout/truncated"),
                r.get("train/train_rollout_logprob_abs_diff"), r.get("perf/step_time")] for r in thin(rl, a.rows)])
    for name, rows in evals.items():
        passes = sorted({k for r in rows for k in r if k.startswith(f"eval/{name}/pass@")},
                        key=lambda k: int(k.rsplit("@", 1)[1]))
        table(f"eval/{name}", ["step", "mean_reward"] + [p.rsplit("/", 1)[1] for p in passes] + ["resp_len"],
              [[r["step"], r[f"eval/{name}"]] + [r.get(p) for p in passes] + [r.get(f"eval/{name}/response_lengths")]
               for r in thin(rows, a.rows)])
    sft_s = sum(r.get("perf/step_time", 0.0) for r in sft)
    rl_s = sum(r.get("perf/step_time", 0.0) for r in rl)
    print(f"\nwall time in steps: SFT {sft_s:.1f} s ({len(sft)} steps), RL {rl_s:.1f} s ({len(rl)} steps)")


if __name__ == "__main__":
    main()
