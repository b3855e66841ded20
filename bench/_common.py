"""What the benchmarks share: routers in a steady state, inputs, the references and the timer.

Used by the pytest-benchmark files of this folder and by bench/report.py (bench/README.md).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, List, Sequence

import numpy as np

import slarouter

SLA = 0.8
REPORT_RATE = 0.3
VOCABULARY = 5000


def models(K: int) -> List[tuple]:
    """K models whose costs grow with their accuracy (see accuracies)."""
    return [(f"m{k}", 1.0 + 4.0 * k) for k in range(K)]


def accuracies(K: int) -> np.ndarray:
    return np.linspace(0.55, 0.95, K)


def prompts(n: int, words: int, seed: int = 0) -> List[str]:
    """n prompts of ``words`` words drawn from a Zipf-like vocabulary."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, VOCABULARY + 1)
    p /= p.sum()
    ids = rng.choice(VOCABULARY, size=(n, words), p=p)
    return [" ".join(f"w{i}" for i in row) for row in ids]


def embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n unit-norm float32 embeddings of dimension d."""
    X = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


def require_cuda(script: str) -> None:
    """Exit with one line unless CuPy imports and sees a CUDA device (the GPU scripts need both)."""
    try:
        import cupy
    except ImportError:
        raise SystemExit(f"{script} needs CuPy and a CUDA device: pip install cupy-cuda12x (DEVELOPERS.md, "
                         "'GPU check')") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or CuPy built for another CUDA
        raise SystemExit(f"{script} needs a CUDA device; CuPy found none ({type(e).__name__}: {e})") from None
    if n < 1:
        raise SystemExit(f"{script} needs a CUDA device; CuPy found none")


def device_batch(xp, B: int, d: int):
    """B unit-norm float32 rows of dimension d as an ``xp`` (CuPy) array: 65,536 distinct rows,
    repeated (the GPU benchmarks)."""
    X = xp.asarray(embeddings(min(B, 65536), d, seed=1))
    X = xp.concatenate([X] * (B // X.shape[0]) + [X[: B % X.shape[0]]]) if B > X.shape[0] else X
    return xp.ascontiguousarray(X)


def inputs(features, n: int, seed: int = 0) -> list:
    """n requests for a router: rows of embeddings (features=d) or prompts (features=("text", words))."""
    if isinstance(features, tuple):
        return prompts(n, features[1], seed)
    return list(embeddings(n, features, seed))


def steady_router(K: int, features, warm: int = 4000, seed: int = 0, tuning=None) -> slarouter.Router:
    """A router that has served ``warm`` requests with complaints (report rate 0.3) from users of
    models of accuracies 0.55..0.95: past its first feedback windows, mixing two models."""
    rng = np.random.default_rng(seed + 1)
    r = slarouter.Router(models(K), SLA, report_rate=REPORT_RATE,
                         features="text" if isinstance(features, tuple) else features, seed=seed, tuning=tuning)
    acc = accuracies(K)
    for x in inputs(features, warm, seed + 2):
        d = r.route(x)
        if rng.random() > acc[d.index] and rng.random() < REPORT_RATE:
            r.complain(d.request_id)
    return r


def next_plan(r: slarouter.Router) -> dict:
    """The plan of the router's next decision (Router.batch_begin), without changing the router."""
    c = slarouter.Router.from_bytes(r.to_bytes())
    p = c._core.batch_begin(1)
    c._core.batch_abort()
    return p


def plan_regime(r: slarouter.Router) -> str:
    """Which rule the router's next decision uses (without changing the router)."""
    p = next_plan(r)
    if p["regime"] == 2:
        return f"mix of m{p['i']} and m{p['j']} (w={p['w']:.2f})"
    return {0: "serve the most accurate", 1: "serve the cheapest"}[p["regime"]]


def vw_examples(features, xs: Sequence, K: int):
    """Vowpal Wabbit --cb_explore_adf text for the inputs: one shared line per request and the K
    action lines (model names and list costs), as both the report and the benchmark feed it."""
    if isinstance(features, tuple):
        shared = [f"shared |s {x}" for x in xs]
    else:
        shared = ["shared |s " + " ".join(f"{j}:{v:.6f}" for j, v in enumerate(x)) for x in xs]
    actions = [f"|a m{k} cost:{1.0 + 4.0 * k}" for k in range(K)]
    return shared, actions


def numpy_decision(W: np.ndarray, x: np.ndarray) -> int:
    """The reference single decision: one score per model, then the best."""
    return int(np.argmin(W @ x))


def numpy_batch(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The reference batch: one matrix product, then the best model of each row."""
    return np.argmin(X @ W.T, axis=1)


# ------------------------------------------------------------------------------------------------
# Timing individual calls.

_ns = time.perf_counter_ns


def timer_overhead(n: int = 20000) -> float:
    """Median cost of the two timer reads around a call, in ns (subtracted from every sample)."""
    t = np.empty(n, dtype=np.int64)
    for i in range(n):
        t0 = _ns()
        t[i] = _ns() - t0
    return float(np.median(t))


def time_calls(fn: Callable, args: Sequence) -> np.ndarray:
    """ns of each call fn(a) for a in args (timer overhead not subtracted)."""
    out = np.empty(len(args), dtype=np.int64)
    for i, a in enumerate(args):
        t0 = _ns()
        fn(a)
        out[i] = _ns() - t0
    return out


def summary(samples_ns: Iterable[np.ndarray], overhead: float) -> dict:
    s = np.concatenate(list(samples_ns)).astype(np.float64) - overhead
    return {"median_us": float(np.median(s)) / 1e3, "p99_us": float(np.percentile(s, 99)) / 1e3,
            "mean_us": float(s.mean()) / 1e3, "n": int(s.size)}
