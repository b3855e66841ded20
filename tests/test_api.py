"""The public API: construction, routing, feedback, stats, and clear errors on bad input."""

import math
import pickle

import numpy as np
import pytest

import slarouter
from slarouter import DuplicateFeedbackError, Model, Router, UnknownRequestError

MODELS = [("small", 1.0), ("medium", 4.0), ("large", 20.0, 0.9)]


def text_router(**kw):
    kw.setdefault("report_rate", 0.5)
    return Router(MODELS, 0.8, **kw)


def dense_router(d=8, **kw):
    kw.setdefault("report_rate", 0.5)
    return Router(MODELS, 0.8, features=d, **kw)


def test_public_names():
    assert set(slarouter.__all__) >= {"Router", "Model", "Decision", "UnknownRequestError"}
    for name in slarouter.__all__:
        assert hasattr(slarouter, name)


def test_model_specs_are_equivalent():
    a = Router([Model("x", 1.0), Model("y", 2.0, 0.7)], 0.8)
    b = Router([{"name": "x", "cost": 1.0}, {"name": "y", "cost": 2, "prior": 0.7}], 0.8)
    c = Router([("x", 1.0), ("y", 2.0, 0.7)], 0.8)
    assert a.models == b.models == c.models
    assert a.model_names == ("x", "y")


def test_route_text_returns_decision():
    r = text_router()
    d = r.route("What is the capital of France?")
    assert isinstance(d, slarouter.Decision)
    assert d.request_id == 0 and d.model == MODELS[d.index][0]
    assert r.route("another").request_id == 1


