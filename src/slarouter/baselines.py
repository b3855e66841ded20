"""Baseline routing policies of the replay harness (docs/replay.md, "Baselines").

- ``mess+:V=<v>``: MESS+ with full feedback (exploration rounds query every model and pay for all).
- ``threshold``: RouteLLM-style, predictor trained offline on a labelled split, frozen threshold.
- ``bandit``: contextual epsilon-greedy on complaint-only feedback with a Lagrangian reward.

Each policy has the signature of ``slarouter.replay.policy_slarouter``: it takes a ``RunContext``
and returns (model index per step as int32, extra cost per step or None). They use only what a
deployment of that baseline would know, and all their randomness comes from the stream's coins or
from a generator seeded by the stream's seed. Text features are the engine's own hashed featurizer
(``RunContext.features``). The sequential loops are Numba kernels in ``slarouter._kernels``,
imported on first use.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._defaults import FEEDBACK_WINDOW, MIN_REPORT_RATE

if TYPE_CHECKING:  # pragma: no cover
    from .datasets import Dataset
    from .replay import Policy, RunContext

__all__ = [
    "MESS_V_GRID",
    "messplus",
    "messplus_name",
    "messplus_v",
    "messplus_run",
    "policy_threshold",
    "policy_bandit",
    "fit_threshold",
    "ThresholdRouter",
    "best_v",
]

# --- constants: one configuration for every dataset (docs/replay.md explains each) ---------------
ONLINE_LR = 0.2
"""AdaGrad step size of the online predictors (mess+, bandit); accumulators start at ADAGRAD_G0."""
OFFLINE_LR = 0.1
"""AdaGrad step size of the threshold router's offline fit (THRESHOLD_EPOCHS passes over the split)."""
ADAGRAD_G0 = 1.0

MESS_V_GRID: Tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
"""The V values replayed for MESS+; ``mess+`` reports the best of them in hindsight."""
MESS_C = 1.0
MESS_KAPPA = 0.5
"""Exploration probability of MESS+ at step t (1-based): min(1, MESS_C * t ** -MESS_KAPPA)."""

THRESHOLD_SPLIT = 0.25
"""Share of a benchmark's distinct rows the threshold router is trained and calibrated on."""
THRESHOLD_EPOCHS = 3
THRESHOLD_FOLDS = 5
"""Theta is calibrated on out-of-fold predictions of the split's rows (THRESHOLD_FOLDS-fold cross-fitting)."""
THRESHOLD_CANDIDATES = 1024

BANDIT_EPS_C = 1.0
BANDIT_EPS_POW = 1.0 / 3.0
"""Exploration probability of the bandit at step t (1-based): min(1, BANDIT_EPS_C * t ** -BANDIT_EPS_POW)."""
BANDIT_ETA = 0.2
"""Dual step size of the bandit's Lagrange multiplier (price of one unit of satisfaction deficit)."""
BANDIT_ASSUMED_RATE = MIN_REPORT_RATE
"""Report rate the bandit assumes when the true one is withheld."""


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


# --- per-benchmark features, compacted ----------------------------------------------------------
class _Bench:
    """One benchmark's rows, CSR features (column ids compacted) and satisfaction matrix."""

    def __init__(self, ds: "Dataset", features: Tuple[np.ndarray, np.ndarray, np.ndarray], benchmark: str):
        indptr, indices, values = features
        self.rows = ds.rows(benchmark)
        lo, hi = indptr[self.rows], indptr[self.rows + 1]
        lens = (hi - lo).astype(np.int64)
        self.indptr = np.zeros(len(self.rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=self.indptr[1:])
        take = np.repeat(lo - self.indptr[:-1], lens) + np.arange(self.indptr[-1], dtype=np.int64)
        cols, inv = np.unique(indices[take], return_inverse=True)
        self.indices = np.ascontiguousarray(inv.reshape(-1), dtype=np.int32)
        self.values = np.ascontiguousarray(values[take], dtype=np.float64)
        self.n_features = max(1, len(cols))
        self.sat = np.ascontiguousarray(ds.sat[self.rows], dtype=np.float64)
        self.cost = ds.cost[self.rows]

    def local(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.rows, rows).astype(np.int32)

    def predict(self, w: np.ndarray, b: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """(len(rows), K) sigmoid(w[:, k] . x + b[k]) of the given local rows (default: all)."""
        if rows is None:
            indptr, indices, values = self.indptr, self.indices, self.values
        else:
            lo, hi = self.indptr[rows], self.indptr[rows + 1]
            lens = hi - lo
            take = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()), dtype=np.int64)
            indptr = np.concatenate([[0], np.cumsum(lens)])
            indices, values = self.indices[take], self.values[take]
        n = len(indptr) - 1
        owner = np.repeat(np.arange(n), np.diff(indptr))
        z = np.empty((n, len(b)))
        for k in range(len(b)):
            z[:, k] = b[k] + np.bincount(owner, weights=w[indices, k] * values, minlength=n)
        return 0.5 * (1.0 + np.tanh(0.5 * z))


