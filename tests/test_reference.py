"""The C++ core against tests/reference.py: the same decisions on random streams.

Every test builds a ``slarouter.Router`` and, where it compares, a ``ReferenceRouter`` from the
router's own ``config`` dict, then drives both with one random stream: routes (prompts from a small
vocabulary or dense vectors, sometimes with per-request cost estimates), complaints after random
delays (some arriving after the window closed), audits, observed costs, and stray feedback for
unknown, closed or already-answered ids.  After every call the two must give the same answer, and
at the end the same estimates and, byte for byte, the same serialised state (the reference writes
``Router::save_state``'s format).  Batches are compared in tests/test_batch.py.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from slarouter import DuplicateFeedbackError, Router, UnknownRequestError, _core, _defaults
from reference import (APPLIED, CLOSED, DUPLICATE, STATE_LAYOUT, UNKNOWN, Estimates, ReferenceRouter, hash_text,
                       parse_state, splitmix64_next, uniform01)

VOCAB = ["the", "The", "cat", "DOG", "runs", "x_1", "42", "why", "How", "a", "b", "naïve", "é", "数学",
         "日本語", "Ünïcode", "end_", "Z"]
SEPS = [" ", " ", " ", ", ", "!\n", "--", "\t", "?? "]

# Windows the API accepts: bins = min(32, window) must divide the window.
WINDOWS = [8, 11, 16, 23, 31, 32, 64, 96, 160]


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------
_unit = dict(allow_nan=False, allow_infinity=False)
# Overrides of the engine constants, within the ranges the API accepts (_defaults.TUNING_RANGE;
# the bounds themselves are the subject of the last tests of this file).
TUNING = {
    "beta": st.sampled_from([0.0, 0.5, 2.0]) | st.floats(0.0, 3.0, **_unit),
    "tilt": st.sampled_from([0.0, 1.0, 4.0]) | st.floats(0.0, 5.0, **_unit),
    "lr": st.sampled_from([0.0, 0.05, 0.5, 2.0]),
    "l2": st.floats(0.0, 0.1, **_unit),
    "lambda0": st.floats(0.05, 4.0, **_unit),
    "eps_max": st.floats(0.0, 0.6, **_unit),
    "eps_c": st.floats(0.0, 3.0, **_unit),
    "z_lcb": st.floats(0.0, 3.0, **_unit),
    "z_ucb": st.floats(0.0, 4.0, **_unit),
    "prior_weight": st.floats(0.2, 30.0, **_unit),
    "payback": st.floats(1.0, 500.0, **_unit),
    "payback_min": st.floats(1.0, 200.0, **_unit),
    "delay_prior": st.floats(0.5, 64.0, **_unit),
    "unsat_prior": st.floats(0.5, 50.0, **_unit),
    "top_cost": st.floats(0.0, 0.5, **_unit),
    "valve": st.floats(0.05, 5.0, **_unit),
    "refresh": st.sampled_from([1, 2, 5, 16, 64]),
    "memory": st.sampled_from([0, 1, 2, 16, 65536]),  # 1 and 2: entries keep replacing each other
}


@st.composite
def router_kwargs(draw: Callable[..., Any]) -> Dict[str, Any]:
    """Keyword arguments of a slarouter.Router (models and sla included)."""
    K = draw(st.integers(1, 6))
    cost = st.sampled_from([0.0, 1.0, 2.5, 10.0]) | st.floats(0.0, 100.0, **_unit)
    costs = draw(st.lists(cost, min_size=K, max_size=K))
    priors = draw(st.lists(st.none() | st.floats(0.02, 0.98, **_unit), min_size=K, max_size=K))
    report_rate = draw(st.none() | st.just(1.0) | st.floats(0.05, 1.0, **_unit))
    # Above half the report rate in use, the engine clips the false-complaint rate.
    rho_false = draw(st.just(0.0) | st.floats(0.0, 0.95, **_unit))
    if report_rate is not None:
        rho_false *= report_rate  # the API wants it below the report rate
    # Dense dimensions below, at and above the 32 lanes of the dot products.
    features = draw(st.just("text") | st.integers(1, 8) | st.sampled_from([9, 16, 19, 32, 40]))
    kw: Dict[str, Any] = {
        "models": [(f"m{k}", costs[k], priors[k]) for k in range(K)],
        "sla": draw(st.floats(0.05, 0.95, **_unit)),
        "report_rate": report_rate,
        "confidence": draw(st.sampled_from([0.5, 0.95]) | st.floats(0.3, 0.995, **_unit)),
        "features": features,
        "seed": draw(st.integers(0, 2**64 - 1)),
        "feedback_window": draw(st.sampled_from(WINDOWS)),
        "false_complaint_rate": rho_false,
        "min_report_rate": draw(st.sampled_from([0.05, 0.2]) | st.floats(0.05, 1.0, **_unit)),
        "hash_bits": draw(st.integers(6, 10)),
    }
    tuning = draw(st.fixed_dictionaries({}, optional=TUNING))
    if tuning:
        kw["tuning"] = tuning
    return kw


def make_router(kw: Dict[str, Any]) -> Router:
    kw = dict(kw)
    return Router(kw.pop("models"), kw.pop("sla"), **kw)


# ---------------------------------------------------------------------------------------------
# Driving a router
# ---------------------------------------------------------------------------------------------
def status_of(call: Callable[[], bool]) -> int:
    """The public API's answer mapped back to the core's status code."""
    try:
        return APPLIED if call() else CLOSED
    except UnknownRequestError:
        return UNKNOWN
    except DuplicateFeedbackError:
        return DUPLICATE


class Engine:
    """slarouter.Router behind the ReferenceRouter interface (status codes, (id, index))."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def route(self, x: Any, cost: Optional[List[float]] = None):
        d = self.router.route(x, cost=cost)
        return d.request_id, d.index

    def complain(self, rid: int) -> int:
        return status_of(lambda: self.router.complain(rid))

    def audit(self, rid: int, satisfied: bool) -> int:
        return status_of(lambda: self.router.audit(rid, satisfied))

    def observe_cost(self, rid: int, cost: float) -> int:
        return status_of(lambda: self.router.observe_cost(rid, cost))


