"""Command line: ``slarouter replay DATASET_DIR`` (also ``python -m slarouter``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


def _seeds(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            if int(b) < int(a):
                raise argparse.ArgumentTypeError(f"seed range {part!r} runs backwards")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be non-negative ints or ranges like 0-4, got {text!r}")
    return list(dict.fromkeys(out))


def _count(least: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {v}")
        return v

    parse.__name__ = f"int >= {least}"
    return parse


def _rate(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"report rate must be in (0, 1], got {text}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def _unit(text: str) -> float:
    v = float(text)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"value must be in (0, 1), got {text}")
    return v


def _tuning(text: str) -> Dict[str, float]:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"payback\": 300}}', got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slarouter", description="SLA-constrained LLM routing from complaints")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="replay a dataset through the router and the baselines")
    r.add_argument("dataset", help="dataset folder (meta.json + requests.csv.gz)")
    r.add_argument("--protocol", nargs="+", choices=["short", "long"], default=["short"],
                   help="short: each benchmark once in a random order; long: 20,000 draws with replacement")
    r.add_argument("--requests", type=_count(1), default=None, help="requests per stream (default: protocol's)")
    r.add_argument("--report-rate", nargs="+", type=_rate, default=[0.3], dest="report_rate",
                   help="probability that an unsatisfied user complains (several allowed)")
    r.add_argument("--alpha", nargs="+", type=_unit, default=None, help="SLA levels (default: the dataset's)")
    r.add_argument("--seeds", type=_seeds, default=list(range(5)), help="seeds, e.g. 0-4 or 0,3")
    r.add_argument("--benchmark", nargs="+", default=None, help="benchmarks to replay (default: all)")
    r.add_argument("--policies", nargs="+", default=None,
                   help="policies (default: all: slarouter, mess+:V=<v> for every V of the grid, mess+ (best V in "
                        "hindsight), threshold, bandit, random-mix, oracle and always:<model> for every model)")
    r.add_argument("--confidence", type=_unit, default=0.95, help="the router's confidence (default 0.95)")
    r.add_argument("--audit-rate", type=_fraction, default=0.0, dest="audit_rate",
                   help="fraction of requests audited; when > 0 the report rate is withheld from the router")
    r.add_argument("--batch", type=_count(1), default=None,
                   help="the router routes this many requests at a time (route_batch's phases: one dual state "
                        "per batch; feedback due within a batch waits for the next); default: route() per request")
    r.add_argument("--max-delay", type=_count(0), default=200, dest="max_delay", help="largest feedback delay")
    r.add_argument("--tuning", type=_tuning, default=None,
                   help="overrides of the engine constants for policy slarouter, as a JSON object, e.g. "
                        "'{\"payback\": 300}' (keys and ranges: slarouter._defaults.TUNING, TUNING_RANGE); for "
                        "measuring a constant, not for use: the defaults are the configuration")
    r.add_argument("--json", default=None, help="write every run to this JSON file")
    r.add_argument("--plot", default=None, help="write a PNG figure (needs matplotlib)")
    r.add_argument("--workers", type=_count(1), default=os.cpu_count() or 1, help="processes to use")
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


def _run_job(job: dict) -> Tuple[List[dict], Optional[dict]]:
    """Runs of one stream; with job["trace"], also the running satisfaction of every policy on the
    stream's first (alpha, report rate) cell."""
    from .replay import RunContext, make_stream, run_policy

    ds = _DS
    stream = make_stream(ds, job["benchmark"], job["protocol"], job["seed"], job["requests"], job["max_delay"])
    out = []
    traces = None
    for i, alpha in enumerate(job["alphas"]):
        for j, rho in enumerate(job["rates"]):
            ctx = RunContext(ds, stream, alpha, rho, confidence=job["confidence"], audit_rate=job["audit_rate"],
                             withhold_report_rate=job["audit_rate"] > 0, batch=job["batch"], features=_FEAT,
                             list_cost=ds.cost.mean(axis=0), tuning=job["tuning"])
            want = bool(job.get("trace")) and i == 0 and j == 0
            if want:
                traces = {"benchmark": job["benchmark"], "protocol": job["protocol"], "seed": job["seed"],
                          "alpha": alpha, "report_rate": rho, "policies": {}}
            for pol in job["policies"]:
                run = run_policy(pol, ctx, trace=want)
                if want:
                    traces["policies"][pol] = run.pop("trace")
                out.append(run)
    return out, traces


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


