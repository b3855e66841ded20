"""Replay recorded per-request outcomes through routing policies (docs/replay.md).

Follows the evaluation protocol of the design document: every policy sees the same request
order, the same outcome and complaint coins and the same feedback delays; complaints are
one-sided (only unsatisfied users complain, with probability ``report_rate``) and arrive after
0 to ``max_delay`` later requests.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._defaults import HASH_BITS, MAX_FEATURES
from ._router import Router
from .baselines import messplus, messplus_v, policy_bandit, policy_messplus_best, policy_threshold
from .datasets import Dataset, static_optimum

__all__ = [
    "Stream",
    "RunContext",
    "make_stream",
    "reference_costs",
    "hashed_features",
    "POLICIES",
    "run_policy",
]

LONG_REQUESTS = 20_000
MAX_DELAY = 200


@dataclass
class Stream:
    """One replayed request stream with its random coins (shared by every policy)."""

    benchmark: str
    protocol: str
    seed: int
    rows: np.ndarray  # (T,) dataset row of each step
    u_sat: np.ndarray  # (T,) outcome coin: satisfied iff u_sat < sat[row, model]
    u_report: np.ndarray  # (T,) complaint coin: complaint iff unsatisfied and u_report < rho
    delay: np.ndarray  # (T,) feedback delay in later requests
    u_audit: np.ndarray  # (T,) audit coin: audited iff u_audit < audit_rate
    u_policy: np.ndarray  # (T,) spare coin for randomised baselines

    def __len__(self) -> int:
        return len(self.rows)


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def cost_ratio(runs: Sequence[dict], key: str) -> float:
    """The mean of cost / reference (key "static_optimum_cost" or "certified_optimum_cost") over
    the runs whose reference is not 0 (a free model that meets the SLA makes it 0); NaN when none
    has one."""
    v = [r["cost_per_request"] / r[key] for r in runs if r[key] > 0]
    return float(np.mean(v)) if v else float("nan")


def make_stream(ds: Dataset, benchmark: str, protocol: str, seed: int, requests: Optional[int] = None,
                max_delay: int = MAX_DELAY) -> Stream:
    """The request order and coins of one (benchmark, protocol, seed)."""
    rows = ds.rows(benchmark)
    rng = np.random.default_rng([int(seed), _stable_id(ds.name), _stable_id(benchmark), _stable_id(protocol)])
    if protocol == "short":
        order = rng.permutation(rows)
        if requests is not None:
            order = order[:requests]
    elif protocol == "long":
        order = rng.choice(rows, LONG_REQUESTS if requests is None else requests)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected 'short' or 'long'")
    T = len(order)
    return Stream(
        benchmark=benchmark,
        protocol=protocol,
        seed=int(seed),
        rows=order.astype(np.int32),
        u_sat=rng.random(T),
        u_report=rng.random(T),
        delay=rng.integers(0, max_delay + 1, T).astype(np.int32),
        u_audit=rng.random(T),
        u_policy=rng.random(T),
    )


def certified_alpha(alpha: float, rho: float, n: int, best: float) -> float:
    """alpha' of B_cert: the level complaints alone could certify with 95% confidence."""
    v = 0.0 if rho >= 1.0 else (1 - alpha) * (1 - rho * (1 - alpha)) / rho
    return min(alpha + 1.6448536269514722 * math.sqrt(v / n), best)


def reference_costs(ds: Dataset, benchmark: str, alpha: float, rho: float, n: int) -> Tuple[float, float]:
    """(B, B_cert): the hindsight static optimum and the certifiable static optimum."""
    rows = ds.rows(benchmark)
    acc = ds.sat[rows].mean(axis=0, dtype=np.float64)
    cost = ds.cost[rows].mean(axis=0)
    b, _ = static_optimum(acc, cost, alpha)
    bc, _ = static_optimum(acc, cost, certified_alpha(alpha, rho, n, float(acc.max())))
    return b, bc


def hashed_features(ds: Dataset) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, indices, values) of the engine's hashed-text features of every prompt."""
    idx: List[np.ndarray] = []
    val: List[np.ndarray] = []
    indptr = np.zeros(len(ds.prompts) + 1, dtype=np.int64)
    for i, p in enumerate(ds.prompts):
        a, b = _core.hash_text(p, HASH_BITS, MAX_FEATURES)
        idx.append(a)
        val.append(b)
        indptr[i + 1] = indptr[i] + len(a)
    return indptr, np.concatenate(idx).astype(np.int32), np.concatenate(val).astype(np.float32)