def test_route_dense_accepts_float_arrays():
    """float64 arrays and lists are converted to float32 once: twin routers given the float32
    rows decide alike, state included."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 4)).astype(np.float32)

    def run(convert):
        r = dense_router(4)
        out = []
        for i, x in enumerate(X):
            d = r.route(convert(x))
            out.append((d.request_id, d.index))
            if d.index == 0 and i % 3 == 0:
                r.complain(d.request_id)
        return out, r.to_bytes()

    as_float32 = run(lambda x: x)
    assert run(lambda x: x.astype(np.float64)) == as_float32
    assert run(lambda x: [float(v) for v in x]) == as_float32
    assert run(lambda x: x * 0)[1] != as_float32[1]  # the features do reach the router


def test_same_seed_same_decisions():
    prompts = [f"question number {i} about topic {i % 7}" for i in range(300)]

    def run(seed):
        r = text_router(seed=seed)
        out = []
        for i, p in enumerate(prompts):
            d = r.route(p)
            out.append(d.index)
            if i % 3 == 0:
                r.complain(d.request_id)
        return out

    assert run(1) == run(1)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        ({"sla": 0.0}, ValueError, "sla must be in"),
        ({"sla": 1.0}, ValueError, "sla must be in"),
        ({"sla": float("nan")}, ValueError, "sla must be finite"),
        ({"sla": "0.8"}, TypeError, "sla must be a real number"),
        ({"report_rate": 0.0}, ValueError, "report_rate must be in"),
        ({"report_rate": 1.5}, ValueError, "report_rate must be in"),
        ({"confidence": 1.0}, ValueError, "confidence must be in"),
        ({"features": "images"}, ValueError, "features must be"),
        ({"features": 0}, ValueError, "features must be"),
        ({"features": 2**31}, ValueError, "features must be .* below 2\\*\\*31"),
        ({"tuning": [("lr", 1.0)]}, TypeError, "tuning must be a mapping"),
        ({"seed": -1}, ValueError, "seed must be"),
        ({"feedback_window": 0}, ValueError, "feedback_window"),
        ({"feedback_window": 300}, ValueError, "feedback_window must be at most 32 or a multiple of 32"),
        ({"hash_bits": 40}, ValueError, "hash_bits"),
        ({"tuning": {"nope": 1}}, ValueError, "unknown tuning constant"),
        ({"models": []}, ValueError, "at least one model"),
        ({"models": [("a", 1.0), ("a", 2.0)]}, ValueError, "duplicate model names"),
        ({"models": [("a", -1.0)]}, ValueError, "must be >= 0"),
        ({"models": [("a", float("inf"))]}, ValueError, "must be finite"),
        ({"models": [("a", 1.0, 1.5)]}, ValueError, "prior of model 'a'"),
        ({"models": [("", 1.0)]}, TypeError, "non-empty string"),
        ({"models": [{"name": "a"}]}, ValueError, "needs a 'name' and a 'cost'"),
        ({"models": [{"name": "a", "cost": 1, "price": 2}]}, ValueError, "unknown keys"),
        ({"models": "abc"}, TypeError, "sequence of models"),
    ],
)
def test_bad_configuration(kwargs, exc, msg):
    args = {"models": MODELS, "sla": 0.8}
    args.update(kwargs)
    models, sla = args.pop("models"), args.pop("sla")
    with pytest.raises(exc, match=msg):
        Router(models, sla, **args)


def snapshot(r):
    return r.to_bytes()


@pytest.mark.parametrize(
    "x, exc, msg",
    [
        (np.ones(5, np.float32), ValueError, r"shape \(8,\)"),
        (np.ones((2, 8), np.float32), ValueError, r"shape \(8,\)"),
        (np.ones(8, np.int64), TypeError, "floating-point"),
        (np.array(["a"] * 8), TypeError, "floating-point"),
        (np.full(8, np.nan, np.float32), ValueError, "NaN or infinite"),
        (np.full(8, np.inf), ValueError, "NaN or infinite"),
        (np.full(8, 1e39), ValueError, "beyond float32's range"),
        ("a prompt", TypeError, "got a str"),
    ],
)
def test_bad_dense_features_change_nothing(x, exc, msg):
    r = dense_router(8)
    r.route(np.zeros(8, np.float32))
    before = snapshot(r)
    with pytest.raises(exc, match=msg):
        r.route(x)
    assert snapshot(r) == before


def test_bad_text_features_change_nothing():
    r = text_router()
    before = snapshot(r)
    with pytest.raises(TypeError, match="must be a str"):
        r.route(np.zeros(3, np.float32))
    # A str with no UTF-8 form (a lone surrogate) is named, with the row of a batch.
    with pytest.raises(UnicodeEncodeError, match=r"position 1: surrogates not allowed \(the prompt has no UTF-8"):
        r.route("x\ud800")
    with pytest.raises(UnicodeEncodeError, match=r"\(row 1 of X has no UTF-8 form\)") as err:
        r.route_batch(["ok", "x\ud800", "fine"])
    again = pickle.loads(pickle.dumps(err.value))  # (as from a worker process: built from its args)
    assert str(again) == str(err.value) and err.value.args[-1] == err.value.reason
    assert snapshot(r) == before


def test_an_observed_cost_that_would_overflow_the_mean_changes_nothing():
    """Each cost is finite, but their total would not be: the mean cost would become infinite
    and the normalised costs NaN (the dearest model then took all traffic). Refused, naming the
    request; the request may still report a cost that fits."""
    r = Router([("a", 1.0), ("b", 2.0)], 0.8, report_rate=1.0, features=2)
    served = [r.route(np.zeros(2, np.float32)) for _ in range(8)]
    first, again = next((d, e) for d in served for e in served if d.request_id < e.request_id and d.index == e.index)
    assert r.observe_cost(first.request_id, 1.7e308) is True
    before = snapshot(r)
    with pytest.raises(ValueError, match=f"cost 1.7e\\+308 for request {again.request_id} would take its model's total"):
        r.observe_cost(again.request_id, 1.7e308)
    assert snapshot(r) == before
    assert r.observe_cost(again.request_id, 3.0) is True
    assert all(np.isfinite(m["mean_cost"]) for m in r.stats()["models"].values())


def test_stats_at_a_confidence_a_rounding_error_below_one():
    """The interval's z comes from the tail probability, which 0.5 + confidence / 2 rounded to 1."""
    r = Router([("a", 1.0), ("b", 2.0)], 0.8, report_rate=1.0, features=2, confidence=math.nextafter(1.0, 0.0))
    r.complain(r.route(np.zeros(2, np.float32)).request_id)
    s = r.stats()
    assert 0.0 <= s["satisfaction_low"] <= s["satisfaction"] <= s["satisfaction_high"] <= 1.0


