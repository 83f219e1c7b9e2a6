"""Sums an ncu --csv --page raw report of a cuda_train_bench run by kernel name over its timed
step: the time and the time-weighted speed-of-light shares (SM, L2, DRAM) of each kernel.

    python3 bench/device/ncu_by_kernel.py REPORT.csv [--top N]

The bench runs a warm-up step, then the timed one: the timed step is the longest tail of
kernels that repeats the kernels before it (half the report where none does).
"""
import argparse
import collections
import csv
import re

COLUMNS = ["gpu__time_duration.sum", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
           "lts__throughput.avg.pct_of_peak_sustained_elapsed",
           "dram__throughput.avg.pct_of_peak_sustained_elapsed"]


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--top", type=int, default=50)
    args = ap.parse_args()
    rows = list(csv.reader(open(args.report)))
    header_at = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    header = rows[header_at]
    name_at = header.index("Kernel Name")
    at = [header.index(c) for c in COLUMNS]
    kernels = []
    for r in rows[header_at + 1:]:
        if len(r) <= max(at):
            continue
        values = [number(r[i]) for i in at]
        if None not in values:
            kernels.append((r[name_at], values))
    names = [n for n, _ in kernels]
    step = next((n for n in range(len(names) // 2, 0, -1) if names[-n:] == names[-2 * n:-n]), 0)
    if step < len(names) // 4:
        step = len(names) // 2
    kernels = kernels[-step:]
    by_name = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    for name, (ns, sm, l2, dram) in kernels:
        entry = by_name[re.sub(r"\(.*", "", name)[:100]]
        entry[0] += 1
        entry[1] += ns
        entry[2] += sm * ns
        entry[3] += l2 * ns
        entry[4] += dram * ns
    total = sum(e[1] for e in by_name.values())
    print("kernels %d, total %.1f us   (us, calls, SM%%, L2%%, DRAM%%, name)" % (len(kernels), total / 1e3))
    for name, e in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print("%9.1f %4d %4.0f %4.0f %4.0f  %s" % (e[1] / 1e3, e[0], e[2] / e[1], e[3] / e[1], e[4] / e[1], name))


if __name__ == "__main__":
    main()
