"""Remembered failures: a request that failed with a model is not served by it again while the
plan offers another (docs/algorithm.md, "Remembered failures")."""

from __future__ import annotations

import json

import numpy as np
import pytest

import slarouter
from slarouter import Router

# Two models and 200 prompts: "a" satisfies prompts 0-99, "b" prompts 0-179; the same prompt
# gets the same answer every time.
A_SOLVES, B_SOLVES, PROMPTS = 100, 180, 200


def _world(router, n, seed, report_rate=1.0):
    """Route n draws of the 200 prompts (dense feature: the prompt's number); every unsatisfied
    request complains with the report rate before the next one. Returns (satisfaction, cost per
    request, repeats): repeats counts requests served by a model that had already failed that
    prompt and complained."""
    rng = np.random.default_rng(seed)
    failed = set()
    sat = cost = repeats = 0
    for _ in range(n):
        p = int(rng.integers(PROMPTS))
        d = router.route(np.array([p], np.float32))
        ok = p < (A_SOLVES if d.model == "a" else B_SOLVES)
        sat += ok
        cost += 1.0 if d.model == "a" else 10.0
        repeats += (p, d.model) in failed
        if not ok and rng.random() < report_rate:
            router.complain(d.request_id)
            failed.add((p, d.model))
    return sat / n, cost / n, repeats


def _router(memory=None, seed=0):
    tuning = None if memory is None else {"memory": memory}
    return Router([("a", 1.0), ("b", 10.0)], 0.7, report_rate=1.0, features=1, seed=seed, tuning=tuning)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_failed_request_goes_to_the_other_model(seed):
    """The alpha-0.7 target needs a mix of "a" (0.50) and "b" (0.90): 5.5 per request for any
    mix that ignores the prompt. With the memory, a prompt that "a" failed goes to "b" the next
    time the mix draws "a" for it, so "b" is spent where it is needed: "a" on the prompts it
    solves and "b" on half the others would do at 2.8 (plus the margin)."""
    with_memory, without = _router(seed=seed), _router(memory=0, seed=seed)
    sats = []
    for half in (0, 1):
        sat_m, cost_m, _ = _world(with_memory, 6000, seed + 100 * half)
        sat_0, cost_0, _ = _world(without, 6000, seed + 100 * half)
        sats.append((sat_m, sat_0))
        assert cost_0 > 4.8 and cost_m < 0.75 * cost_0, (half, cost_m, cost_0)
    assert cost_m < 3.5
    assert all(sum(s) / 2 >= 0.7 for s in zip(*sats)), sats  # the whole stream meets the SLA
    # One entry per prompt that "a" fails, but for a rare collision in the 65,536-entry table.
    assert PROMPTS - A_SOLVES - 2 <= with_memory.stats()["failures_remembered"] <= PROMPTS - A_SOLVES
    assert without.stats()["failures_remembered"] == 0


def test_where_one_model_suffices_nothing_changes():
    """Below "a"'s own accuracy the cheapest model serves everything: there is nothing to buy, so a
    remembered failure does not send a request to the dearer model."""
    r = Router([("a", 1.0), ("b", 10.0)], 0.2, report_rate=1.0, features=1)
    rng = np.random.default_rng(3)
    for _ in range(3000):
        p = int(rng.integers(PROMPTS))
        d = r.route(np.array([p], np.float32))
        if not p < (A_SOLVES if d.model == "a" else B_SOLVES):
            r.complain(d.request_id)
    late = [r.route(np.array([p], np.float32)).model for p in range(A_SOLVES, PROMPTS)]
    assert r.stats()["failures_remembered"] > 0
    assert late.count("a") == len(late)


def test_constant_features_with_random_outcomes_keep_the_sla():
    """When one feature vector stands for requests whose outcomes differ, every model soon has a
    remembered failure for it, and the memory steps aside: the mix is the queue's again."""
    r = Router([("a", 1.0), ("b", 10.0)], 0.7, report_rate=1.0, features=1, seed=5)
    rng = np.random.default_rng(5)
    x = np.zeros(1, np.float32)
    sat, n = 0, 8000
    for _ in range(n):
        d = r.route(x)
        ok = rng.random() < (0.5 if d.model == "a" else 0.9)
        sat += ok
        if not ok:
            r.complain(d.request_id)
    assert sat / n >= 0.7
    assert r.stats()["failures_remembered"] == 1


def test_audits_are_remembered_too():
    r = _router()
    x = np.array([150], np.float32)
    d = r.route(x)
    r.audit(d.request_id, False)
    assert r.stats()["failures_remembered"] == 1
    y = np.array([10], np.float32)  # other features: a satisfied audit remembers nothing
    r.audit(r.route(y).request_id, True)
    assert r.stats()["failures_remembered"] == 1
    keys, _ = _failures(r.share())
    assert keys.tolist() == slarouter._core.feature_keys(x.reshape(1, 1)).tolist()