def default_policies(models: Sequence[str]) -> List[str]:
    """Every policy: the router, the MESS+ grid and its best V, the other baselines, always-k."""
    from .baselines import MESS_V_GRID, messplus_name

    return (["slarouter"] + [messplus_name(v) for v in MESS_V_GRID]
            + ["mess+", "threshold", "bandit", "random-mix", "oracle"] + [f"always:{m}" for m in models])


def _policies_to_run(policies: Sequence[str]) -> List[str]:
    """The requested policies, "mess+" replaced by the MESS+ grid runs it is chosen from."""
    from .baselines import MESS_V_GRID, messplus_name

    out: List[str] = []
    for p in policies:
        for n in [messplus_name(v) for v in MESS_V_GRID] if p == "mess+" else [p]:
            if n not in out:
                out.append(n)
    return out


def add_best_v(runs: Sequence[dict], grid: Optional[Sequence[float]] = None) -> Tuple[List[dict], Dict[tuple, float]]:
    """Adds the ``mess+`` runs: MESS+ with V chosen in hindsight per (benchmark, protocol, report_rate).

    Among the ``mess+:V=<v>`` runs of a (benchmark, protocol, report_rate) group, a V qualifies when
    for every alpha its mean satisfaction over seeds is >= alpha; the qualifying V with the lowest
    mean cost per request is chosen (ties: the smaller V), or if none qualifies, the V with the
    highest mean satisfaction. Each run of the chosen V is copied with policy "mess+" and an extra
    key "V", placed right after the last grid run of its stream and cell. ``grid``: the V values
    to choose from (default: every V among the runs). Returns (runs, {group: chosen V}).
    """
    from .baselines import best_v, messplus_v

    chosen = best_v(runs, grid)

    def cell(r: dict) -> tuple:
        return (r["benchmark"], r["protocol"], r["seed"], r["alpha"], r["report_rate"])

    out: List[dict] = []
    pending: Optional[dict] = None
    for r in runs:
        v = messplus_v(r["policy"])
        if pending is not None and (v is None or cell(r) != cell(pending)):
            out.append(pending)
            pending = None
        out.append(r)
        if v is not None and v == chosen.get((r["benchmark"], r["protocol"], r["report_rate"])):
            pending = dict(r, policy="mess+", V=v)
    if pending is not None:
        out.append(pending)
    return out, chosen


