"""Batches (Router.route_batch, Router.complain_batch) against tests/reference.py, on every backend.

``ReferenceRouter.route_batch`` mirrors the engine's three phases: batch_begin (close the requests
the batch pushes out of the window, refresh if a refresh falls within the batch, freeze the plan and
the generator), one decision per row from the frozen plan (row r takes draws 2r+1 and 2r+2), and
batch_commit (one minibatch AdaGrad step per model for the rows that close within the batch, then
the pending rows). The C++ backend ("cpu") and the Numba backend ("numba", whose kernel sums the gradients of the rows
that close within a batch in the engine's order) must both reproduce it exactly, serialised state
included.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st
from hypothesis.control import currently_in_test_context

import slarouter
from slarouter import DuplicateFeedbackError, Router, UnknownRequestError, _backends, _core
from reference import APPLIED, MIX, UNKNOWN, ReferenceRouter, draw, f32, lane_sum
from test_reference import (SEPS, VOCAB, Engine, assert_estimates_agree, assert_state_agrees, drive,
                            make_router, router_kwargs, status_of)


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------
def prompt(rng: random.Random) -> str:
    return "".join(rng.choice(VOCAB) + rng.choice(SEPS) for _ in range(rng.randint(0, 12)))


def dense_rows(rng: random.Random, B: int, dim: int) -> np.ndarray:
    """B rows: some zero, some seen before (the failure memory's keys recur), most Gaussian at one of
    three scales; float32 or (converted by the API) float64."""
    X = np.zeros((B, dim))
    for r in range(B):
        u = rng.random()
        if u < 0.2:
            X[r] = np.arange(dim) * rng.randint(1, 5)
        elif u > 0.3:
            X[r] = [rng.gauss(0.0, rng.choice([0.1, 1.0, 5.0])) for _ in range(dim)]
    return X if rng.random() < 0.2 else X.astype(np.float32)


def batch_size(rng: random.Random, W: int, t: int) -> int:
    """1, sizes around the window, beyond it, or anything up to three windows (0 once started)."""
    sizes = [1, 1, 2, W - 1, W, W + 1, 2 * W + 1, rng.randint(2, 3 * W)]
    if t > 0:
        sizes.append(0)
    return max(1 if t == 0 else 0, rng.choice(sizes))


class BatchWorld:
    """One random stream of batches, single routes and feedback for an engine router and the
    reference, asserting that they agree after every call.

    Each routed request satisfies its user with the model's true accuracy; unsatisfied users
    complain at the report rate (satisfied ones at the false-complaint rate) after a random delay,
    some late; some requests are audited or have their cost observed. Feedback due is delivered
    after each batch or route, complaints one at a time or through complain_batch.
    """

    def __init__(self, router: Router, ref: ReferenceRouter, kw: Dict[str, Any], stream_seed: int,
                 backend: str) -> None:
        self.router, self.ref, self.kw, self.backend = router, ref, kw, backend
        self.rng = rng = random.Random(stream_seed)
        self.K = len(kw["models"])
        self.W = kw["feedback_window"]
        self.dim = 0 if kw["features"] == "text" else kw["features"]
        self.true_acc = [rng.choice([0.3, 0.6, 0.8, 0.9, 1.0, rng.random()]) for _ in range(self.K)]
        self.rho = kw["report_rate"] if kw["report_rate"] is not None else rng.choice([0.1, 0.3, 0.6, 1.0])
        self.p_cost = rng.choice([0.0, 0.3, 0.9])
        self.max_delay = rng.choice([1, self.W // 2 + 1, self.W + self.W // 2])
        self.p_audit = 0.1
        self.due: Dict[int, List[Tuple[Any, ...]]] = {}
        self.n = 0  # requests routed

    def rows(self, B: int) -> Any:
        if self.dim:
            return dense_rows(self.rng, B, self.dim)
        rows = [prompt(self.rng) for _ in range(B)]
        return tuple(rows) if self.rng.random() < 0.2 else rows

    def costs(self, B: int) -> Optional[np.ndarray]:
        if self.rng.random() >= self.p_cost:
            return None
        base = np.array([m[1] for m in self.kw["models"]])
        return np.array([base * self.rng.uniform(0.0, 2.0) for _ in range(B)]).reshape(B, self.K)

    def outcome(self, rid: int, k: int) -> None:
        rng = self.rng
        satisfied = rng.random() < self.true_acc[k]
        if rng.random() < (self.kw["false_complaint_rate"] if satisfied else self.rho):
            self.due.setdefault(self.n + rng.randint(0, self.max_delay), []).append(("complain", rid))
        if rng.random() < self.p_audit:
            self.due.setdefault(self.n + rng.randint(0, self.W), []).append(("audit", rid, satisfied))
        if rng.random() < 0.05:
            self.due.setdefault(self.n + rng.randint(0, self.W), []).append(("observe_cost", rid, rng.uniform(0, 9)))

    def batch(self, B: Optional[int] = None) -> None:
        if B is None:
            B = batch_size(self.rng, self.W, self.n)
        X = self.rows(B)
        cost = self.costs(B)
        out = None
        if self.rng.random() < 0.2:
            out = (np.full(B, -7, np.int64), np.full(B, -7, np.int32))
        ids, models = self.router.route_batch(X, cost=cost, out=out, backend=self.backend)
        if out is not None:
            assert ids is out[0] and models is out[1]
        assert ids.dtype == np.int64 and models.dtype == np.int32 and ids.shape == models.shape == (B,)
        rids, rmodels = self.ref.route_batch(X, cost)
        assert ids.tolist() == rids and models.tolist() == rmodels, (B, self.n)
        if currently_in_test_context():  # statistics of the property tests
            event(f"backend {self.backend}, {'text' if self.dim == 0 else 'dense'}")
            if B > self.W:
                event("rows closed within a batch")
        for rid, k in zip(rids, rmodels):
            self.n += 1
            self.outcome(rid, k)
        self.check()

    def route(self) -> None:
        x = self.rows(1)[0]
        cost = self.costs(1)
        c = None if cost is None else cost[0].tolist()
        d = self.router.route(x, cost=c)
        assert (d.request_id, d.index) == self.ref.route(x, c)
        self.n += 1
        self.outcome(d.request_id, d.index)

    def feedback(self) -> None:
        ops = [op for when in sorted(self.due) if when <= self.n for op in self.due.pop(when)]
        complaints = [op[1] for op in ops if op[0] == "complain"]
        if complaints and self.rng.random() < 0.5:
            got = self.router.complain_batch(np.array(complaints, np.int64))
            assert got.dtype == np.bool_
            assert got.tolist() == [s == APPLIED for s in self.ref.complain_batch(complaints)]
            ops = [op for op in ops if op[0] != "complain"]
        engine = Engine(self.router)
        for name, *args in ops:
            assert getattr(engine, name)(*args) == getattr(self.ref, name)(*args), (name, args)

    def check(self) -> None:
        assert_estimates_agree(self.router._core.estimates(), self.ref.estimates())
        assert self.router._core.counters() == self.ref.counters()
        assert_state_agrees(self.router, self.ref)


# ---------------------------------------------------------------------------------------------
# (a) Batches against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "numba"])
@settings(max_examples=100, deadline=None)
@given(kw=router_kwargs(), dim=st.sampled_from([2, 8, 9, 19]), stream_seed=st.integers(0, 2**32 - 1),
       n_ops=st.integers(4, 14))
def test_batches_match_the_reference(backend, kw, dim, stream_seed, n_ops):
    if backend == "numba":  # dense features only (see test_route_batch_errors_text)
        kw = dict(kw, features=dim if kw["features"] == "text" else kw["features"])
    router = make_router(kw)
    ref = ReferenceRouter(router.config)
    world = BatchWorld(router, ref, kw, stream_seed, backend)
    for _ in range(n_ops):
        if world.rng.random() < 0.1:  # saving and loading changes no decision
            world.router = Router.from_bytes(world.router.to_bytes())
        if world.rng.random() < 0.6:
            world.batch()
        else:
            for _ in range(world.rng.randint(1, 2 * world.W)):
                world.route()
                world.feedback()
        world.feedback()
    world.check()


def test_batches_take_every_path():
    """Fixed streams on which the batch comparison takes every branch of the decision, refreshes
    inside and between batches, and minibatch steps for rows closing within a batch."""
    seen: Dict[str, int] = {}
    for features, backend in [(5, "cpu"), (5, "numba"), (19, "cpu"), ("text", "cpu")]:
        # The last world: a target above every model's reach with the valve held shut.
        for report_rate, tuning, sla in [(0.5, {"beta": 1.0, "tilt": 2.0, "lr": 0.5}, 0.7), (1.0, {"tilt": 0.0}, 0.8),
                                         (None, {"beta": 1.0, "lr": 0.5, "refresh": 5}, 0.7),
                                         (None, {"valve": 50.0, "refresh": 5}, 0.9)]:
            kw = {"models": [("cheap", 1.0, None), ("mid", 3.0, 0.7), ("dear", 9.0, None), ("same", 9.0, 0.9)],
                  "sla": sla, "report_rate": report_rate, "confidence": 0.9, "features": features, "seed": 1,
                  "feedback_window": 32, "false_complaint_rate": 0.0, "min_report_rate": 0.05, "hash_bits": 7,
                  "tuning": tuning}
            router = make_router(kw)
            ref = ReferenceRouter(router.config)
            world = BatchWorld(router, ref, kw, 7, backend)
            world.true_acc, world.rho, world.max_delay = [0.6, 0.8, 0.95, 0.9], report_rate or 0.5, 8
            for step in range(30):
                if step % 3 == 2:
                    world.batch()
                else:
                    for _ in range(10):
                        world.route()
                        world.feedback()
                world.feedback()
            world.check()
            for name, n in ref.branch_counts.items():
                seen[name] = seen.get(name, 0) + n
    assert set(seen) >= {"valve", "unreachable", "explore", "cheapest", "pair_j", "mix", "mix_tilted"}, seen


@pytest.mark.parametrize("features, backend", [(9, "cpu"), (9, "numba"), ("text", "cpu")])
def test_many_closures_at_once(features, backend):
    """A batch that pushes 64 or more requests out of the window closes them with the predictor
    steps run in parallel by model, all with the report rate in use; audited requests close among
    them (the report rate is estimated from audits here)."""
    kw = {"models": [("a", 1.0, None), ("b", 2.0, 0.7), ("c", 4.0, None), ("d", 8.0, 0.9)], "sla": 0.7,
          "report_rate": None, "confidence": 0.9, "features": features, "seed": 4, "feedback_window": 96,
          "false_complaint_rate": 0.05, "min_report_rate": 0.05, "hash_bits": 9, "tuning": {"lr": 0.5}}
    router = make_router(kw)
    ref = ReferenceRouter(router.config)
    world = BatchWorld(router, ref, kw, 8, backend)
    world.true_acc, world.rho, world.max_delay, world.p_audit = [0.5, 0.7, 0.85, 0.95], 0.6, 40, 0.6
    for _ in range(3):
        for _ in range(150):
            world.route()
            world.feedback()
        before = ref.rho_n
        world.batch(150)  # closes all 96 pending requests first, then 54 rows within the batch
        world.feedback()
        assert ref.rho_n > before  # audited requests closed within the batch's closures
    world.check()


# ---------------------------------------------------------------------------------------------
# (b) A batch of one is route()
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "numba"])
@settings(max_examples=40, deadline=None)
@given(kw=router_kwargs(), stream_seed=st.integers(0, 2**32 - 1), steps=st.integers(20, 150))
def test_a_batch_of_one_is_route(backend, kw, stream_seed, steps):
    if kw["features"] == "text" and backend == "numba":
        kw = dict(kw, features=5)
    single, batched = make_router(kw), make_router(kw)
    rng = random.Random(stream_seed)
    K, dim = len(kw["models"]), 0 if kw["features"] == "text" else kw["features"]
    for _ in range(steps):
        x = prompt(rng) if dim == 0 else dense_rows(rng, 1, dim)[0]
        cost = [rng.uniform(0.0, 5.0) for _ in range(K)] if rng.random() < 0.3 else None
        d = single.route(x, cost=cost)
        X = [x] if dim == 0 else x[None, :]
        ids, models = batched.route_batch(X, cost=None if cost is None else [cost], backend=backend)
        assert (ids.tolist(), models.tolist()) == ([d.request_id], [d.index])
        if rng.random() < 0.5:  # the same feedback to both
            rid = rng.randint(max(0, d.request_id - kw["feedback_window"] - 2), d.request_id)
            sat = rng.random() < 0.5
            for name, args in [("complain", (rid,)), ("audit", (rid, sat))][:rng.randint(1, 2)]:
                assert (status_of(lambda: getattr(single, name)(*args))
                        == status_of(lambda: getattr(batched, name)(*args)))
        assert single.to_bytes() == batched.to_bytes()


# ---------------------------------------------------------------------------------------------
# (c) Text routers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("report_rate, window, tuning", [
    (0.5, 16, {"lr": 0.5, "tilt": 2.0, "beta": 1.0}),
    (None, 8, {"lr": 2.0, "refresh": 3}),
    (1.0, 16, {"lr": 0.0}),
])
def test_text_batches_match_the_reference(report_rate, window, tuning):
    kw = {"models": [("cheap", 1.0, None), ("mid", 3.0, 0.7), ("dear", 9.0, None)], "sla": 0.75,
          "report_rate": report_rate, "confidence": 0.9, "features": "text", "seed": 5, "feedback_window": window,
          "false_complaint_rate": 0.0, "min_report_rate": 0.1, "hash_bits": 18, "tuning": tuning}
    router = make_router(kw)
    ref = ReferenceRouter(router.config)
    world = BatchWorld(router, ref, kw, 3, "cpu")
    rng = random.Random(11)
    long_prompt = " ".join(f"w{i % 89} Word{i % 7}" for i in range(700))  # capped at 1024 features
    for B in [3, 1, 0, window, window + 1, 2 * window + 5, 40, 2, window - 1]:
        rows = [prompt(rng) for _ in range(B)]
        if B > 2:
            rows[0], rows[1], rows[-1] = "", long_prompt, rows[0]  # repeats share buckets in a minibatch step
        rows = tuple(rows) if B % 2 else rows
        ids, models = router.route_batch(rows)
        rids, rmodels = ref.route_batch(rows)
        assert (ids.tolist(), models.tolist()) == (rids, rmodels)
        for rid, k in zip(rids, rmodels):
            world.n += 1
            world.outcome(rid, k)
        world.check()
        world.feedback()
    world.check()


# ---------------------------------------------------------------------------------------------
# (d) complain_batch
# ---------------------------------------------------------------------------------------------
def routed(window: int = 8, n: int = 20, complained=(12,)) -> Tuple[Router, ReferenceRouter]:
    kw = {"models": [("a", 1.0, None), ("b", 4.0, 0.8)], "sla": 0.8, "report_rate": 0.5, "confidence": 0.9,
          "features": 3, "seed": 9, "feedback_window": window, "false_complaint_rate": 0.0,
          "min_report_rate": 0.05, "hash_bits": 8}
    router = make_router(kw)
    ref = ReferenceRouter(router.config)
    X = dense_rows(random.Random(1), n, 3)
    assert router.route_batch(X)[1].tolist() == ref.route_batch(X)[1]
    for rid in complained:
        assert router.complain(rid) and ref.complain(rid) == APPLIED
    return router, ref


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(-3, 24), max_size=6))
def test_complain_batch_matches_the_reference(ids):
    router, ref = routed()  # ids 12..19 open (12 complained about), 0..11 closed, 20.. never issued
    before = router.to_bytes()
    expected = ref.complain_batch(ids)
    if isinstance(expected, tuple):
        status, bad = expected
        error = UnknownRequestError if status == UNKNOWN else DuplicateFeedbackError
        with pytest.raises(error) as info:
            router.complain_batch(ids)
        # The same exception complain() raises for that id.
        if status == UNKNOWN or bad == 12:
            with pytest.raises(error) as single:
                router.complain(bad)
            assert str(info.value) == str(single.value)
        assert router.to_bytes() == before
    else:
        got = router.complain_batch(np.array(ids, dtype=np.int64))
        assert got.dtype == np.bool_ and got.tolist() == [s == APPLIED for s in expected]
        assert router._core.counters() == ref.counters()
        assert_state_agrees(router, ref)


def test_complain_batch_cases():
    router, ref = routed()
    assert router.complain_batch([13, 14]).tolist() == [True, True]
    assert router.complain_batch(np.array([], np.int64)).tolist() == []
    # Closed ids give False (each a late complaint); a closed id may repeat.
    late = router.stats()["late_complaints"]
    assert router.complain_batch([3, 15, 3]).tolist() == [False, True, False]
    assert router.stats()["late_complaints"] == late + 2
    before = router.to_bytes()
    for ids, error, message in [
        ([16, 25], UnknownRequestError, "unknown request id 25"),
        ([-1], UnknownRequestError, "unknown request id -1"),
        ([16, 16], DuplicateFeedbackError, "request 16 already has a complaint"),  # within the batch
        ([16, 13], DuplicateFeedbackError, "request 13 already has a complaint"),  # with an earlier one
        ([30, 17, 17], DuplicateFeedbackError, "request 17"),  # repeats are checked first
        ([30, 13], UnknownRequestError, "unknown request id 30"),  # then ids in order
    ]:
        with pytest.raises(error, match=message):
            router.complain_batch(np.array(ids))
        assert router.to_bytes() == before, ids
    assert router.complain_batch(np.array([16], dtype=np.uint8)).tolist() == [True]
    for bad in ([1.0, 2.0], [[16]], np.array([True])):
        with pytest.raises(TypeError, match="ids must be a 1-D integer array"):
            router.complain_batch(bad)


# ---------------------------------------------------------------------------------------------
# (e) route_batch input errors
# ---------------------------------------------------------------------------------------------
def _x(B: int = 2, dim: int = 3) -> np.ndarray:
    return np.arange(B * dim, dtype=np.float32).reshape(B, dim) / 7


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _aliased() -> Tuple[np.ndarray, np.ndarray]:
    ids = np.empty(2, np.int64)
    return ids, ids.view(np.int32)[:2]  # models written over ids' first element


_X_BUF = np.ones(8, np.float32)  # X is its first six values; a models array over two of them overlaps X

DENSE_ERRORS = [
    (dict(X=_x()[0]), ValueError, r"shape \(B, 3\)"),
    (dict(X=_x(2, 4)), ValueError, r"shape \(B, 3\)"),
    (dict(X=np.ones((2, 3), np.int64)), TypeError, "floating-point"),
    (dict(X=np.where(np.eye(2, 3) > 0, np.nan, 1.0)), ValueError, "NaN"),
    (dict(X=np.full((2, 3), np.inf, np.float32)), ValueError, "NaN or infinite"),
    (dict(X=np.full((2, 3), 1e39)), ValueError, "beyond float32's range"),
    (dict(X=["a b", "c"]), TypeError, "floating-point"),
    (dict(X="a b"), TypeError, "floating-point"),
    (dict(X=_x(), cost=np.ones((2, 3))), ValueError, r"cost must have shape \(B, models\) = \(2, 2\)"),
    (dict(X=_x(), cost=np.ones(2)), ValueError, r"cost must have shape"),
    (dict(X=_x(), cost=-np.ones((2, 2))), ValueError, "cost must be >= 0"),
    (dict(X=_x(), cost=np.full((2, 2), np.nan)), ValueError, "NaN"),
    (dict(X=_x(), cost=[["a", "b"], ["c", "d"]]), TypeError, "cost must be numeric"),
    (dict(X=_x(), out=[np.empty(2, np.int64), np.empty(2, np.int32)]), TypeError, "out must be a tuple"),
    (dict(X=_x(), out=(np.empty(2, np.int32), np.empty(2, np.int32))), ValueError, "out ids must be"),
    (dict(X=_x(), out=(np.empty(2, np.int64), np.empty(3, np.int32))), ValueError, "out models must be"),
    (dict(X=_x(), out=(np.empty(4, np.int64)[::2], np.empty(2, np.int32))), ValueError, "C-contiguous"),
    (dict(X=_x(), out=(_readonly(np.empty(2, np.int64)), np.empty(2, np.int32))), ValueError, "out ids is read-only"),
    (dict(X=_x(), out=(np.empty(2, np.int64), _readonly(np.empty(2, np.int32)))), ValueError, "out models is read-only"),
    (dict(X=_x(), out=_aliased()), ValueError, "out ids and models must not overlap"),
    (dict(X=_X_BUF[:6].reshape(2, 3), out=(np.empty(2, np.int64), _X_BUF[4:6].view(np.int32))), ValueError,
     "out arrays must not overlap X or cost"),
    (dict(X=_x(), backend="gpu"), ValueError, "backend must be one of"),
    (dict(X=_x(), threads=-1), ValueError, "threads must be an int >= 0"),
    (dict(X=_x(), threads=1.5), ValueError, "threads must be an int >= 0"),
    (dict(X=_x(), threads=2**40), ValueError, "threads must be an int >= 0"),
]

TEXT_ERRORS = [
    (dict(X=_x()), TypeError, "every row must be a str"),
    (dict(X="one prompt"), TypeError, "sequence of str"),
    (dict(X=["ok", 3]), TypeError, "row 1 is int"),
    (dict(X=["a", "b"], backend="numba"), ValueError, "dense features only"),
    (dict(X=["a", "b"], cost=np.ones((3, 2))), ValueError, "cost must have shape"),
    (dict(X=["a", "b"], backend="cuda"), ValueError, "backend must be one of"),
    (dict(X={"a": 1, "b": 2}), TypeError, "sequence of str .*got dict"),
    (dict(X={"a", "b"}), TypeError, "sequence of str .*got set"),
]


def _busy(features: Any) -> Router:
    """A router with a refresh due and requests about to close: any phase that ran would show."""
    router = Router([("a", 1.0), ("b", 2.0)], 0.8, report_rate=0.5, features=features, feedback_window=4,
                    tuning={"refresh": 1})
    for r in range(7):
        router.route("p q" if features == "text" else _x(1)[0])
    router.complain(5)
    return router


@pytest.mark.parametrize("backend", ["cpu", "numba"])
@pytest.mark.parametrize("args, error, message", DENSE_ERRORS)
def test_route_batch_errors_dense(args, error, message, backend):
    router = _busy(3)
    args = dict(args)
    args.setdefault("backend", backend)
    before = router.to_bytes()
    with pytest.raises(error, match=message):
        router.route_batch(args.pop("X"), **args)
    assert router.to_bytes() == before


@pytest.mark.parametrize("bad_row, value", [(0, np.nan), (1700, np.inf), (2999, -np.inf), (2900, np.nan)])
def test_large_batch_with_a_bad_row_changes_nothing(bad_row, value):
    """A large batch with one row not finite, in the part that would close within the batch
    (rows 0, 1700) or stay pending (2900, 2999), raises and changes nothing: the state and every
    later decision are those of a router that never saw the call (whose closings, predictor step
    and refresh would all have run)."""
    rng = np.random.default_rng(4)
    d = 96
    router = Router([("a", 1.0), ("b", 3.0), ("c", 9.0)], 0.8, report_rate=0.5, features=d,
                    feedback_window=256, seed=3)
    ids, _ = router.route_batch(rng.standard_normal((700, d)).astype(np.float32))
    for i in ids[-200::9]:
        router.complain(int(i))
    router.audit(int(ids[-5]), False)
    clone = Router.from_bytes(router.to_bytes())
    before = router.to_bytes()
    X = rng.standard_normal((3000, d)).astype(np.float32)
    bad = X.copy()
    bad[bad_row, 17] = value
    for threads in (1, 0):
        with pytest.raises(ValueError, match="NaN or infinite"):
            router.route_batch(bad, backend="cpu", threads=threads)
        assert router.to_bytes() == before
    got, want = router.route_batch(X, backend="cpu"), clone.route_batch(X, backend="cpu")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert router.to_bytes() == clone.to_bytes()


def test_spin_setting_does_not_change_results():
    """SLAROUTER_SPIN_US (how long idle pool threads poll before sleeping) changes timing only;
    a value that is not a non-negative integer is ignored."""
    script = (
        "import hashlib, numpy as np, slarouter\n"
        "X = np.random.default_rng(5).standard_normal((3000, 40)).astype(np.float32)\n"
        "r = slarouter.Router([('a', 1.0), ('b', 4.0)], 0.8, report_rate=0.5, features=40, feedback_window=320)\n"
        "h = hashlib.sha256()\n"
        "for k in range(4):\n"
        "    ids, models = r.route_batch(X, threads=0)\n"
        "    h.update(models.tobytes())\n"
        "    r.complain(int(ids[-7]))\n"
        "print(h.hexdigest(), hashlib.sha256(r.to_bytes()).hexdigest())\n"
    )
    outs = set()
    for spin in ("0", "200", "5000", "-3", "lots"):
        env = dict(os.environ, SLAROUTER_SPIN_US=spin)
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.add(res.stdout)
    assert len(outs) == 1


@pytest.mark.parametrize("features", [48, "text"])
def test_threads_do_not_change_results(features):
    """A batch's result is the same with one thread or one per core, on both CPU backends (the
    sums of the closing rows are chunked by row, not by thread), and the same on both."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3000, 48)).astype(np.float32) if features == 48 else \
        [" ".join(f"w{i}" for i in rng.integers(0, 300, 12)) for _ in range(3000)]
    ends = []
    backends = ("cpu", "numba") if features == 48 else ("cpu",)
    for backend in backends:
        for threads in (1, 0, 3):
            r = Router([("a", 1.0), ("b", 3.0), ("c", 9.0)], 0.8, report_rate=0.5, features=features,
                       feedback_window=256, seed=2)
            for b in range(3):
                ids, models = r.route_batch(X, threads=threads, backend=backend)
                r.complain_batch(ids[-256:][models[-256:] == 0][:50])
            ends.append(r.to_bytes())
    assert all(e == ends[0] for e in ends)


