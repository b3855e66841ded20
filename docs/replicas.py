"""What replicas cost: the long protocol with its stream split over R routers.

A service that runs R server replicas, each with its own Router, serves every R-th request of the
stream on each (round robin). Independent replicas each aim at the SLA on their own share of the
traffic (if every one meets it, the whole stream does), but each learns from a R-th of the
complaints and certifies its own, shorter stream, so it pays a wider margin. This script measures
that price: for R = 1, 2, 4, 8 it replays the long protocol (docs/replay.md) with the stream dealt
round robin to R routers (default configuration; replica r of seed s is seeded s + 1000 r, so that
R = 1 is the replay itself), a complaint delayed by d requests of the stream arriving after
d // R requests of its replica (independent replicas run natively, replica by replica), and
reports, per report rate, the share of runs whose whole stream met the SLA and the mean cost /
B_cert of the whole stream.

With ``--share K`` the replicas share their evidence every K requests of the stream: before
request t (t a multiple of K) every replica publishes ``share()`` and receives the others' through
``set_peers()`` (docs/api.md, "Several processes or replicas"), as a deployment would through a
key-value store; the replicas then run request by request in Python, and a complaint delayed by d
requests arrives d requests of the stream later. Without it (K = 0) they are independent.

Usage (from the repository root, slarouter importable):

    python docs/replicas.py ../shared/data/llama3-zoo [--seeds 0-4] [--replicas 1 2 4 8] [--share K]
                            [--audit-rate A]

With ``--audit-rate A`` the routers are not told the report rate and estimate it from audits of a
fraction A of the requests (the true label, delivered when the complaint would be).
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


def run(ds, feats, bench, alpha, rho, seed, R, share=0, audit_rate=0.0):
    """(satisfaction, cost per request) of the whole stream served by R routers, sharing their
    evidence every ``share`` requests (0: independent). With ``audit_rate`` > 0 the routers are
    not told the report rate and a request is audited (its true label given when its complaint
    would arrive) with that probability."""
    s = make_stream(ds, bench, "long", seed)
    models = [(m, float(c)) for m, c in zip(ds.models, ds.cost.mean(axis=0))]
    told = None if audit_rate > 0 else rho
    served = np.empty(len(s), dtype=np.int64)
    if share and R > 1:
        routers = [Router(models, alpha, report_rate=told, seed=seed + 1000 * r) for r in range(R)]
        due, audits = {}, {}
        for t in range(len(s)):
            for r, rid in due.pop(t, ()):
                routers[r].complain(rid)
            for r, rid, ok in audits.pop(t, ()):
                routers[r].audit(rid, ok)
            if t % share == 0:
                shares = [router.share() for router in routers]
                for r, router in enumerate(routers):
                    router.set_peers(shares[:r] + shares[r + 1:])
            r = t % R
            d = routers[r].route(ds.prompts[s.rows[t]])
            served[t] = d.index
            ok = bool(s.u_sat[t] < ds.sat[s.rows[t], d.index])
            if not ok and s.u_report[t] < rho:
                due.setdefault(t + 1 + int(s.delay[t]), []).append((r, d.request_id))
            if s.u_audit[t] < audit_rate:
                audits.setdefault(t + 1 + int(s.delay[t]), []).append((r, d.request_id, ok))
        sat = s.u_sat < ds.sat[s.rows, served]
        return float(sat.mean()), float(ds.cost[s.rows, served].mean())
    for r in range(R):
        part = slice(r, None, R)
        router = Router(models, alpha, report_rate=told, seed=seed + 1000 * r)
        model, _, _ = router._replay(s.rows[part], ds.sat, ds.cost, s.u_sat[part], s.u_report[part],
                                     s.delay[part] // R, rho, features=feats,
                                     u_audit=s.u_audit[part] if audit_rate > 0 else None, audit_rate=audit_rate)
        served[part] = model
    sat = s.u_sat < ds.sat[s.rows, served]
    return float(sat.mean()), float(ds.cost[s.rows, served].mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--report-rate", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--share", type=int, default=0, help="share evidence every K requests (0: never)")
    ap.add_argument("--audit-rate", type=float, default=0.0,
                    help="audit this fraction of requests and withhold the report rate from the routers")
    args = ap.parse_args(argv)
    if not 0.0 <= args.audit_rate <= 1.0:
        ap.error("--audit-rate must be in [0, 1]")
    if any(R < 1 for R in args.replicas):
        ap.error("--replicas must be positive")
    if args.share < 0:
        ap.error("--share must be >= 0")
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
                        sat, cost = run(ds, feats, bench, alpha, rho, seed, R, args.share, args.audit_rate)
                        met.setdefault((rho, R), []).append(sat >= alpha)
                        ratio.setdefault((rho, R), []).append(cost / b_cert)
    how = f"sharing evidence every {args.share} requests" if args.share else "independent"
    if args.audit_rate:
        how += f", report rate withheld, {args.audit_rate:g} of requests audited"
    print(f"{ds.name}, long protocol, seeds {args.seeds}, {how}: SLA met on the whole stream, mean cost / B_cert")
    print("| replicas | " + " | ".join(f"rho {rho}" for rho in args.report_rate) + " |")
    print("|---|" + "---|" * len(args.report_rate))
    for R in args.replicas:
        cells = [f"{100 * np.mean(met[(rho, R)]):.1f}%, {np.mean(ratio[(rho, R)]):.2f}" for rho in args.report_rate]
        print(f"| {R} | " + " | ".join(cells) + " |")
    print(f"({time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