def test_the_memory_survives_save_and_load(tmp_path):
    r = _router(seed=4)
    _world(r, 3000, 4)
    r.save(tmp_path / "r.slr")
    loaded = Router.load(tmp_path / "r.slr")
    assert loaded.stats()["failures_remembered"] == r.stats()["failures_remembered"] >= PROMPTS - A_SOLVES - 2
    assert _world(loaded, 2000, 9) == _world(r, 2000, 9)
    assert loaded.to_bytes() == r.to_bytes()


def test_memory_size_is_checked():
    with pytest.raises(ValueError, match="power of two"):
        _router(memory=1000)
    with pytest.raises(ValueError, match="memory"):
        _router(memory=-1)
    small = _router(memory=1)  # one entry: each new failure replaces the last one
    _world(small, 500, 1)
    assert small.stats()["failures_remembered"] == 1


def test_a_state_from_another_memory_size_is_refused(tmp_path):
    r = _router(memory=1024)
    _world(r, 300, 2)
    r.save(tmp_path / "r.slr")
    other = _router()
    before = other.to_bytes()
    with pytest.raises(slarouter.StateFileError, match="memory"):
        other.load_state(tmp_path / "r.slr")
    assert other.to_bytes() == before


@pytest.mark.parametrize("backend", ["cpu", "numba"])
def test_batches_remember_as_single_routes_do(backend):
    """Each backend applies the memory to a batch's rows; a batch of one is route()."""
    X = np.arange(PROMPTS, dtype=np.float32).reshape(-1, 1)
    # A history that ends in a mix (not with "a" alone), where remembered failures change decisions.
    seed = next(s for s in range(50) if _plan(_router_after(s))["regime"] == 2)
    single, batched, whole = (_router_after(seed) for _ in range(3))
    assert _plan(single)["remember"]
    _, m = whole.route_batch(X, backend=backend)
    _, m_cpu = _router_after(seed).route_batch(X, backend="cpu")
    assert np.array_equal(m, m_cpu)
    assert (m[A_SOLVES:B_SOLVES] == 1).mean() > 0.9  # the prompts "a" failed go to "b"
    for p in range(PROMPTS):
        _, m = batched.route_batch(X[p:p + 1], backend=backend)
        assert batched.model_names[int(m[0])] == single.route(X[p]).model
    assert batched.to_bytes() == single.to_bytes()


def test_keys_of_rows_match_the_reference_and_look_up_as_features_do():
    """_core.feature_keys (the keys the GPU path's kernel computes on the device) agrees with the
    reference, and batch_remember_keys with those keys changes what batch_remember changes."""
    from reference import feature_key

    rng = np.random.default_rng(0)
    # Whole blocks of 16 values (vectorised where the CPU allows) and the words after them.
    for n in (1, 2, 7, 15, 16, 17, 31, 32, 33, 384, 385, 768):
        X = rng.standard_normal((6, n)).astype(np.float32)
        X[1] = X[0]
        X[2, 0] = -0.0
        keys = slarouter._core.feature_keys(X)
        assert np.array_equal(slarouter._core.feature_keys(X, portable=True), keys)
        assert keys.dtype == np.uint64 and keys[0] == keys[1] and len(set(keys.tolist())) == 5
        assert keys.tolist() == [feature_key([float(v) for v in x], None, n) for x in X]
    seed = next(s for s in range(50) if _plan(_router_after(s))["regime"] == 2)
    X = np.arange(PROMPTS, dtype=np.float32).reshape(-1, 1)
    by_x, by_key = _router_after(seed), _router_after(seed)
    m = np.zeros(PROMPTS, np.int32)  # "a" for every prompt, as a kernel might have chosen
    m_x, m_key = m.copy(), m.copy()
    by_x._core.batch_begin(PROMPTS)
    changed = by_x._core.batch_remember(X, m_x)
    by_x._core.batch_abort()
    core = by_key._core
    core.batch_begin(PROMPTS)
    try:
        with pytest.raises(ValueError, match="keys must have shape"):
            core.batch_remember_keys(np.zeros(3, np.uint64), m_key)
        with pytest.raises(ValueError, match="model index out of range"):
            core.batch_remember_keys(np.zeros(PROMPTS, np.uint64), np.full(PROMPTS, 2, np.int32))
        assert core.batch_remember_keys(slarouter._core.feature_keys(X), m_key) == changed > 0
    finally:
        core.batch_abort()
    assert np.array_equal(m_x, m_key) and (m_key[A_SOLVES:B_SOLVES] == 1).mean() > 0.9
    with pytest.raises(RuntimeError, match="without batch_begin"):
        core.batch_remember_keys(np.zeros(PROMPTS, np.uint64), m)


def _plan(router):
    plan = router._core.batch_begin(1)
    router._core.batch_abort()
    return plan


def _router_after(seed):
    r = _router(seed=seed)
    _world(r, 2000, seed)
    return r