def drive(routers: List[Any], kw: Dict[str, Any], stream_seed: int, steps: int,
          after_each: Optional[Callable[[int], None]] = None, **world: Any) -> List[Any]:
    """Feed one random stream to every router, asserting after every call that all agree.

    The world: each model satisfies a request with its own true accuracy (``true_acc``); an
    unsatisfied user complains with the report rate (``rho``; a satisfied one with the
    false-complaint rate) after a random delay of up to ``max_delay`` routes; a route happens with
    probability ``p_route`` per step and passes per-request costs with ``p_cost_estimate``; some
    requests are audited (``p_audit``) or have their cost observed (``p_cost``) later; and the
    other steps send stray feedback naming unknown, closed or already-answered ids.  Each of these
    is drawn from the stream seed unless given in ``world``.  Returns the log of answers.
    """
    rng = random.Random(stream_seed)
    K = len(kw["models"])
    W = kw["feedback_window"]
    dim = 0 if kw["features"] == "text" else kw["features"]
    drawn = {
        "true_acc": [rng.choice([0.3, 0.6, 0.8, 0.9, 0.97, 1.0, rng.random()]) for _ in range(K)],
        "rho": kw["report_rate"] if kw["report_rate"] is not None else rng.choice([0.1, 0.3, 0.6, 1.0]),
        "p_route": rng.uniform(0.4, 0.9),
        "p_audit": rng.choice([0.0, 0.05, 0.3]) if kw["report_rate"] is not None else rng.choice([0.1, 0.3, 0.7]),
        "p_cost": rng.choice([0.0, 0.1, 0.5]),
        "p_cost_estimate": rng.choice([0.0, 0.0, 0.2, 0.8]),
        "max_delay": rng.choice([1, W // 2 + 1, W + W // 2]),
    }
    assert set(world) <= set(drawn), world
    drawn.update(world)
    true_acc, rho, p_route, p_audit, p_cost, p_est, max_delay = drawn.values()
    base_cost = [m[1] for m in kw["models"]]

    log: List[Any] = []
    due: Dict[int, List[Any]] = {}  # route count -> feedback to give then
    n_routes = 0

    def agree(name: str, *args: Any) -> Any:
        answers = [getattr(r, name)(*args) for r in routers]
        assert all(a == answers[0] for a in answers), (name, args, answers, len(log))
        log.append((name, args, answers[0]))
        return answers[0]

    for step in range(steps):
        if rng.random() < p_route:
            if dim:
                kind = rng.random()
                if kind < 0.1:
                    x: Any = np.zeros(dim, np.float32)
                elif kind < 0.2:  # a prompt seen before (the failure memory's keys recur)
                    x = np.arange(dim, dtype=np.float32) * float(rng.randint(1, 6))
                elif kind < 0.3:
                    x = np.array([rng.gauss(0.0, 1.0) for _ in range(dim)])  # float64: the API converts
                else:
                    x = np.array([rng.gauss(0.0, rng.choice([0.1, 1.0, 5.0])) for _ in range(dim)], np.float32)
            else:
                x = "".join(rng.choice(VOCAB) + rng.choice(SEPS) for _ in range(rng.randint(0, 12)))
            cost = None
            if rng.random() < p_est:
                if rng.random() < 0.2:
                    cost = [rng.choice([0.0, 1.0])] * K
                else:
                    cost = [c * rng.uniform(0.0, 2.0) for c in base_cost]
            rid, k = agree("route", x, cost)
            n_routes += 1
            satisfied = rng.random() < true_acc[k]
            complains = rng.random() < (kw["false_complaint_rate"] if satisfied else rho)
            if complains:
                due.setdefault(n_routes + rng.randint(0, max_delay), []).append(("complain", rid))
            if rng.random() < p_audit:
                due.setdefault(n_routes + rng.randint(0, W), []).append(("audit", rid, satisfied))
            if rng.random() < p_cost:
                c = base_cost[k] * rng.uniform(0.0, 3.0)
                due.setdefault(n_routes + rng.randint(0, W), []).append(("observe_cost", rid, c))
            for op in due.pop(n_routes, []):
                agree(*op)
        else:
            # Stray feedback: any id around the issued range, possibly answered already.
            rid = rng.randint(-3, n_routes + 2)
            what = rng.random()
            if what < 0.5:
                agree("complain", rid)
            elif what < 0.8:
                agree("audit", rid, rng.random() < 0.5)
            else:
                agree("observe_cost", rid, rng.choice([0.0, rng.uniform(0.0, 50.0)]))
        if after_each is not None:
            after_each(step)
    return log


# ---------------------------------------------------------------------------------------------
# Comparing state
# ---------------------------------------------------------------------------------------------
def same_number(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def assert_estimates_agree(engine: Dict[str, Any], ref: Dict[str, Any]) -> None:
    assert engine.keys() == ref.keys()
    for key, a in engine.items():
        b = ref[key]
        if key in ("frontier", "requests"):
            assert a == b, key
        elif isinstance(a, list):
            assert len(a) == len(b), key
            assert all(same_number(x, y) for x, y in zip(a, b)), (key, a, b)
        else:
            assert same_number(a, b), (key, a, b)


def _field_bytes(value: Any) -> bytes:
    return value.tobytes() if isinstance(value, np.ndarray) else repr(value).encode()


def assert_state_agrees(router: Router, ref: ReferenceRouter) -> None:
    """The engine's serialised state is, byte for byte, the one the reference writes: every
    counter, the ring of pending requests (stale feature bytes included), the float32 weights and
    accumulators, the refresh schedule and the estimates in use between refreshes."""
    engine = router._core.save_state()
    mine = ref.save_state()
    if engine != mine:
        a, b = parse_state(engine), parse_state(mine)
        diff = [name for name, _ in STATE_LAYOUT if _field_bytes(a[name]) != _field_bytes(b[name])]
        raise AssertionError(f"engine and reference states differ in {diff}: "
                             + "; ".join(f"{n}: {a[n]!r} vs {b[n]!r}" for n in diff[:3]))


# ---------------------------------------------------------------------------------------------
# The reference against the engine
# ---------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(kw=router_kwargs(), stream_seed=st.integers(0, 2**32 - 1), steps=st.integers(200, 800))
def test_reference_makes_the_engines_decisions(kw, stream_seed, steps):
    router = make_router(kw)
    ref = ReferenceRouter(router.config)
    drive([Engine(router), ref], kw, stream_seed, steps)
    assert_estimates_agree(router._core.estimates(), ref.estimates())
    assert router._core.counters() == ref.counters()
    assert_state_agrees(router, ref)


@pytest.mark.parametrize("features", ["text", 5])
def test_every_decision_branch_is_compared(features):
    """Fixed worlds on which the comparison takes every reachable branch of the decision.

    (Serving i of a pair at weight 0 needs lcb_i > ucb_i, which the estimates practically never give.)
    """
    tilted = {"beta": 1.0, "tilt": 2.0, "lr": 0.5}
    seen: Dict[str, int] = {}
    # The last world: a target above every model's reach with the valve held shut.
    worlds = [(0.5, tilted, 0.7), (1.0, {"tilt": 0.0}, 0.8), (None, tilted, 0.7), (None, {"valve": 50.0}, 0.9)]
    for report_rate, tuning, sla in worlds:
        kw = {
            "models": [("cheap", 1.0, None), ("mid", 3.0, 0.7), ("dear", 9.0, None), ("same", 9.0, 0.9)],
            "sla": sla, "report_rate": report_rate, "confidence": 0.9, "features": features, "seed": 1,
            "feedback_window": 32, "false_complaint_rate": 0.0, "min_report_rate": 0.05, "hash_bits": 7,
            "tuning": tuning,
        }
        router = make_router(kw)
        ref = ReferenceRouter(router.config)
        drive([Engine(router), ref], kw, 7, 500, true_acc=[0.6, 0.8, 0.95, 0.9], rho=report_rate or 0.5,
              p_route=0.8, max_delay=8, p_cost_estimate=0.5, p_audit=0.2)
        assert_estimates_agree(router._core.estimates(), ref.estimates())
        assert_state_agrees(router, ref)
        for name, n in ref.branch_counts.items():
            seen[name] = seen.get(name, 0) + n
    assert set(seen) >= {"valve", "unreachable", "explore", "cheapest", "pair_j", "mix", "mix_tilted",
                         "remembered"}, seen
    assert seen["mix_tilted"] >= 100 and seen["remembered"] >= 20, seen


def test_reference_with_the_default_configuration():
    """Default window (1024), bins and hash size, on a stream long enough to close requests."""
    kw = {"models": [("a", 1.0, None), ("b", 4.0, None), ("c", 20.0, 0.9)], "sla": 0.8, "report_rate": 0.5,
          "confidence": 0.95, "features": "text", "seed": 7, "feedback_window": 1024,
          "false_complaint_rate": 0.0, "min_report_rate": 0.05, "hash_bits": 18}
    router = make_router(kw)
    assert router.config["hash_bits"] == 18 and router.config["tuning"]["lr"] == 0.5
    ref = ReferenceRouter(router.config)
    drive([Engine(router), ref], kw, 5, 1400)
    assert ref.t > 1024  # requests have closed
    assert_estimates_agree(router._core.estimates(), ref.estimates())
    assert_state_agrees(router, ref)


@pytest.mark.parametrize("models, expected", [
    # Costs 1, 2, 4 and accuracies 0.5, 0.625, 0.875 are exactly collinear: the middle one goes;
    # the second model of cost 4 is less accurate than the first and never enters.
    ([("a", 1.0, 0.5), ("b", 2.0, 0.625), ("c", 4.0, 0.875), ("d", 4.0, 0.75)], [0, 2]),
    ([("a", 0.0, 0.5), ("b", 0.0, 0.625), ("c", 0.0, 0.875)], [2]),  # all free: the best only
    ([("a", 3.0, 0.9), ("b", 1.0, 0.5), ("c", 2.0, 0.9), ("d", 2.0, 0.9)], [1, 2]),  # ties: lowest index
    ([("a", 5.0, 0.25), ("b", 1.0, 0.75)], [1]),  # the dearer model is worse
])
def test_frontier_edge_cases(models, expected):
    # z_ucb = 0 and report rate 1 make each untried model's optimistic accuracy exactly its prior.
    router = Router(models, 0.7, report_rate=1.0, tuning={"z_ucb": 0.0})
    e = router._core.estimates()
    assert e["accuracy_ucb"] == [m[2] for m in models]
    assert e["frontier"] == expected
    assert_estimates_agree(e, ReferenceRouter(router.config).estimates())


def test_valve_buys_satisfaction_where_it_is_cheapest():
    """Past the valve the served model is the one whose optimistic accuracy beats the target at the
    lowest normalised cost per unit of accuracy above it (the engine makes the same choice: the
    reference tests above compare every decision)."""
    e = Estimates()
    e.ucb = [0.6, 0.92, 1.25]           # c is untried: its bound is above 1
    e.cnorm = [1 / 60, 2 / 60, 1.0]
    pick = ReferenceRouter._cheapest_gain
    assert pick(e, 0.85) == 1           # b: (2/60) / 0.07 per unit, c: 1 / 0.40
    assert pick(e, 0.95) == 2           # only c could beat the target
    assert pick(e, 1.30) == -1          # none could: the most accurate is served instead
    e.ucb, e.cnorm = [0.9, 0.92, 1.25], [0.0, 2 / 60, 1.0]
    assert pick(e, 0.85) == 0           # a free model that beats the target comes first


@pytest.mark.parametrize("dim", [9, 16, 21, 40])
def test_dense_sums_use_lanes(dim):
    """The order of the dense dot product is observable when its terms cancel: with unit weights
    and features (1e20, 1, 0, ..., -1e20 at index 8), a sum in feature order loses the 1 and gives
    0, the 32 lanes (j % 32, folded in halves) give 1. A complaint then steps the predictor from
    that logit, so the reference's state matches the engine's only if it sums in the same lanes."""
    kw = {"models": [("a", 1.0, None), ("b", 3.0, None)], "sla": 0.7, "report_rate": 0.5, "confidence": 0.9,
          "features": dim, "seed": 2, "feedback_window": 16, "false_complaint_rate": 0.0,
          "min_report_rate": 0.05, "hash_bits": 8, "tuning": {"lr": 0.5}}
    router = make_router(kw)
    ref = ReferenceRouter(router.config)
    drive([Engine(router), ref], kw, 4, 40, p_route=1.0)
    ref.weights[:] = 1.0  # the engine takes the same weights from the reference's state
    router._core.load_state(ref.save_state())
    x = np.zeros(dim, np.float32)
    x[0], x[1], x[8] = 1e20, 1.0, -1e20
    f = ref.features(x)
    assert ref.dot(0, f) == 1.0 and sum(float(w) * v for w, v in zip(ref.weights[:dim], f.val)) == 0.0
    rid, k = ref.route(x)
    assert Engine(router).route(x) == (rid, k)
    assert Engine(router).complain(rid) == ref.complain(rid) == APPLIED
    assert_state_agrees(router, ref)


# ---------------------------------------------------------------------------------------------
# Invariants of the engine alone
# ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(kw=router_kwargs(), stream_seed=st.integers(0, 2**32 - 1), steps=st.integers(50, 500))
def test_queue_is_never_negative(kw, stream_seed, steps):
    router = make_router(kw)

    def check(step: int) -> None:
        s = router.stats()
        assert s["queue"] >= 0.0
        assert math.isfinite(s["deficit"]) and s["queue"] == max(0.0, s["deficit"])
        assert 0.0 < s["report_rate"] <= 1.0 and 0.0 <= s["target"] <= 1.0

    check(-1)
    drive([Engine(router)], kw, stream_seed, steps, after_each=check)


@settings(max_examples=40, deadline=None)
@given(kw=router_kwargs(), stream_seed=st.integers(0, 2**32 - 1), steps=st.integers(50, 400),
       save_at=st.floats(0.0, 1.0))
def test_saving_midstream_changes_no_decision(kw, stream_seed, steps, save_at):
    plain = Engine(make_router(kw))
    saved = Engine(make_router(kw))
    cut = int(save_at * steps)

    def save_and_reload(step: int) -> None:
        if step == cut:
            saved.router = Router.from_bytes(saved.router.to_bytes())

    # drive() asserts after every call that both routers give the same answer.
    drive([plain, saved], kw, stream_seed, steps, after_each=save_and_reload)
    assert plain.router.to_bytes() == saved.router.to_bytes()
    assert_estimates_agree(plain.router._core.estimates(), saved.router._core.estimates())


# ---------------------------------------------------------------------------------------------
# Featurizer and generator
# ---------------------------------------------------------------------------------------------
def assert_features_agree(text: str, bits: int, max_features: int) -> None:
    idx, val = _core.hash_text(text, bits, max_features)
    ridx, rval = hash_text(text, bits, max_features)
    assert idx.tolist() == ridx
    assert val.dtype == np.float32 and val.tobytes() == np.array(rval, np.float32).tobytes()


_words = st.lists(st.sampled_from(VOCAB) | st.text(max_size=4), max_size=30)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200) | _words.map(" ".join) | _words.map("\n".join),
       bits=st.integers(1, 30), max_features=st.integers(0, 40))
def test_featurizer_matches_the_core(text, bits, max_features):
    assert_features_agree(text, bits, max_features)


def test_featurizer_caps_long_prompts():
    text = " ".join(f"w{i % 97} Word{i % 13}" for i in range(3000))
    for max_features in (1, 2, 3, 1023, 1024):
        assert_features_agree(text, 18, max_features)
    idx, val = hash_text(text, 18, 1024)
    # 512 words (the cap is (max_features + 1) // 2 words): 512 unigrams and 511 bigrams.
    assert len(idx) == 1023 and set(np.abs(val)) == {float(np.float32(1 / math.sqrt(1023)))}
    # Unigrams u and bigrams b of "hello world hello world": u0 u1 b01 u2 b12 u3 b23; case-folded,
    # the repeats hash alike.
    idx, val = hash_text("Hello, WORLD! hello world", 10, 1024)
    assert len(idx) == 7 and (idx[0], idx[1], idx[2]) == (idx[3], idx[5], idx[6])


def test_splitmix64_known_values():
    # The published splitmix64 sequence from state 0.
    state, a = splitmix64_next(0)
    state, b = splitmix64_next(state)
    assert (a, b) == (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4)
    assert uniform01(0)[1] == (0xE220A8397B1DCDAF >> 11) / 2.0**53


# ---------------------------------------------------------------------------------------------
# Tuning ranges
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tuning", [{"payback_min": 0.0}, {"prior_weight": 0.0}])
def test_degenerate_tuning_is_refused(tuning):
    """A zero payback horizon or prior weight made the estimates 0/0 (and, with one model,
    the frontier walk read past its end); such tunings are now refused at construction."""
    for K in (1, 3):
        with pytest.raises(ValueError, match=next(iter(tuning))):
            Router([("a", 1.0), ("b", 2.0), ("c", 5.0)][:K], 0.8, report_rate=0.5, tuning=tuning)


def _bound_cases():
    """(key, value, accepted) at and just beyond every finite bound of _defaults.TUNING_RANGE."""
    for key, (lo, hi, lo_included) in sorted(_defaults.TUNING_RANGE.items()):
        integral = isinstance(_defaults.TUNING[key], int)
        below = lo - 1 if integral else math.nextafter(lo, -math.inf)
        yield key, below, False
        yield key, lo, lo_included
        if not lo_included:  # just inside (float32 steps: see test_accepted_tuning_keeps_the_predictor_finite)
            yield key, (lo + 1 if integral else lo + 1e-6), True
        if math.isfinite(hi):
            yield key, hi, True
            yield key, (hi + 1 if integral else math.nextafter(hi, math.inf)), False
        else:
            yield key, math.inf, False  # not finite: refused as such


@pytest.mark.parametrize("key, value, accepted", list(_bound_cases()))
def test_tuning_ranges_are_enforced(key, value, accepted):
    models = [("a", 1.0), ("b", 2.0, 0.9)]
    if not accepted:
        with pytest.raises(ValueError, match=key):
            Router(models, 0.8, report_rate=0.5, features=3, tuning={key: value})
        return
    kw = {"models": models, "sla": 0.8, "report_rate": 0.5, "confidence": 0.95, "features": 3, "seed": 3,
          "feedback_window": 16, "false_complaint_rate": 0.0, "min_report_rate": 0.05, "hash_bits": 8,
          "tuning": {key: value}}
    router = make_router(kw)
    assert router.config["tuning"][key] == value
    # A value on (or just inside) a bound is harmless: the engine stays finite, the reference follows it.
    ref = ReferenceRouter(router.config)
    drive([Engine(router), ref], kw, 11, 80)
    e = router._core.estimates()
    assert all(math.isfinite(v) for v in [e["target_now"], *e["accuracy"], *e["accuracy_ucb"]])
    assert_estimates_agree(e, ref.estimates())
    assert_state_agrees(router, ref)


@pytest.mark.parametrize("tuning", [{"lambda0": 1e-50}, {"lr": 1e39}, {"l2": 1e39}])
def test_tuning_beyond_float32_is_refused(tuning):
    """The predictor steps in float32, so constants float32 cannot hold are refused (they once made
    the weights NaN)."""
    with pytest.raises(ValueError, match="tuning"):
        Router([("a", 1.0), ("b", 2.0)], 0.8, features=2, report_rate=0.5, tuning=tuning)


@pytest.mark.parametrize("tuning", [{"lambda0": 1e-6}, {"lr": 1e6}, {"l2": 1e6}, {"lr": 1e6, "l2": 1e6}])
def test_extreme_accepted_tuning_keeps_the_predictor_finite(tuning):
    router = Router([("a", 1.0), ("b", 2.0)], 0.8, features=2, report_rate=0.5, tuning=tuning)
    for i in range(200):
        rid = router.route(np.array([0.0, 1.0 + i % 3], np.float32)).request_id
        if i % 2:
            assert router.complain(rid)
    state = parse_state(router._core.save_state())
    assert np.isfinite(state["weights"]).all() and np.isfinite(state["adagrad"]).all(), state["weights"]


def test_integer_tuning_must_be_integral():
    with pytest.raises(ValueError, match="refresh"):
        Router([("a", 1.0)], 0.8, tuning={"refresh": 2.5})
    assert Router([("a", 1.0)], 0.8, tuning={"refresh": 4.0}).config["tuning"]["refresh"] == 4