@pytest.mark.parametrize(
    "cost, exc, msg",
    [
        ([1.0, 2.0], ValueError, "one entry per model"),
        ([1.0, -2.0, 3.0], ValueError, ">= 0"),
        ([1.0, float("nan"), 3.0], ValueError, "NaN"),
        (["a", "b", "c"], TypeError, "numeric"),
        ({"small": 1.0, "medium": 2.0, "huge": 3.0}, KeyError, "unknown models"),
        ({"small": 1.0}, ValueError, "missing"),
    ],
)
def test_bad_cost_estimate_changes_nothing(cost, exc, msg):
    r = text_router()
    before = snapshot(r)
    with pytest.raises(exc, match=msg):
        r.route("prompt", cost=cost)
    assert snapshot(r) == before


def test_cost_estimate_by_name_or_order():
    """A mapping name -> cost is the sequence in model order: twin routers given one or the other
    decide alike, and the costs matter (the same numbers given to the wrong models do not)."""
    rng = np.random.default_rng(3)
    costs = rng.uniform(0.0, 30.0, size=(600, 3))

    def run(form):
        r = text_router()
        out = []
        for i, c in enumerate(costs):
            c = {"large": c[2], "small": c[0], "medium": c[1]} if form == "mapping" else \
                list(c[::-1]) if form == "reversed" else list(c)
            d = r.route(f"prompt {i % 50}", cost=c)
            out.append(d.index)
            if d.index == 0 and i % 3 == 0:
                r.complain(d.request_id)
        return out, r.to_bytes()

    in_order = run("order")
    assert run("mapping") == in_order
    assert run("reversed")[0] != in_order[0]


def test_complaint_statuses():
    r = text_router(feedback_window=4)
    ids = [r.route(f"p{i}").request_id for i in range(3)]
    assert r.complain(ids[0]) is True
    before = snapshot(r)
    with pytest.raises(DuplicateFeedbackError, match="already has a complaint"):
        r.complain(ids[0])
    with pytest.raises(UnknownRequestError, match="unknown request id 99"):
        r.complain(99)
    with pytest.raises(UnknownRequestError, match="unknown request id -1: this router never issued it"):
        r.complain(-1)
    with pytest.raises(TypeError, match="request_id must be an int"):
        r.complain("0")
    with pytest.raises(TypeError, match="request_id must be an int, got float"):
        r.complain(1.0)
    assert snapshot(r) == before
    for i in range(5):
        r.route(f"q{i}")
    # ids[1] left its window of 4 later requests: the complaint is late and changes nothing else.
    s0 = r.stats()
    assert r.complain(ids[1]) is False
    s1 = r.stats()
    assert s1["late_complaints"] == s0["late_complaints"] + 1
    assert s1["complaints"] == s0["complaints"]


