"""Print the bar tables of the held-out workloads (docs/heldout.py) from their replay JSON files.

Usage (from the repository root, after the commands of docs/RESULTS.md's held-out section):

    python docs/heldout_table.py results/heldout

reads results/heldout/<workload>.json for every workload and prints, for slarouter and random-mix,
the long protocol per workload and report rate (Bar 1's layout) and the short protocol per workload
and report rate, then pooled over the workloads (Bar 2's layout).
"""
import json
import os
import sys

import numpy as np

WORKLOADS = ["llama3-1b-70b", "routerbench-4", "synthetic"]
POLICIES = ["slarouter", "random-mix"]
RATES = [0.1, 0.3, 1.0]


def row(runs):
    """runs | SLA met | cost / B_cert | cost / B, as Markdown cells."""
    met = np.mean([r["sla_met"] for r in runs])
    c_cert = np.mean([r["cost_per_request"] / r["certified_optimum_cost"] for r in runs])
    c_b = np.mean([r["cost_per_request"] / r["static_optimum_cost"] for r in runs])
    return f"{len(runs)} | {met:.0%} | {c_cert:.2f} | {c_b:.2f} |"


def main(folder):
    runs = {w: json.load(open(os.path.join(folder, w + ".json")))["runs"] for w in WORKLOADS}

    def pick(w, policy, protocol, rate):
        return [r for r in runs[w] if r["policy"] == policy and r["protocol"] == protocol and r["report_rate"] == rate]

    for policy in POLICIES:
        confidence = ", confidence 0.95" if policy == "slarouter" else ""
        print(f"\n### Long protocol{confidence} ({policy})")
        print("| dataset | report rate | runs | SLA met | cost / B_cert | cost / B |\n|---|---|---|---|---|---|")
        for w in WORKLOADS:
            for rate in RATES:
                print(f"| {w} | {rate} | {row(pick(w, policy, 'long', rate))}")
        print(f"\n### Short protocol ({policy})")
        print("| dataset | report rate | runs | SLA met | cost / B_cert | cost / B |\n|---|---|---|---|---|---|")
        for w in [*WORKLOADS, "pooled"]:
            for rate in RATES:
                pool = WORKLOADS if w == "pooled" else [w]
                print(f"| {w} | {rate} | {row([r for v in pool for r in pick(v, policy, 'short', rate)])}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("results", "heldout"))