@dataclass
class RunContext:
    """Everything a policy may look at for one run; policies must not peek at hidden fields."""

    ds: Dataset
    stream: Stream
    alpha: float
    report_rate: float
    confidence: float = 0.95
    audit_rate: float = 0.0
    withhold_report_rate: bool = False
    batch: int = 0  # slarouter only: 0 routes each request with route(), B >= 1 batches of B
    features: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
    list_cost: Optional[np.ndarray] = None  # what a user would configure: mean cost per model
    tuning: Optional[Dict[str, float]] = None  # slarouter only: overrides of the engine constants
    extra: Dict[str, object] = field(default_factory=dict)

    def complaints_of(self, model: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(satisfied, complained) of every step given the models served."""
        s = self.stream
        sat = s.u_sat < self.ds.sat[s.rows, model]
        return sat, (~sat) & (s.u_report < self.report_rate)


# A policy maps a context to (model served at each step, extra cost paid at each step or None).
Policy = Callable[[RunContext], Tuple[np.ndarray, Optional[np.ndarray]]]


def policy_slarouter(ctx: RunContext) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    ds = ctx.ds
    models = [(m, float(c)) for m, c in zip(ds.models, ctx.list_cost)]
    router = Router(
        models,
        ctx.alpha,
        report_rate=None if ctx.withhold_report_rate else ctx.report_rate,
        confidence=ctx.confidence,
        seed=ctx.stream.seed,
        tuning=ctx.tuning,
    )
    s = ctx.stream
    model, _, _ = router._replay(
        s.rows, ds.sat, ds.cost, s.u_sat, s.u_report, s.delay, ctx.report_rate,
        u_audit=s.u_audit if ctx.audit_rate > 0 else None, audit_rate=ctx.audit_rate, features=ctx.features,
        batch=ctx.batch,
    )
    return model, None


def policy_oracle(ctx: RunContext) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Knows every label: the cheapest satisfying model per request, while the SLA needs it."""
    s = ctx.stream
    sat = ctx.ds.sat[s.rows] > s.u_sat[:, None]
    cost = ctx.ds.cost[s.rows]
    T = len(s)
    cheapest = np.argmin(cost, axis=1)
    big = np.where(sat, cost, np.inf)
    cheapest_sat = np.where(sat.any(axis=1), np.argmin(big, axis=1), cheapest)
    # Serve the cheapest satisfying model on the cheapest requests to satisfy until alpha is reached;
    # serve the cheapest model on the rest.
    gain = cost[np.arange(T), cheapest_sat] - cost[np.arange(T), cheapest]
    free = sat[np.arange(T), cheapest]
    need = int(math.ceil(ctx.alpha * T - 1e-9)) - int(free.sum())  # (0.81 * 20000 is 16200.000000000002)
    model = cheapest.copy()
    if need > 0:
        cand = np.nonzero(~free & sat.any(axis=1))[0]
        take = cand[np.argsort(gain[cand], kind="stable")[:need]]
        model[take] = cheapest_sat[take]
    return model, None


def policy_random_mix(ctx: RunContext) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """B's mix, told the true accuracies and mean costs, sampled per request."""
    rows = ctx.ds.rows(ctx.stream.benchmark)
    acc = ctx.ds.sat[rows].mean(axis=0, dtype=np.float64)
    cost = ctx.ds.cost[rows].mean(axis=0)
    _, mix = static_optimum(acc, cost, ctx.alpha)
    ks = sorted(mix)
    cum = np.cumsum([mix[k] for k in ks])
    pick = np.searchsorted(cum, ctx.stream.u_policy * cum[-1], side="right")
    return np.asarray(ks, dtype=np.int32)[np.minimum(pick, len(ks) - 1)], None


def always(k: int) -> Policy:
    def policy(ctx: RunContext) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        return np.full(len(ctx.stream), k, dtype=np.int32), None

    return policy


POLICIES: Dict[str, Policy] = {
    "slarouter": policy_slarouter,
    "random-mix": policy_random_mix,
    "oracle": policy_oracle,
    "threshold": policy_threshold,
    "bandit": policy_bandit,
    "mess+": policy_messplus_best,  # best V in hindsight: post-processing of the mess+:V=<v> runs
}


def resolve_policy(name: str, ds: Dataset) -> Policy:
    if name.startswith("always:"):
        m = name.split(":", 1)[1]
        if m not in ds.models:
            raise ValueError(f"unknown model {m!r} in policy {name!r}; models: {ds.models}")
        return always(ds.models.index(m))
    v = messplus_v(name)
    if v is not None:
        return messplus(v)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}, mess+:V=<v> and always:<model>")
    return POLICIES[name]


def run_policy(name: str, ctx: RunContext, trace: bool = False) -> Dict[str, object]:
    """Run one policy on one stream; returns the run record of the JSON output.

    With ``trace=True`` the record also holds ``"trace"``: the running satisfaction after each
    step (float32 array; for plots, not for the JSON output).
    """
    model, extra = resolve_policy(name, ctx.ds)(ctx)
    s = ctx.stream
    sat, complained = ctx.complaints_of(model)
    paid = ctx.ds.cost[s.rows, model]
    if extra is not None:
        paid = paid + extra
    b, bc = reference_costs(ctx.ds, s.benchmark, ctx.alpha, ctx.report_rate, len(s))
    satisfaction = float(sat.mean())
    counts = np.bincount(model, minlength=len(ctx.ds.models))
    record = {
        "benchmark": s.benchmark,
        "alpha": ctx.alpha,
        "report_rate": ctx.report_rate,
        "protocol": s.protocol,
        "seed": s.seed,
        "policy": name,
        "requests": len(s),
        "cost_per_request": float(paid.mean()),
        "static_optimum_cost": b,
        "certified_optimum_cost": bc,
        "satisfaction": satisfaction,
        "sla_met": bool(satisfaction >= ctx.alpha),
        "complaints": int(complained.sum()),
        "share": {m: float(c) / len(s) for m, c in zip(ctx.ds.models, counts)},
    }
    if trace:
        record["trace"] = (np.cumsum(sat) / np.arange(1, len(s) + 1)).astype(np.float32)
    return record