def test_audit_and_cost_feedback():
    r = text_router()
    d = r.route("p")
    assert r.audit(d.request_id, False) is True
    with pytest.raises(DuplicateFeedbackError, match="audit"):
        r.audit(d.request_id, True)
    with pytest.raises(DuplicateFeedbackError, match="request 0 already has an audit"):
        r.audit(d.request_id, np.True_)
    with pytest.raises(TypeError, match="satisfied must be a bool"):
        r.audit(d.request_id, "yes")
    for satisfied in (np.True_, np.bool_(False), np.float64(0.3) > 0.5):  # NumPy's bool (named "bool" in NumPy 2)
        assert r.audit(r.route("q").request_id, satisfied) is True
    assert r.observe_cost(d.request_id, 3.5) is True
    with pytest.raises(DuplicateFeedbackError, match="cost"):
        r.observe_cost(d.request_id, 3.5)
    with pytest.raises(ValueError, match=">= 0"):
        r.observe_cost(d.request_id, -1.0)
    with pytest.raises(ValueError, match="finite"):
        r.observe_cost(d.request_id, float("nan"))
    with pytest.raises(UnknownRequestError, match="unknown request id 12345"):
        r.audit(12345, True)
    with pytest.raises(ValueError, match="cost must be finite"):
        r.observe_cost(r.route("q").request_id - 1, 10**400)
    with pytest.raises(TypeError, match=r"cost must be a real number, got an array of shape \(1,\)"):
        r.observe_cost(r.route("q").request_id - 2, np.array([1.0]))
    for big in (2**64, 2**63, -2**63 - 1):  # beyond int64: named as given, not wrapped
        with pytest.raises(UnknownRequestError, match=f"unknown request id {big}:"):
            r.complain(big)
    with pytest.raises(UnknownRequestError, match=f"unknown request id {2**63}:"):
        r.complain_batch(np.array([1, 2**63], np.uint64))
    with pytest.raises(UnknownRequestError, match=f"unknown request id {2**64}:"):
        r.complain_batch([1, 2**64])
    with pytest.raises(UnknownRequestError, match=f"unknown request id {2**63}:"):
        r.complain_batch([0, 2**63])  # (NumPy makes this list float64)
    s = r.stats()
    assert s["audits"] == 4 and s["complaints"] == 0


def test_observed_costs_move_the_running_mean():
    r = Router([("a", 1.0), ("b", 10.0)], 0.5, report_rate=1.0)
    for _ in range(50):
        d = r.route("p")
        r.observe_cost(d.request_id, 3.0 if d.model == "a" else 10.0)
    a = r.stats()["models"]["a"]
    if a["requests"] > 5:
        assert 2.5 < a["mean_cost"] < 3.0


def test_stats_shape():
    r = text_router()
    s = r.stats()
    assert s["requests"] == 0 and math.isnan(s["satisfaction"])
    for i in range(100):
        d = r.route(f"prompt {i}")
        if i % 4 == 0:
            r.complain(d.request_id)
    s = r.stats()
    assert s["requests"] == 100 and s["complaints"] == 25
    e = r._core.estimates()
    # The signed deficit is docs/algorithm.md's D = U - (1 - tau) N, and the queue max(0, D).
    assert s["deficit"] == pytest.approx(e["unsatisfied"] - (1.0 - s["target"]) * s["requests"], rel=1e-9, abs=1e-9)
    assert s["queue"] == max(0.0, s["deficit"])
    assert 0.0 <= s["satisfaction_low"] <= s["satisfaction"] <= s["satisfaction_high"] <= 1.0
    assert s["margin"] >= 0.0
    assert set(s["models"]) == {"small", "medium", "large"}
    assert sum(m["requests"] for m in s["models"].values()) == 100
    assert math.isclose(sum(m["share"] for m in s["models"].values()), 1.0)
    for m in s["models"].values():
        assert 0.0 <= m["accuracy_low"] <= m["accuracy"] <= m["accuracy_high"] <= 1.0


def _late_complaint_stream(seed, rho, n, acc=(0.25, 0.3, 0.5), max_delay=200):
    """Route n requests; each unsatisfied one complains with probability rho after 0 to
    max_delay later requests. Yields (requests so far, realized satisfaction, stats())."""
    rng = np.random.default_rng(seed)
    r = Router([("small", 1.0), ("medium", 4.0), ("large", 20.0)], 0.45, report_rate=rho, seed=seed)
    due, n_sat = {}, 0
    for t in range(n):
        for rid in due.pop(t, ()):
            r.complain(rid)
        d = r.route(f"question {t} on topic {t % 13}")
        if rng.random() < acc[d.index]:
            n_sat += 1
        elif rng.random() < rho:
            due.setdefault(t + 1 + int(rng.integers(0, max_delay + 1)), []).append(d.request_id)
        yield t + 1, n_sat / (t + 1), r.stats


