"""What independent replicas cost: the long protocol with its stream split over R routers.

A service that runs R server replicas, each with its own Router, serves every R-th request of the
stream on each (round robin). Every replica keeps the SLA on its own share of the traffic, so the
whole stream keeps it too; but each replica learns from a R-th of the complaints and certifies its
own, shorter stream, so it pays a wider margin. This script measures that price: for R = 1, 2, 4,
8 it replays the long protocol (docs/replay.md) with the stream dealt round robin to R routers
(default configuration; replica r of seed s is seeded s + 1000 r, so that R = 1 is the replay
itself), a complaint delayed by d requests of the stream arriving after d // R requests of its
replica, and reports, per report rate, the share of runs whose whole stream met the SLA and the
mean cost / B_cert of the whole stream.

Usage (from the repository root, slarouter importable):

    python docs/replicas.py ../shared/data/llama3-zoo [--seeds 0-4] [--replicas 1 2 4 8]
"""
import argparse
import sys
import time

import numpy as np

from slarouter import Router
from slarouter.datasets import load_dataset
from slarouter.replay import hashed_features, make_stream, reference_costs


def parse_seeds(text):
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def run(ds, feats, bench, alpha, rho, seed, R):
    """(satisfaction, cost per request) of the whole stream served by R independent routers."""
    s = make_stream(ds, bench, "long", seed)
    models = [(m, float(c)) for m, c in zip(ds.models, ds.cost.mean(axis=0))]
    served = np.empty(len(s), dtype=np.int64)
    for r in range(R):
        part = slice(r, None, R)
        router = Router(models, alpha, report_rate=rho, seed=seed + 1000 * r)
        model, _, _ = router._replay(s.rows[part], ds.sat, ds.cost, s.u_sat[part], s.u_report[part],
                                     s.delay[part] // R, rho, features=feats)
        served[part] = model
    sat = s.u_sat < ds.sat[s.rows, served]
    return float(sat.mean()), float(ds.cost[s.rows, served].mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--report-rate", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    args = ap.parse_args(argv)
    if any(R < 1 for R in args.replicas):
        ap.error("--replicas must be positive")
    start = time.time()
    ds = load_dataset(args.dataset)
    feats = hashed_features(ds)
    seeds = parse_seeds(args.seeds)
    met = {}
    ratio = {}
    for bench in ds.benchmarks:
        for alpha in ds.sla_levels(bench):
            for rho in args.report_rate:
                _, b_cert = reference_costs(ds, bench, alpha, rho, 20_000)
                for seed in seeds:
                    for R in args.replicas:
                        sat, cost = run(ds, feats, bench, alpha, rho, seed, R)
                        met.setdefault((rho, R), []).append(sat >= alpha)
                        ratio.setdefault((rho, R), []).append(cost / b_cert)
    print(f"{ds.name}, long protocol, seeds {args.seeds}: SLA met on the whole stream, mean cost / B_cert")
    print("| replicas | " + " | ".join(f"rho {rho}" for rho in args.report_rate) + " |")
    print("|---|" + "---|" * len(args.report_rate))
    for R in args.replicas:
        cells = [f"{100 * np.mean(met[(rho, R)]):.1f}%, {np.mean(ratio[(rho, R)]):.2f}" for rho in args.report_rate]
        print(f"| {R} | " + " | ".join(cells) + " |")
    print(f"({time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