def run_replay(args: argparse.Namespace) -> dict:
    """Every run of the grid: {"dataset", "runs", "traces"} ("traces" is for --plot, not for --json)."""
    from .baselines import MESS_V_GRID, messplus_name
    from .datasets import load_dataset
    from .replay import resolve_policy

    ds = load_dataset(args.dataset)
    benchmarks = list(dict.fromkeys(args.benchmark or ds.benchmarks))
    unknown = [b for b in benchmarks if b not in ds.benchmarks]
    if unknown:
        raise SystemExit(f"slarouter replay: dataset {ds.name!r} has no benchmark {unknown[0]!r}; it has "
                         f"{ds.benchmarks}")
    requested = list(dict.fromkeys(args.policies or default_policies(ds.models)))
    for p in requested:
        try:
            resolve_policy(p, ds)
        except ValueError as e:
            raise SystemExit(f"slarouter replay: {e}") from None
    policies = _policies_to_run(requested)
    if args.tuning is not None:
        from ._router import Router

        try:  # the router's own checks, before any work
            Router([(m, 1.0) for m in ds.models], 0.5, report_rate=0.5, tuning=args.tuning)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"slarouter replay: --tuning: {e}") from None
    jobs = []
    for b in benchmarks:
        alphas = list(dict.fromkeys(args.alpha or ds.sla_levels(b)))
        for proto in dict.fromkeys(args.protocol):
            for seed in args.seeds:
                jobs.append(dict(benchmark=b, protocol=proto, seed=seed, requests=args.requests, alphas=alphas,
                                 rates=list(dict.fromkeys(args.report_rate)), policies=policies, confidence=args.confidence,
                                 audit_rate=args.audit_rate, batch=args.batch or 0, max_delay=args.max_delay,
                                 tuning=args.tuning, trace=not jobs))
    runs: List[dict] = []
    traces: Optional[dict] = None
    start = time.time()
    workers = max(1, min(args.workers, len(jobs)))
    if workers == 1:
        _init_worker(args.dataset)
        results: Iterable[Tuple[List[dict], Optional[dict]]] = map(_run_job, jobs)
        for i, (res, tr) in enumerate(results):
            runs.extend(res)
            traces = traces or tr
            _progress(i + 1, len(jobs), start, args.quiet)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(args.dataset,)) as ex:
            for i, (res, tr) in enumerate(ex.map(_run_job, jobs)):
                runs.extend(res)
                traces = traces or tr
                _progress(i + 1, len(jobs), start, args.quiet)
    if "mess+" in requested:
        runs, chosen = add_best_v(runs, MESS_V_GRID)
        if traces is not None:
            v = chosen.get((traces["benchmark"], traces["protocol"], traces["report_rate"]))
            if v is not None:
                traces["policies"]["mess+"] = traces["policies"][messplus_name(v)]
                traces["mess+ V"] = v
        dropped = set(policies) - set(requested)
        if dropped:
            runs = [r for r in runs if r["policy"] not in dropped]
        if traces is not None:
            order = [p for p in requested if p in traces["policies"]]
            traces["policies"] = {p: traces["policies"][p] for p in order}
    result = {"dataset": ds.name, "runs": runs, "traces": traces}
    if args.tuning is not None:
        result["tuning"] = args.tuning
    return result


def summarize(runs: Sequence[dict]) -> Dict[tuple, dict]:
    cells: Dict[tuple, List[dict]] = defaultdict(list)
    for r in runs:
        cells[(r["policy"],)].append(r)
    return cells


def _row(rs: Sequence[dict]) -> str:
    from .replay import cost_ratio

    cb = cost_ratio(rs, "static_optimum_cost")
    cc = cost_ratio(rs, "certified_optimum_cost")
    sat = np.mean([r["satisfaction"] for r in rs])
    met = np.mean([r["sla_met"] for r in rs])
    return f"{cb:8.2f} {cc:9.2f} {sat:8.4f} {met:8.0%} {len(rs):6d}"


def print_tables(result: dict, out=None) -> None:
    out = sys.stdout if out is None else out  # looked up at call time, so redirections apply
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
                label = f"{p} (V={sel[0]['V']:g})" if "V" in sel[0] else p
                print(f"  {label:28s} {_row(sel)}", file=out)
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


def _check_outputs(args: argparse.Namespace) -> None:
    """What would fail only after the whole replay: an output folder that does not exist or cannot
    be written, and --plot without matplotlib."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise ValueError(f"{flag} {path}: the folder {folder} does not exist or is not writable")
    if args.plot:
        from .plot import _pyplot

        _pyplot()  # raises ImportError naming the extra to install


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "replay":
        try:
            _check_outputs(args)
            result = run_replay(args)
            if args.json:  # first: the tables and the plot cannot lose it
                with open(args.json, "w", encoding="utf-8") as fh:
                    json.dump({k: v for k, v in result.items() if k != "traces"}, fh, indent=1)
            print_tables(result)
            if args.plot:
                from .plot import plot_replay

                plot_replay(result, args.plot)
        except (OSError, ValueError, ImportError) as e:
            raise SystemExit(f"slarouter replay: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
