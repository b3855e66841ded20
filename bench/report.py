"""Measure slarouter's overheads and print them as ratios against references run alongside.

    PYTHONPATH=src python bench/report.py [--quick] [--out FILE] [--json FILE]

Every figure times individual calls with time.perf_counter_ns (the median cost of the two timer
reads is measured and subtracted) and is reported as a median and a 99th percentile. Measurements
of a table are interleaved in rounds, so that a change in the machine's load falls on all of them.
bench/README.md holds the results and the machine they come from.
"""

from __future__ import annotations

import argparse
import json
import os

# Numba's OpenMP threads otherwise spin for a while after each of its parallel loops, on the
# cores the next timed block (slarouter's threads, NumPy's) needs; set before numba loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import sys
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as cm  # noqa: E402

import slarouter  # noqa: E402

FEATURES = [(384, "d=384"), (768, "d=768"), (("text", 50), "text, 50 words"), (("text", 500), "text, 500 words")]


class Feed:
    """A steady router: timed calls, with the simulated users' complaints delivered (untimed)
    between blocks, so the router stays in the regime it reached."""

    def __init__(self, K, features, seed=0, warm=4000):
        self.router = cm.steady_router(K, features, warm=warm, seed=seed)
        self.acc = cm.accuracies(K)
        self.rng = np.random.default_rng(seed + 7)

    def feedback(self, ids, models):
        bad = (self.rng.random(len(ids)) > self.acc[models]) & (self.rng.random(len(ids)) < cm.REPORT_RATE)
        for i in np.asarray(ids)[bad]:
            self.router.complain(int(i))

    def time_route(self, xs) -> np.ndarray:
        route = self.router.route
        out = np.empty(len(xs), dtype=np.int64)
        ids = np.empty(len(xs), dtype=np.int64)
        models = np.empty(len(xs), dtype=np.int64)
        ns = time.perf_counter_ns
        for i, x in enumerate(xs):
            t0 = ns()
            d = route(x)
            out[i] = ns() - t0
            ids[i], models[i] = d.request_id, d.index
        self.feedback(ids, models)
        return out

    def time_complain(self, xs) -> np.ndarray:
        """complain() about each of len(xs) requests just routed (untimed), in id order."""
        ids = [self.router.route(x).request_id for x in xs]
        return cm.time_calls(self.router.complain, ids)