def test_more_than_64_models_agree_with_the_reference():
    """Failure bits span several words per entry beyond 64 models; the reference agrees."""
    from reference import ReferenceRouter
    from test_reference import Engine, assert_state_agrees, drive, make_router

    K = 70
    # Equal models and an unreachable target: the router tries every model, the last six included.
    kw = {"models": [(f"m{k}", 1.0 + k, None) for k in range(K)], "sla": 0.8, "report_rate": 1.0,
          "confidence": 0.9, "features": 3, "seed": 2, "feedback_window": 32, "false_complaint_rate": 0.0,
          "min_report_rate": 0.05, "hash_bits": 7, "tuning": {"memory": 64}}
    router = make_router(kw)
    ref = ReferenceRouter(router.config)
    drive([Engine(router), ref], kw, 5, 1500, true_acc=[0.5] * K, p_route=0.9,
          max_delay=4)
    assert ref.branch_counts["remembered"] > 0
    assert router.stats()["failures_remembered"] > 0
    assert any(ref.mem_mask[1::2])  # failures of models 64-69, in each entry's second word
    assert_state_agrees(router, ref)


def _replicas(n, share_failures, seed=3):
    """Two replicas serve the _world prompts round robin and exchange share() every 100 requests;
    returns (satisfaction, cost per request) of the whole stream."""
    reps = [_router(seed=seed + i) for i in range(2)]
    rng = np.random.default_rng(seed)
    sat = cost = 0.0
    for t in range(n):
        if t % 100 == 0:
            shares = [r.share() for r in reps]
            if not share_failures:
                for sh in shares:
                    del sh["failures"]  # as a replica of an older slarouter would share
            for i, r in enumerate(reps):
                r.set_peers([shares[1 - i]])
        r = reps[t % 2]
        p = int(rng.integers(PROMPTS))
        d = r.route(np.array([p], np.float32))
        ok = p < (A_SOLVES if d.model == "a" else B_SOLVES)
        sat += ok
        cost += 1.0 if d.model == "a" else 10.0
        if not ok:
            r.complain(d.request_id)
    return sat / n, cost / n


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_replicas_share_their_remembered_failures(seed):
    """Each replica sees a prompt half as often as one router would; with the failures shared, a
    failure seen by one is remembered by both, and the same SLA costs less (3-5% here)."""
    shared, alone = _replicas(2000, True, seed), _replicas(2000, False, seed)
    assert shared[0] >= 0.7 and alone[0] >= 0.7
    assert shared[1] < 0.98 * alone[1], (shared, alone)


def _failures(share):
    return slarouter._router._decode_failures(share["failures"], "failures", 2)


def test_share_lists_the_recent_failures():
    r = _router(seed=1)
    assert r.share()["failures"] == ""
    _world(r, 3000, 1)
    keys, models = _failures(r.share())
    assert 0 < len(keys) <= 1024 and set(models.tolist()) <= {0, 1}
    assert json.loads(json.dumps(r.share())) == r.share()
    # The other replica remembers them; it does not pass them on as its own.
    other = _router(seed=2)
    other.set_peers([r.share()])
    assert other.stats()["failures_remembered"] > 0
    assert other.share()["failures"] == ""
    # Only the most recent 1,024 are shared, oldest first.
    many = Router([("a", 1.0), ("b", 10.0)], 0.7, report_rate=1.0, features=1, seed=3)
    for i in range(3000):
        many.complain(many.route(np.array([float(i)], np.float32)).request_id)
    keys, _ = _failures(many.share())
    X = np.arange(3000, dtype=np.float32).reshape(-1, 1)
    assert keys.tolist() == slarouter._core.feature_keys(X[-1024:]).tolist()


def test_failures_shared_by_several_peers_count_once():
    r = _router(seed=1)
    _world(r, 3000, 1)
    sh = r.share()
    keys, _ = _failures(sh)
    assert len(keys) > 500
    other = _router(seed=2)
    peers = [dict(sh, instance=f"replica {i}") for i in range(7)]  # seven replicas that saw the same failures
    other.set_peers(peers)
    other.set_peers(peers)  # a repeated sync changes nothing
    distinct = len(set(keys.tolist()))
    assert distinct - 2 <= other.stats()["failures_remembered"] <= distinct  # but for a rare collision


def _encoded(keys, models):
    return slarouter._router._encode_failures(np.array(keys, np.uint64), np.array(models, np.int32))


@pytest.mark.parametrize("failures, message", [
    ([[12345, 0]], "base64 string"),
    ("not base64!", "base64"),
    ("AAAA", "10 bytes"),
    (_encoded([0], [0]), "zero key"),
    (_encoded([12345], [2]), "model 2"),
])
def test_bad_shared_failures_change_nothing(failures, message):
    peer = _router(seed=1)
    _world(peer, 500, 1)
    r = _router(seed=2)
    _world(r, 500, 2)
    before = r.to_bytes()
    sh = dict(peer.share(), failures=failures, instance="another replica")
    with pytest.raises(ValueError, match=message):
        r.set_peers([peer.share(), sh])
    assert r.to_bytes() == before