_FEATURES: Dict[str, object] = {}
_BENCH: Dict[str, object] = {}


def _features(ctx: "RunContext") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    if ctx.features is not None:
        return ctx.features
    if _FEATURES.get("ds") is not ctx.ds:
        from .replay import hashed_features

        _FEATURES.clear()
        _FEATURES.update(ds=ctx.ds, features=hashed_features(ctx.ds))
    return _FEATURES["features"]  # type: ignore[return-value]


def _bench(ctx: "RunContext") -> _Bench:
    feats = _features(ctx)
    if _BENCH.get("ds") is not ctx.ds or _BENCH.get("indices") is not feats[1]:
        _BENCH.clear()
        _BENCH.update(ds=ctx.ds, indices=feats[1], by_name={})
    by_name: Dict[str, _Bench] = _BENCH["by_name"]  # type: ignore[assignment]
    name = ctx.stream.benchmark
    if name not in by_name:
        by_name[name] = _Bench(ctx.ds, feats, name)
    return by_name[name]


def _normalised_cost(ctx: "RunContext") -> np.ndarray:
    """List cost divided by the largest model's: what a user configures, scale-free."""
    c = np.asarray(ctx.list_cost if ctx.list_cost is not None else ctx.ds.cost.mean(axis=0), dtype=np.float64)
    top = float(c.max())
    return np.ascontiguousarray(c / top if top > 0 else np.zeros_like(c))


# --- MESS+ ---------------------------------------------------------------------------------------
def messplus_name(v: float) -> str:
    return f"mess+:V={v:g}"