def latency(quick: bool, overhead: float) -> List[dict]:
    rows = []
    rounds, block = (3, 300) if quick else (12, 800)
    for K in (3, 16):
        refs = {}
        for d in (384, 768):
            W = np.random.default_rng(K).standard_normal((K, d)).astype(np.float32)
            refs[d] = (W, list(cm.embeddings(block, d, seed=11)))
        for features, label in FEATURES:
            route_feed, complain_feed = Feed(K, features, seed=1), Feed(K, features, seed=2)
            xs = cm.inputs(features, block, seed=5)
            W, xr = refs[384 if isinstance(features, tuple) else features]
            ref = lambda x, W=W: int(np.argmin(W @ x))  # noqa: E731
            t_route, t_complain, t_ref = [], [], []
            regime = cm.plan_regime(route_feed.router)
            for _ in range(rounds):
                t_route.append(route_feed.time_route(xs))
                t_complain.append(complain_feed.time_complain(xs[: block // 2]))
                t_ref.append(cm.time_calls(ref, xr))
            rows.append({"K": K, "input": label, "regime": regime, "route": cm.summary(t_route, overhead),
                         "complain": cm.summary(t_complain, overhead), "numpy": cm.summary(t_ref, overhead),
                         "numpy_d": 384 if isinstance(features, tuple) else features})
            print(f"  latency K={K} {label}: done", file=sys.stderr)
    return rows


def wait_out_blas(seconds: float = 0.15) -> None:
    """Let OpenBLAS's threads go to sleep: after a product they poll for work for about 0.1 s,
    on the core slarouter's second thread needs (measured here: route_batch at B = 4096 took
    twice as long within 50 ms of a NumPy product as 100 ms after it). Busy on this thread, so
    the next block does not start on a cold core."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def throughput(quick: bool, overhead: float) -> List[dict]:
    K, d = 16, 384
    W = np.random.default_rng(3).standard_normal((K, d)).astype(np.float32)
    rows = []
    # Blocks of consecutive batches long enough (tens of milliseconds) that both sides' threads
    # run as they do in a sustained stream of batches, not woken afresh for each.
    # A batch longer than the feedback window (1,024) closes its first B - window rows within
    # itself, silent, so a stream of such batches drifts to serving one model (docs/algorithm.md,
    # "Batches"; docs/replay.md). Those sizes are timed twice: each batch from a copy of the
    # steady, mixing state (restored untimed), and as a stream of such batches.
    for B, calls, restore in ((64, 4000, False), (4096, 160, True), (4096, 160, False), (65536, 12, True),
                              (65536, 12, False)):
        if quick:
            calls = max(3, calls // 10)
        X = cm.embeddings(B, d, seed=B)
        # "cpu 1t": the C++ kernel on the calling thread only (threads=1)
        feeds = {b: Feed(K, d, seed=3) for b in ("cpu", "cpu 1t", "numba")}
        outs = {b: (np.empty(B, np.int64), np.empty(B, np.int32)) for b in feeds}
        def call(b, r):
            return r.route_batch(X, out=outs[b], backend=b.split()[0], threads=1 if b == "cpu 1t" else 0)

        for b, f in feeds.items():
            f.router.route_batch(X[:64], backend=b.split()[0])  # compiles the Numba kernel
        mixing = {b: f.router.to_bytes() for b, f in feeds.items()} if restore else {}
        t = {"numpy": [], "cpu": [], "cpu 1t": [], "numba": []}
        regimes = {b: [] for b in feeds}
        ns = time.perf_counter_ns
        rounds = 4
        for _ in range(rounds):
            wait_out_blas()
            for b, f in feeds.items():
                r = f.router
                call(b, r)  # untimed: the block starts warm
                per = np.empty(calls // rounds or 1, dtype=np.int64)
                for c in range(per.size):
                    if restore:
                        r = f.router = slarouter.Router.from_bytes(mixing[b])
                    if c == 0 or restore:
                        regimes[b].append(cm.plan_regime(r))
                    t0 = ns()
                    ids, models = call(b, r)
                    per[c] = ns() - t0
                    keep = min(B, 1024)  # rows still pending: their users may complain
                    f.feedback(ids[-keep:], models[-keep:])
                t[b].append(per)
            cm.numpy_batch(W, X)  # untimed: the block starts warm
            per = np.empty(calls // rounds or 1, dtype=np.int64)
            for c in range(per.size):
                t0 = ns()
                cm.numpy_batch(W, X)
                per[c] = ns() - t0
            t["numpy"].append(per)
        row = {"B": B, "d": d, "K": K, "state": "the steady mix, restored" if restore else "a stream of batches"}
        for b in t:
            s = cm.summary(t[b], overhead)
            s["decisions_per_s"] = B / (s["median_us"] * 1e-6)
            row[b] = s
        row["regimes"] = {b: sorted(set(v)) for b, v in regimes.items()}
        rows.append(row)
        print(f"  throughput B={B} ({row['state']}): done", file=sys.stderr)
    return rows


def peers(quick: bool, overhead: float) -> List[dict]:
    """A route + complain cycle against peers' predict + learn, K = 16, per request."""
    K = 16
    n = 600 if quick else 3000
    rounds = 3 if quick else 6
    out = []
    for features, label in ((("text", 50), "text, 50 words"), (384, "d=384")):
        xs = cm.inputs(features, n, seed=21)
        feed = Feed(K, features, seed=4)
        acc = cm.accuracies(K)
        rng = np.random.default_rng(5)
        ns = time.perf_counter_ns

        def slarouter_cycle(xs=xs, feed=feed):
            r = feed.router
            coins = rng.random((len(xs), 2))
            t = np.empty(len(xs), dtype=np.int64)
            for i, x in enumerate(xs):
                t0 = ns()
                d = r.route(x)
                if coins[i, 0] > acc[d.index] and coins[i, 1] < cm.REPORT_RATE:
                    r.complain(d.request_id)
                t[i] = ns() - t0
            return t

        runners = {"slarouter route + complain": slarouter_cycle}
        vw = _vw_runner(K, features, xs)
        if vw is not None:
            runners["Vowpal Wabbit --cb_explore_adf predict + learn"] = vw
        rv = _river_runner(K, features, xs)
        if rv is not None:
            runners["River LogisticRegression x16 predict_proba_one + learn_one"] = rv
        t: Dict[str, list] = {k: [] for k in runners}
        for _ in range(rounds):
            for k, fn in runners.items():
                t[k].append(fn())
        out.append({"input": label, "K": K, "results": {k: cm.summary(v, overhead) for k, v in t.items()}})
        print(f"  peers {label}: done", file=sys.stderr)
    return out


def _vw_runner(K, features, xs):
    try:
        from vowpalwabbit import pyvw
    except ImportError:
        return None
    vw = pyvw.Workspace("--cb_explore_adf --epsilon 0.1 --quiet")
    shared, actions = cm.vw_examples(features, xs, K)
    rng = np.random.default_rng(6)
    ns = time.perf_counter_ns

    def run():
        t = np.empty(len(xs), dtype=np.int64)
        coins = rng.random(len(xs))
        for i, s in enumerate(shared):
            t0 = ns()
            pmf = vw.predict([s] + actions)
            a = int(np.searchsorted(np.cumsum(pmf), coins[i] * sum(pmf)))
            a = min(a, K - 1)
            lab = actions.copy()
            lab[a] = f"0:{1.0 if coins[i] < 0.2 else 0.0}:{pmf[a]} " + actions[a]
            vw.learn([s] + lab)
            t[i] = ns() - t0
        return t

    return run


def _river_runner(K, features, xs):
    try:
        from river import linear_model
    except ImportError:
        return None
    models = [linear_model.LogisticRegression() for _ in range(K)]
    if isinstance(features, tuple):
        dicts = []
        for x in xs:
            d: Dict[str, float] = {}
            for w in x.split():
                d[w] = d.get(w, 0.0) + 1.0
            dicts.append(d)
    else:
        dicts = [{f"f{j}": float(v) for j, v in enumerate(x)} for x in xs]
    cost = np.array([1.0 + 4.0 * k for k in range(K)]) / (1.0 + 4.0 * (K - 1))
    rng = np.random.default_rng(7)
    ns = time.perf_counter_ns

    def run():
        t = np.empty(len(dicts), dtype=np.int64)
        coins = rng.random(len(dicts))
        for i, x in enumerate(dicts):
            t0 = ns()
            p = [m.predict_proba_one(x).get(True, 0.5) for m in models]
            k = int(np.argmax(np.asarray(p) - cost))
            models[k].learn_one(x, bool(coins[i] < 0.8))
            t[i] = ns() - t0
        return t

    return run


def state_sizes() -> List[dict]:
    rows = []
    for features, label in ((384, "d=384"), (("text", 50), "text (2^18 buckets)")):
        sizes = {}
        for W in (1024, 2048):
            r = slarouter.Router(cm.models(16), cm.SLA, report_rate=cm.REPORT_RATE,
                                 features="text" if isinstance(features, tuple) else features, feedback_window=W)
            for x in cm.inputs(features, 3 * W, seed=1):
                r.route(x)
            sizes[W] = len(r.to_bytes())
        rows.append({"K": 16, "input": label, "bytes": sizes[1024], "per_pending": (sizes[2048] - sizes[1024]) / 1024})
    return rows


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "slarouter": slarouter.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def fmt_table(res: dict) -> str:
    L: List[str] = []
    m = res["machine"]
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, NumPy {m['numpy']}, "
             f"Numba {m['numba']}; load average {res['load_before']} before, {res['load_after']} after; "
             f"timer overhead {res['timer_overhead_ns']:.0f} ns (subtracted).")
    L.append("")
    L.append("### route() and complain(), one request (us; ratio: route median / NumPy median)")
    L.append("")
    L.append("| K | input | route median | route p99 | complain median | complain p99 | NumPy median | NumPy p99 "
             "| route / NumPy | router's rule |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["latency"]:
        ro, co, nu = r["route"], r["complain"], r["numpy"]
        L.append(f"| {r['K']} | {r['input']} | {ro['median_us']:.2f} | {ro['p99_us']:.2f} | {co['median_us']:.2f} | "
                 f"{co['p99_us']:.2f} | {nu['median_us']:.2f} (d={r['numpy_d']}) | {nu['p99_us']:.2f} | "
                 f"{ro['median_us'] / nu['median_us']:.2f} | {r['regime']} |")
    L.append("")
    L.append("### route_batch, d = 384, K = 16 (decisions per second from the median batch time; "
             "ratio: against NumPy's X @ W.T + argmin)")
    L.append("")
    L.append("| B | timed from | NumPy | cpu | cpu, 1 thread | numba | cpu / NumPy | cpu 1 thread / NumPy "
             "| numba / NumPy | median batch time cpu, cpu 1 thread, numba, NumPy (us) | p99 batch time, same order (us) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["throughput"]:
        n, c, c1, b = r["numpy"], r["cpu"], r["cpu 1t"], r["numba"]
        rate = lambda x: x["decisions_per_s"] / n["decisions_per_s"]  # noqa: E731
        L.append(f"| {r['B']} | {r.get('state', '')} | {n['decisions_per_s']:.3g} | {c['decisions_per_s']:.3g} | {c1['decisions_per_s']:.3g} "
                 f"| {b['decisions_per_s']:.3g} | {rate(c):.2f} | {rate(c1):.2f} | {rate(b):.2f} "
                 f"| {c['median_us']:.0f}, {c1['median_us']:.0f}, {b['median_us']:.0f}, {n['median_us']:.0f} "
                 f"| {c['p99_us']:.0f}, {c1['p99_us']:.0f}, {b['p99_us']:.0f}, {n['p99_us']:.0f} |")
    L.append("")
    for r in res["throughput"]:
        regs = sorted({g for v in r["regimes"].values() for g in v})
        L.append(f"Router's rule at the timed batches, B = {r['B']}, {r.get('state', '')}: " + "; ".join(regs) + ".")
        L.append("")
    L.append("")
    L.append("### Learning peers, K = 16, per request (us; ratio: peer mean / slarouter mean)")
    L.append("")
    L.append("| input | what | median | p99 | mean | ratio |")
    L.append("|---|---|---|---|---|---|")
    for r in res["peers"]:
        base = r["results"]["slarouter route + complain"]["mean_us"]
        for k, s in r["results"].items():
            L.append(f"| {r['input']} | {k} | {s['median_us']:.2f} | {s['p99_us']:.2f} | {s['mean_us']:.2f} "
                     f"| {s['mean_us'] / base:.0f}x |")
    L.append("")
    L.append("### State size, K = 16 (len(router.to_bytes()), feedback_window 1024)")
    L.append("")
    L.append("| features | state | per pending request |")
    L.append("|---|---|---|")
    for r in res["state"]:
        L.append(f"| {r['input']} | {r['bytes'] / 2**20:.2f} MiB ({r['bytes']} bytes) | {r['per_pending']:.0f} bytes |")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer calls (a smoke run, not for reporting)")
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--only", nargs="+", choices=["latency", "throughput", "peers", "state"],
                   default=["latency", "throughput", "peers", "state"])
    args = p.parse_args(argv)
    res = {"machine": machine(), "load_before": [round(v, 2) for v in os.getloadavg()]}
    overhead = cm.timer_overhead()
    res["timer_overhead_ns"] = overhead
    res["latency"] = latency(args.quick, overhead) if "latency" in args.only else []
    res["throughput"] = throughput(args.quick, overhead) if "throughput" in args.only else []
    res["peers"] = peers(args.quick, overhead) if "peers" in args.only else []
    res["state"] = state_sizes() if "state" in args.only else []
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    text = fmt_table(res)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