@pytest.mark.parametrize("args, error, message", TEXT_ERRORS)
def test_route_batch_errors_text(args, error, message):
    router = _busy("text")
    args = dict(args)
    before = router.to_bytes()
    with pytest.raises(error, match=message):
        router.route_batch(args.pop("X"), **args)
    assert router.to_bytes() == before


def test_route_batch_text_that_is_not_utf8():
    router = _busy("text")
    before = router.to_bytes()
    with pytest.raises(UnicodeEncodeError):
        router.route("\ud800")
    try:
        with pytest.raises(UnicodeEncodeError):
            router.route_batch(["ok", "\ud800"])
    finally:
        assert router.to_bytes() == before


def test_an_aborted_numba_batch_releases_the_router(monkeypatch):
    """A kernel that fails between batch_begin and batch_commit must not leave the lock held."""
    from slarouter import _kernels

    router = _busy(3)

    def broken(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(_kernels, "_route_rows", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        router.route_batch(_x(), backend="numba")
    monkeypatch.undo()
    assert router.route_batch(_x(), backend="numba")[0].tolist() == [7, 8]
    assert router.route(_x(1)[0]).request_id == 9


COMMIT_ERRORS = [
    (lambda K, D: (np.zeros(1, np.int32), np.zeros(2, np.uint8), np.zeros((2, D), np.float32), None),
     "models must hold the batch's rows"),
    (lambda K, D: (np.zeros(2, np.int32), np.zeros(3, np.uint8), np.zeros((2, D), np.float32), None),
     "explored must hold"),
    (lambda K, D: (np.zeros(2, np.int32), np.zeros(2, np.uint8), np.zeros((1, D), np.float32), None),
     r"tail must have shape \(min\(B, window\), dim\)"),
    (lambda K, D: (np.full(2, K, np.int32), np.zeros(2, np.uint8), np.zeros((2, D), np.float32), None),
     "model index out of range"),
    (lambda K, D: (np.zeros(2, np.int32), np.zeros(2, np.uint8), np.zeros((2, D), np.float32),
                   np.zeros((K, D), np.float32)), "C-contiguous float64"),
    (lambda K, D: (np.zeros(2, np.int32), np.zeros(2, np.uint8), np.zeros((2, D), np.float32),
                   np.zeros((K, D + 1))), r"grad must have shape \(models, dim\)"),
]


@pytest.mark.parametrize("args, message", COMMIT_ERRORS)
def test_the_numba_commit_checks_its_input(args, message):
    """batch_commit, the Numba backend's last phase: bad input raises, releases the router's lock and
    changes nothing (a two-row batch within a window of four: no row closes, so grad may be None)."""
    router = _busy(3)
    aborted = Router.from_bytes(router.to_bytes())
    aborted._core.batch_begin(2)
    aborted._core.batch_abort()
    router._core.batch_begin(2)
    with pytest.raises(ValueError, match=message):
        router._core.batch_commit(*args(2, 3))
    assert router.to_bytes() == aborted.to_bytes()
    assert router.route(_x(1)[0]).request_id == 7  # the lock is free


def test_a_held_batch_belongs_to_its_thread():
    """Only the thread that began a batch can commit or abort it: another thread's batch_abort is a
    no-op, and its batch_commit raises, both without touching the held lock."""
    import threading

    router = _busy(3)
    router._core.batch_begin(2)
    seen = []

    def other():
        router._core.batch_abort()
        try:
            router._core.batch_commit(np.zeros(2, np.int32), np.zeros(2, np.uint8), _x(), None)
        except RuntimeError as e:
            seen.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == ["batch_commit without batch_begin"]
    router._core.batch_commit(np.zeros(2, np.int32), np.zeros(2, np.uint8), _x(), None)
    assert router.route(_x(1)[0]).request_id == 9


# ---------------------------------------------------------------------------------------------
# (f) The GPU backend without CuPy
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_cupy_backend_without_cupy_raises():
    assert _backends.BackendUnavailableError is slarouter.BackendUnavailableError
    router = _busy(3)
    before = router.to_bytes()
    for X in (_x(), _x().tolist()):
        with pytest.raises(_backends.BackendUnavailableError, match="CuPy"):
            router.route_batch(X, backend="cupy")
    assert router.to_bytes() == before
    text = _busy("text")
    with pytest.raises(ValueError, match="dense features only"):  # before looking for CuPy
        text.route_batch(["a", "b"], backend="cupy")


# ---------------------------------------------------------------------------------------------
# Kernels against the reference
# ---------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(state=st.integers(0, 2**64 - 1), i=st.integers(1, 10**6))
def test_draws_match(state, i):
    assert _core.Router.uniform_draw(state, i) == draw(state, i)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(0, 80))
def test_numba_lane_dot_matches_the_reference(data, n):
    from slarouter import _kernels

    floats = st.floats(-1e6, 1e6, width=32) | st.sampled_from([0.0, 1.0, -1.0, 1e20, -1e20])
    a = np.array(data.draw(st.lists(floats, min_size=n, max_size=n)), np.float32)
    b = np.array(data.draw(st.lists(floats, min_size=n, max_size=n)), np.float32)
    # float32 products of 1e20 overflow: both give the same infinity, or both NaN
    got = _kernels._lane_dot(a, b, -1.0)
    want = lane_sum([f32(float(u) * float(v)) for u, v in zip(a, b)], single=True)
    assert got == want or (np.isnan(got) and np.isnan(want))
    g = np.abs(a)
    assert _kernels._lane_dot(g, b, 0.5) == lane_sum([float(v) * float(v) / (0.5 + float(u)) for u, v in zip(g, b)])


# ---------------------------------------------------------------------------------------------
# Engine bugs and backend mismatches found by these tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("features, backend", [(3, "cpu"), (3, "numba"), ("text", "cpu")])
def test_an_empty_batch_on_a_fresh_router(features, backend):
    """An empty batch routes nothing and changes nothing, even before the first request (it once
    crashed reading the never-computed frontier; run in a subprocess so a crash fails the test)."""
    X = "np.zeros((0, 3), np.float32)" if features == 3 else "[]"
    code = textwrap.dedent(f"""
        import numpy as np
        from slarouter import Router
        router = Router([("a", 1.0), ("b", 2.0)], 0.8, features={features!r}, report_rate=0.5)
        before = router.to_bytes()
        print("ready", flush=True)
        ids, models = router.route_batch({X}, backend={backend!r})
        assert ids.shape == models.shape == (0,) and router.to_bytes() == before
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(slarouter.__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    if "ready" not in proc.stdout:  # not the batch: the child could not even start
        raise RuntimeError(proc.stderr[-2000:])
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


def test_numba_backend_clips_the_false_complaint_rate():
    """Rows closing within a batch step with the engine's gradient, whose false-complaint rate is
    min(rho_false, rho / 2) (batch_begin handed the kernels the unclipped rate before 40d129f)."""
    kw = {"models": [("a", 1.0, None), ("b", 3.0, None)], "sla": 0.8, "report_rate": 0.2, "confidence": 0.95,
          "features": 4, "seed": 3, "feedback_window": 8, "false_complaint_rate": 0.15, "min_report_rate": 0.05,
          "hash_bits": 8}
    router = make_router(kw)
    ref = ReferenceRouter(router.config)
    X = dense_rows(random.Random(0), 20, 4)
    assert router.route_batch(X, backend="numba")[1].tolist() == ref.route_batch(X)[1]
    assert_state_agrees(router, ref)


def test_decisions_on_cancelling_features():
    """Rows whose dot product with model i's weights cancels: (4097, 16785409) . (4097, -1) is 1 in
    exact arithmetic and 0 in float32 (4097 * 4097 rounds to 16785408, and so does 16785409), which
    every backend computes: all of them must tilt the mix alike."""
    kw = {"models": [("cheap", 1.0, None), ("mid", 3.0, 0.7), ("dear", 9.0, None), ("same", 9.0, 0.9)],
          "sla": 0.7, "report_rate": 0.5, "confidence": 0.9, "features": 4, "seed": 1, "feedback_window": 64,
          "false_complaint_rate": 0.0, "min_report_rate": 0.05, "hash_bits": 7, "tuning": {"tilt": 2.0, "lr": 0.0}}
    B = 60
    router = make_router(kw)
    ref = ReferenceRouter(router.config)

    class Found(Exception):
        pass

    def stop_at_a_tilted_mix(step: int) -> None:
        plan = copy.deepcopy(ref).batch_begin(B).plan
        if plan.regime == MIX and 0.0 < plan.w < 1.0:
            raise Found(plan)

    with pytest.raises(Found) as found:  # the world of test_every_decision_branch_is_compared
        drive([Engine(router), ref], kw, 7, 500, after_each=stop_at_a_tilted_mix, true_acc=[0.6, 0.8, 0.95, 0.9],
              rho=0.5, p_route=0.8, max_delay=8, p_cost_estimate=0.5, p_audit=0.2)
    probe = found.value.args[0]
    ref.weights[:] = 0.0  # model j scores 0; model i scores 0 in float32 (1 in exact arithmetic)
    ref.weights[probe.i * 4:probe.i * 4 + 2] = [4097.0, -1.0]
    router._core.load_state(ref.save_state())
    numba = Router.from_bytes(router.to_bytes())
    X = np.tile(np.array([4097.0, 16785409.0, 0.0, 0.0], np.float32), (B, 1))
    expected = ref.route_batch(X)[1]
    assert router.route_batch(X, backend="cpu")[1].tolist() == expected
    assert numba.route_batch(X, backend="numba")[1].tolist() == expected