def messplus_v(name: str) -> Optional[float]:
    """V of a policy name ``mess+:V=<v>``; None for other names. Raises ValueError on a bad V."""
    if not name.startswith("mess+:"):
        return None
    spec = name.split(":", 1)[1]
    if not spec.startswith("V="):
        raise ValueError(f"policy {name!r}: expected mess+:V=<v>, e.g. {messplus_name(MESS_V_GRID[0])}")
    try:
        v = float(spec[2:])
    except ValueError:
        raise ValueError(f"policy {name!r}: V must be a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"policy {name!r}: V must be positive and finite")
    return v


_MESS_CACHE: Dict[str, object] = {}


def messplus_run(ctx: "RunContext", V: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model, extra cost, exploration flag) of MESS+ at this V on ctx's stream.

    MESS+ sees full labels, not complaints, so its run does not depend on the report rate: the
    result is cached per (stream, alpha, V) and reused for every report rate of the same stream.
    """
    s = ctx.stream
    if _MESS_CACHE.get("stream") is not s or _MESS_CACHE.get("ds") is not ctx.ds:
        _MESS_CACHE.clear()
        _MESS_CACHE.update(stream=s, ds=ctx.ds, runs={})
    runs: Dict[tuple, tuple] = _MESS_CACHE["runs"]  # type: ignore[assignment]
    cnorm = _normalised_cost(ctx)
    key = (float(ctx.alpha), float(V), cnorm.tobytes(), id(_features(ctx)[1]))
    if key not in runs:
        from . import _kernels

        bench = _bench(ctx)
        lrows = bench.local(s.rows)
        T = len(s)
        model = np.empty(T, dtype=np.int32)
        explore = np.zeros(T, dtype=np.uint8)
        explore_model = int(np.argmax(cnorm))  # the largest (most expensive) model answers
        _kernels._messplus(lrows, np.ascontiguousarray(s.u_sat, np.float64),
                           np.ascontiguousarray(s.u_policy, np.float64), bench.indptr, bench.indices,
                           bench.values, int(bench.n_features), bench.sat, cnorm, float(ctx.alpha), float(V),
                           float(MESS_C), float(MESS_KAPPA), explore_model, float(ONLINE_LR),
                           float(ADAGRAD_G0), model, explore)
        cost = bench.cost[lrows]
        extra = np.where(explore.astype(bool), cost.sum(axis=1) - cost[np.arange(T), model], 0.0)
        runs[key] = (model, extra, explore.astype(bool))
    model, extra, explore = runs[key]
    return model.copy(), extra.copy(), explore.copy()


def messplus(V: float) -> "Policy":
    """The MESS+ policy at a fixed V (policy name ``mess+:V=<v>``)."""

    def policy(ctx: "RunContext") -> Tuple[np.ndarray, Optional[np.ndarray]]:
        model, extra, _ = messplus_run(ctx, V)
        return model, extra

    policy.__name__ = f"policy_messplus_V{V:g}"
    return policy


def policy_messplus_best(ctx: "RunContext") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    raise ValueError("policy 'mess+' is MESS+ with V chosen in hindsight over seeds: it is produced by "
                     "post-processing the mess+:V=<v> runs (slarouter replay does this); run one "
                     "mess+:V=<v> policy directly instead")


# --- RouteLLM-style threshold router ------------------------------------------------------------
_THRESH_CACHE: Dict[str, object] = {}


def _threshold_model(ctx: "RunContext") -> dict:
    """Offline part of the threshold router for (benchmark, seed): split, predictor, theta curve."""
    bench = _bench(ctx)
    if _THRESH_CACHE.get("bench") is not bench:
        _THRESH_CACHE.clear()
        _THRESH_CACHE.update(bench=bench, fits={})
    fits: Dict[tuple, dict] = _THRESH_CACHE["fits"]  # type: ignore[assignment]
    cost_order = np.argsort(_normalised_cost(ctx), kind="stable")
    key = (ctx.stream.seed, cost_order.tobytes())
    if key in fits:
        return fits[key]
    from . import _kernels

    n = len(bench.rows)
    rng = np.random.default_rng([int(ctx.stream.seed), _stable_id(ctx.ds.name), _stable_id(ctx.stream.benchmark),
                                 _stable_id("threshold")])
    n_split = max(1, int(round(THRESHOLD_SPLIT * n)))
    split = np.sort(rng.choice(n, n_split, replace=False)).astype(np.int32)
    m0 = np.clip(bench.sat[split].mean(axis=0), 1e-3, 1 - 1e-3)  # intercepts start at the split's accuracy
    b0 = np.log(m0 / (1 - m0))

    def fit(train: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        order = np.concatenate([rng.permutation(train) for _ in range(THRESHOLD_EPOCHS)]).astype(np.int32)
        w, b = _kernels._logreg_fit(order, bench.indptr, bench.indices, bench.values, int(bench.n_features),
                                    bench.sat, b0, float(OFFLINE_LR), float(ADAGRAD_G0))
        return bench.predict(w, b, rows)

    pred = fit(split)  # the deployed predictor, on every row of the benchmark
    # Calibration predictions of the split's rows: out-of-fold (cross-fitted), so that theta is not
    # calibrated on predictions that have memorised the very labels they are scored against.
    if THRESHOLD_FOLDS > 1 and n_split >= THRESHOLD_FOLDS:
        sp = np.empty((n_split, pred.shape[1]))
        fold = rng.permutation(n_split) % THRESHOLD_FOLDS
        for f in range(THRESHOLD_FOLDS):
            sp[fold == f] = fit(split[fold != f], split[fold == f])
    else:
        sp = pred[split]
    # Candidate thresholds: (up to THRESHOLD_CANDIDATES quantiles of) the split's predicted values,
    # plus +inf (every request goes to its highest prediction).
    cand = np.unique(sp)
    if len(cand) > THRESHOLD_CANDIDATES:
        cand = cand[np.linspace(0, len(cand) - 1, THRESHOLD_CANDIDATES).round().astype(np.int64)]
    thetas = np.append(cand, np.inf)
    choice = _threshold_choice(sp[None, :, :], thetas[:, None, None], cost_order)  # (n_theta, n_split)
    rows = np.arange(n_split)[None, :]
    sat_curve = bench.sat[split][rows, choice].mean(axis=1)
    cost_curve = bench.cost[split][rows, choice].mean(axis=1)
    out = dict(split=split, pred=pred, split_pred=sp, thetas=thetas, sat=sat_curve, cost=cost_curve,
               cost_order=cost_order)
    fits[key] = out
    return out


def _threshold_choice(pred: np.ndarray, theta, cost_order: np.ndarray) -> np.ndarray:
    """Cheapest model (in cost_order) with pred >= theta, else the highest prediction."""
    ok = pred[..., cost_order] >= theta
    first = cost_order[np.argmax(ok, axis=-1)]
    return np.where(ok.any(axis=-1), first, np.argmax(pred, axis=-1)).astype(np.int32)


@dataclass(frozen=True)
class ThresholdRouter:
    """The frozen threshold router of one (benchmark, seed, alpha), see ``fit_threshold``."""

    theta: float
    pred: np.ndarray  # (rows of the benchmark, K) deployed predictor's satisfaction estimates
    split: np.ndarray  # positions in ds.rows(benchmark) of the labelled training/calibration rows
    split_pred: np.ndarray  # (len(split), K) the out-of-fold predictions theta was calibrated on
    cost_order: np.ndarray  # models from cheapest to dearest (by list cost)
    split_satisfaction: float  # mean satisfaction on the split of routing split_pred at theta

    def route(self, pred: np.ndarray) -> np.ndarray:
        """Cheapest model with predicted satisfaction >= theta, else the highest prediction."""
        return _threshold_choice(pred, self.theta, self.cost_order)


def fit_threshold(ctx: "RunContext") -> ThresholdRouter:
    """The threshold router of ctx, trained and calibrated offline on a labelled split, then frozen.

    theta is the cheapest (by the split's mean cost) candidate whose routing of the split meets
    alpha on the split, or when none does, the one with the highest satisfaction on the split.
    """
    fit = _threshold_model(ctx)
    ok = fit["sat"] >= ctx.alpha
    if ok.any():
        i = int(np.flatnonzero(ok)[np.argmin(fit["cost"][ok])])
    else:
        i = int(np.argmax(fit["sat"]))
    return ThresholdRouter(theta=float(fit["thetas"][i]), pred=fit["pred"], split=fit["split"],
                           split_pred=fit["split_pred"], cost_order=fit["cost_order"],
                           split_satisfaction=float(fit["sat"][i]))


def policy_threshold(ctx: "RunContext") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """RouteLLM-style: offline predictor and threshold calibrated on a labelled split, then frozen."""
    router = fit_threshold(ctx)
    # The stream holds the split's rows too (the short protocol replays every row, the long one
    # draws from all rows): they are scored with their out-of-fold predictions, as a request the
    # deployed predictor never saw would be, not with predictions that memorised their labels.
    pred = router.pred.copy()
    pred[router.split] = router.split_pred
    return router.route(pred[_bench(ctx).local(ctx.stream.rows)]), None


# --- contextual bandit --------------------------------------------------------------------------
def policy_bandit(ctx: "RunContext") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Contextual epsilon-greedy with a cost/complaint Lagrangian reward, complaint-only feedback."""
    from . import _kernels

    s = ctx.stream
    bench = _bench(ctx)
    rho_assumed = BANDIT_ASSUMED_RATE if ctx.withhold_report_rate else float(ctx.report_rate)
    model = np.empty(len(s), dtype=np.int32)
    _kernels._bandit(bench.local(s.rows), np.ascontiguousarray(s.u_sat, np.float64),
                     np.ascontiguousarray(s.u_report, np.float64), np.ascontiguousarray(s.delay, np.int32),
                     np.ascontiguousarray(s.u_policy, np.float64), bench.indptr, bench.indices, bench.values,
                     int(bench.n_features), bench.sat, _normalised_cost(ctx), float(ctx.alpha),
                     float(ctx.report_rate), float(rho_assumed), int(FEEDBACK_WINDOW), float(BANDIT_EPS_C),
                     float(BANDIT_EPS_POW), float(BANDIT_ETA), float(ONLINE_LR), float(ADAGRAD_G0), model)
    return model, None


# --- best V in hindsight ------------------------------------------------------------------------
def best_v(runs: Sequence[dict], grid: Optional[Sequence[float]] = None) -> Dict[tuple, float]:
    """Per (benchmark, protocol, report_rate): the V of MESS+ chosen in hindsight.

    Among the ``mess+:V=<v>`` runs of a group, a V qualifies when for every alpha its mean
    satisfaction over seeds is >= alpha; the qualifying V with the lowest mean cost per request is
    chosen (ties: the smaller V); if none qualifies, the V with the highest mean satisfaction
    (ties: the smaller V). ``grid`` restricts the candidates (default: every V among the runs).
    """
    allowed = None if grid is None else {float(v) for v in grid}
    groups: Dict[tuple, Dict[float, List[dict]]] = {}
    for r in runs:
        v = messplus_v(r["policy"])
        if v is None or (allowed is not None and v not in allowed):
            continue
        groups.setdefault((r["benchmark"], r["protocol"], r["report_rate"]), {}).setdefault(v, []).append(r)
    chosen: Dict[tuple, float] = {}
    for g, by_v in groups.items():
        ok: List[Tuple[float, float]] = []
        fallback: List[Tuple[float, float]] = []
        for v in sorted(by_v):
            rs = by_v[v]
            alphas: Dict[float, List[float]] = {}
            for r in rs:
                alphas.setdefault(r["alpha"], []).append(r["satisfaction"])
            if all(np.mean(sats) >= a for a, sats in alphas.items()):
                ok.append((float(np.mean([r["cost_per_request"] for r in rs])), v))
            fallback.append((-float(np.mean([r["satisfaction"] for r in rs])), v))
        chosen[g] = min(ok)[1] if ok else min(fallback)[1]
    return chosen