@pytest.mark.parametrize("rho", [1.0, 0.3])
def test_satisfaction_interval_covers_what_late_complaints_may_still_say(rho):
    # Early in a stream most complaints are still on their way and the delay model guesses how
    # many; the interval spans that guess's range (and the sampling error), so it holds the
    # realized satisfaction while the point estimate may be far off.
    inside = total = 0
    for seed in range(6):
        for n, realized, stats in _late_complaint_stream(seed, rho, 600):
            if n % 50 == 0:
                s = stats()
                assert s["satisfaction_low"] <= s["satisfaction"] <= s["satisfaction_high"]
                inside += s["satisfaction_low"] <= realized <= s["satisfaction_high"]
                total += 1
    assert inside >= 0.9 * total, (inside, total)


def test_satisfaction_interval_narrows_once_the_delays_are_known():
    for n, realized, stats in _late_complaint_stream(0, 1.0, 2500):
        if n in (100, 2500):
            s = stats()
            width = s["satisfaction_high"] - s["satisfaction_low"]
            if n == 100:
                early = width
    assert width < early / 4
    assert s["satisfaction_low"] <= realized <= s["satisfaction_high"]


def test_unknown_report_rate_uses_audits():
    r = Router(MODELS, 0.8)  # report rate withheld
    assert r.stats()["report_rate"] == pytest.approx(0.05)
    rng = np.random.default_rng(0)
    unsatisfied = 0
    for i in range(6000):
        d = r.route(f"p{i}")
        unsat = rng.random() < 0.3
        unsatisfied += unsat
        if unsat and rng.random() < 0.5:
            r.complain(d.request_id)
        if rng.random() < 0.5:
            r.audit(d.request_id, not unsat)
    s = r.stats()
    n, c = s["audited_unsatisfied"], s["audited_unsatisfied_complained"]
    assert n > 300 and abs(c / n - 0.5) < 0.06
    # A point estimate, not a lower bound: near the true rate, as is the satisfaction estimate.
    assert abs(s["report_rate"] - 0.5) < 0.05
    assert abs(s["satisfaction"] - (1 - unsatisfied / 6000)) < 0.02


def test_unknown_report_rate_is_min_report_rate_until_the_first_audit():
    withheld, assumed = Router(MODELS, 0.8, min_report_rate=0.2), Router(MODELS, 0.8, report_rate=0.2)
    rng = np.random.default_rng(1)
    for i in range(300):
        a, b = withheld.route(f"p{i % 17}"), assumed.route(f"p{i % 17}")
        assert a == b
        if rng.random() < 0.2:
            withheld.complain(a.request_id)
            assert assumed.complain(b.request_id)
    assert withheld.stats()["report_rate"] == 0.2
    withheld.audit(299, False)
    assert withheld.stats()["report_rate"] != 0.2


def test_a_model_with_an_unlucky_start_is_tried_again():
    """Model "b" (satisfaction 0.55) draws a bad start: only one in four of its first 48 requests
    is satisfied. Its upper bound then falls below the estimate of the cheap "a" (0.40, too low
    for alpha 0.45 on its own). With bounds re-read at a fixed z, "b" was never served again in
    5 of these 21 streams, which ended at 0.39-0.41. The exploration candidates' bounds widen as
    "a" gathers evidence, so "b" is tried again, recovers and carries the SLA in every stream."""
    failed = []
    for seed in range(21):
        rng = np.random.default_rng(seed)
        r = Router([("a", 1.0), ("b", 10.0)], 0.45, report_rate=1.0, features=1, seed=seed)
        x = np.zeros(1, np.float32)
        b_seen = served_b_late = sat = 0
        T = 6000
        for t in range(T):
            d = r.route(x)
            if d.model == "b":
                b_seen += 1
                ok = (b_seen % 4 == 0) if b_seen <= 48 else rng.random() < 0.55
                served_b_late += t >= T // 2
            else:
                ok = rng.random() < 0.40
            sat += ok
            if not ok:
                r.complain(d.request_id)
        if served_b_late <= T // 20 or sat / T <= 0.45:
            failed.append((seed, b_seen, served_b_late, sat / T))
    assert not failed, failed
