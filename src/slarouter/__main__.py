"""Command line: ``slarouter replay DATASET_DIR`` (also ``python -m slarouter``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np


def _seeds(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be non-negative ints or ranges like 0-4, got {text!r}")
    return out


def _rate(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"report rate must be in (0, 1], got {text}")
    return v


def _unit(text: str) -> float:
    v = float(text)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"value must be in (0, 1), got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slarouter", description="SLA-constrained LLM routing from complaints")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="replay a dataset through the router and the baselines")
    r.add_argument("dataset", help="dataset folder (meta.json + requests.csv.gz)")
    r.add_argument("--protocol", nargs="+", choices=["short", "long"], default=["short"],
                   help="short: each benchmark once in a random order; long: 20,000 draws with replacement")
    r.add_argument("--requests", type=int, default=None, help="requests per stream (default: protocol's)")
    r.add_argument("--report-rate", nargs="+", type=_rate, default=[0.3], dest="report_rate",
                   help="probability that an unsatisfied user complains (several allowed)")
    r.add_argument("--alpha", nargs="+", type=_unit, default=None, help="SLA levels (default: the dataset's)")
    r.add_argument("--seeds", type=_seeds, default=list(range(5)), help="seeds, e.g. 0-4 or 0,3")
    r.add_argument("--benchmark", nargs="+", default=None, help="benchmarks to replay (default: all)")
    r.add_argument("--policies", nargs="+", default=None,
                   help="policies (default: slarouter, random-mix, oracle and always:<model> for every model)")
    r.add_argument("--confidence", type=_unit, default=0.95, help="the router's confidence (default 0.95)")
    r.add_argument("--audit-rate", type=float, default=0.0, dest="audit_rate",
                   help="fraction of requests audited; when > 0 the report rate is withheld from the router")
    r.add_argument("--batch", type=int, default=1, help="route in batches of this size")
    r.add_argument("--max-delay", type=int, default=200, dest="max_delay", help="largest feedback delay")
    r.add_argument("--json", default=None, help="write every run to this JSON file")
    r.add_argument("--plot", default=None, help="write a PNG figure (needs matplotlib)")
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes to use")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------------------------
# Worker side: each process loads the dataset once.
_DS = None
_FEAT = None


def _init_worker(path: str) -> None:
    global _DS, _FEAT
    from .datasets import load_dataset
    from .replay import hashed_features

    _DS = load_dataset(path)
    _FEAT = hashed_features(_DS)


def _run_job(job: dict) -> List[dict]:
    from .replay import RunContext, make_stream, run_policy

    ds = _DS
    stream = make_stream(ds, job["benchmark"], job["protocol"], job["seed"], job["requests"], job["max_delay"])
    out = []
    for alpha in job["alphas"]:
        for rho in job["rates"]:
            ctx = RunContext(ds, stream, alpha, rho, confidence=job["confidence"], audit_rate=job["audit_rate"],
                             withhold_report_rate=job["audit_rate"] > 0, batch=job["batch"], features=_FEAT,
                             list_cost=ds.cost.mean(axis=0))
            for pol in job["policies"]:
                out.append(run_policy(pol, ctx))
    return out


def _progress(done: int, total: int, start: float, quiet: bool) -> None:
    if quiet or not total:
        return
    width = 30
    frac = done / total
    el = time.time() - start
    eta = el / frac - el if frac > 0 else 0.0
    bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
    sys.stderr.write(f"\r[{bar}] {done}/{total} streams  {el:5.1f}s elapsed  {eta:5.1f}s left")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_replay(args: argparse.Namespace) -> dict:
    from .datasets import load_dataset
    from .replay import resolve_policy

    ds = load_dataset(args.dataset)
    benchmarks = args.benchmark or ds.benchmarks
    for b in benchmarks:
        ds.rows(b)  # validates the name
    policies = args.policies or (["slarouter", "random-mix", "oracle"] + [f"always:{m}" for m in ds.models])
    for p in policies:
        resolve_policy(p, ds)
    if args.batch < 1:
        raise SystemExit("--batch must be >= 1")
    if not 0.0 <= args.audit_rate <= 1.0:
        raise SystemExit("--audit-rate must be in [0, 1]")
    jobs = []
    for b in benchmarks:
        alphas = args.alpha or ds.sla_levels(b)
        for proto in args.protocol:
            for seed in args.seeds:
                jobs.append(dict(benchmark=b, protocol=proto, seed=seed, requests=args.requests, alphas=alphas,
                                 rates=args.report_rate, policies=policies, confidence=args.confidence,
                                 audit_rate=args.audit_rate, batch=args.batch, max_delay=args.max_delay))
    runs: List[dict] = []
    start = time.time()
    workers = max(1, min(args.workers, len(jobs)))
    if workers == 1:
        _init_worker(args.dataset)
        for i, job in enumerate(jobs):
            runs.extend(_run_job(job))
            _progress(i + 1, len(jobs), start, args.quiet)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(args.dataset,)) as ex:
            for i, res in enumerate(ex.map(_run_job, jobs)):
                runs.extend(res)
                _progress(i + 1, len(jobs), start, args.quiet)
    return {"dataset": ds.name, "runs": runs}


def summarize(runs: Sequence[dict]) -> Dict[tuple, dict]:
    cells: Dict[tuple, List[dict]] = defaultdict(list)
    for r in runs:
        cells[(r["policy"],)].append(r)
    return cells


def _row(rs: Sequence[dict]) -> str:
    cb = np.mean([r["cost_per_request"] / r["static_optimum_cost"] for r in rs])
    cc = np.mean([r["cost_per_request"] / r["certified_optimum_cost"] for r in rs])
    sat = np.mean([r["satisfaction"] for r in rs])
    met = np.mean([r["sla_met"] for r in rs])
    return f"{cb:8.2f} {cc:9.2f} {sat:8.4f} {met:8.0%} {len(rs):6d}"


def print_tables(result: dict, out=sys.stdout) -> None:
    runs = result["runs"]
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    head = f"  {'policy':28s} {'cost/B':>8s} {'cost/Bc':>9s} {'satisf.':>8s} {'SLA met':>8s} {'runs':>6s}"
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["protocol"], r["benchmark"], r["alpha"], r["report_rate"])].append(r)
    print(f"dataset {result['dataset']}: cost / B (hindsight static optimum), cost / B_cert (certifiable "
          f"optimum), realized satisfaction, share of runs meeting the SLA", file=out)
    for (proto, bench, alpha, rho), rs in groups.items():
        print(f"\n{bench}  alpha={alpha:g}  report_rate={rho:g}  protocol={proto}", file=out)
        print(head, file=out)
        for p in policies:
            sel = [r for r in rs if r["policy"] == p]
            if sel:
                print(f"  {p:28s} {_row(sel)}", file=out)
    print("\npooled over benchmarks, SLA levels and seeds", file=out)
    pooled: Dict[tuple, List[dict]] = defaultdict(list)
    for r in runs:
        pooled[(r["protocol"], r["report_rate"])].append(r)
    for (proto, rho), rs in pooled.items():
        print(f"\nprotocol={proto}  report_rate={rho:g}", file=out)
        print(head, file=out)
        for p in policies:
            sel = [r for r in rs if r["policy"] == p]
            if sel:
                print(f"  {p:28s} {_row(sel)}", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "replay":
        result = run_replay(args)
        print_tables(result)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1)
        if args.plot:
            from .plot import plot_replay

            plot_replay(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
