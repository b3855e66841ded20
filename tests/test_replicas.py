"""docs/replicas.py: one router is the replay itself; R routers each serve every R-th request."""

import importlib.util
import pathlib

import numpy as np
import pytest

from slarouter.datasets import load_dataset
from slarouter.replay import RunContext, hashed_features, make_stream, run_policy

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "replicas.py"


@pytest.fixture(scope="module")
def replicas():
    spec = importlib.util.spec_from_file_location("replicas", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def routellm(data_dir):
    ds = load_dataset(data_dir / "routellm-mmlu-gsm8k")
    return ds, hashed_features(ds)


def test_one_replica_is_the_replay(replicas, routellm):
    ds, feats = routellm
    stream = make_stream(ds, "gsm8k", "long", 3)
    ctx = RunContext(ds, stream, 0.769, 0.3, features=feats, list_cost=ds.cost.mean(axis=0))
    run = run_policy("slarouter", ctx)
    sat, cost = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, 3, 1)
    assert sat == run["satisfaction"]
    assert cost == pytest.approx(run["cost_per_request"], rel=1e-12)


def test_replicas_serve_their_own_share(replicas, routellm):
    # Two replicas decide differently from one router (each sees half the evidence), and their
    # figures are those of the whole stream.
    ds, feats = routellm
    one = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, 3, 1)
    two = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, 3, 2)
    assert two != one
    # Replica r is a router of its own (seed 3 + 1000 r) on every other request, its complaints
    # arriving after half the delay in its own requests; the figures are the whole stream's.
    from slarouter import Router

    s = make_stream(ds, "gsm8k", "long", 3)
    served = np.empty(len(s), dtype=np.int64)
    for r in range(2):
        part = slice(r, None, 2)
        router = Router([(m, float(c)) for m, c in zip(ds.models, ds.cost.mean(axis=0))], 0.769, report_rate=0.3,
                        seed=3 + 1000 * r)
        served[part] = router._replay(s.rows[part], ds.sat, ds.cost, s.u_sat[part], s.u_report[part],
                                      s.delay[part] // 2, 0.3, features=feats)[0]
    assert two == (float((s.u_sat < ds.sat[s.rows, served]).mean()), float(ds.cost[s.rows, served].mean()))


def test_bad_replica_count_is_refused(replicas, data_dir, capsys):
    with pytest.raises(SystemExit):
        replicas.main([str(data_dir / "routellm-mmlu-gsm8k"), "--replicas", "0"])
    assert "--replicas must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replicas.main([str(data_dir / "routellm-mmlu-gsm8k"), "--audit-rate", "1.5"])
    assert "--audit-rate must be in [0, 1]" in capsys.readouterr().err


def test_replicas_with_the_report_rate_withheld(replicas, routellm):
    # Audited replicas, independent or sharing, serve the whole stream; one audited router is
    # the replay with the report rate withheld.
    ds, feats = routellm
    stream = make_stream(ds, "gsm8k", "long", 3)
    ctx = RunContext(ds, stream, 0.769, 0.3, features=feats, list_cost=ds.cost.mean(axis=0), audit_rate=0.02,
                     withhold_report_rate=True)
    run = run_policy("slarouter", ctx)
    sat, cost = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, 3, 1, audit_rate=0.02)
    assert sat == run["satisfaction"]
    assert cost == pytest.approx(run["cost_per_request"], rel=1e-12)


# --- replicas sharing one SLA: Router.share() and Router.set_peers() ---------------------------

import json
import struct
import zlib

import slarouter
from slarouter import Router

MODELS = [("small", 1.0), ("mid", 4.0), ("large", 20.0)]


def _router(seed=0, sla=0.8, report_rate=0.3):
    return Router(MODELS, sla, report_rate=report_rate, seed=seed)


def _drive(router, n, start=0, complain_every=4):
    out = []
    for i in range(start, start + n):
        d = router.route(f"question {i} about topic {i % 7}")
        if i % complain_every == 0:
            router.complain(d.request_id)
        out.append(d.index)
    return out


def test_share_of_a_fresh_router_is_empty_and_json():
    sh = _router().share()
    assert sh["requests"] == 0 and sh["unsatisfied"] == 0
    assert sh["complaints"] == [0.0, 0.0, 0.0]
    assert sh["exposure"] == [[0.0] * 3] * 3
    assert sh["models"] == ["small", "mid", "large"] and sh["sla"] == 0.8 and sh["report_rate"] == 0.3
    assert json.loads(json.dumps(sh)) == sh


def test_share_counts_this_routers_own_evidence():
    r = _router()
    _drive(r, 400)
    sh = r.share()
    st = r.stats()
    assert sh["requests"] == 400
    assert sh["complaints"] == [float(st["models"][m]["complaints"]) for m in ("small", "mid", "large")]
    assert sh["unsatisfied"] == pytest.approx(400 * (1 - st["satisfaction"]))
    assert all(0 <= e <= st["models"][m]["requests"] for e, m in zip(sh["exposure"][0], ("small", "mid", "large")))


def test_no_peers_change_nothing():
    a, b = _router(seed=3), _router(seed=3)
    a.set_peers([])
    assert _drive(a, 600) == _drive(b, 600)
    assert a.to_bytes() == b.to_bytes()


def test_peers_evidence_enters_the_accounting_and_the_accuracies():
    peer = _router(seed=1)
    _drive(peer, 2000, complain_every=2)  # a peer whose users complain about half the time
    r = _router(seed=2)
    _drive(r, 200, complain_every=50)
    alone = r.stats()
    r.set_peers([peer.share()])
    shared = r.stats()
    # The whole stream is far below the SLA: the deficit is the peer's too.
    assert shared["deficit"] > alone["deficit"] + 500
    assert alone["whole_stream"] == {"requests": 200, "satisfaction": alone["satisfaction"]}
    assert shared["whole_stream"]["requests"] == 2200
    # (This router's own satisfaction is still about its own requests; the peers' accuracies
    # enter only its estimate of the complaints its pending requests will bring.)
    assert shared["whole_stream"]["satisfaction"] < shared["satisfaction"]
    # The peer's complaints make every model it served look worse.
    served = [m for m, v in peer.stats()["models"].items() if v["requests"] > 100]
    assert served
    for m in served:
        assert shared["models"][m]["accuracy"] < alone["models"][m]["accuracy"]


def test_peers_are_replaced_not_added():
    peer = _router(seed=1)
    _drive(peer, 500)
    r = _router(seed=2)
    _drive(r, 100)
    r.set_peers([peer.share()])
    once = r.stats()["deficit"]
    r.set_peers([peer.share()])
    assert r.stats()["deficit"] == pytest.approx(once)


def _bad_shares(sh):
    cut = {k: v for k, v in sh.items() if k != "audits"}
    return [
        ("lacks", [cut]),
        ("models", [dict(sh, models=["small", "mid", "huge"])]),
        ("sla", [dict(sh, sla=0.7)]),
        ("report_rate", [dict(sh, report_rate=0.5)]),
        ("finite", [dict(sh, requests=float("nan"))]),
        (">= 0", [dict(sh, variance=-1.0)]),
        ("more unsatisfied", [dict(sh, unsatisfied=sh["requests"] + 1)]),
        ("one count per model", [dict(sh, complaints=[1.0, 2.0])]),
        ("finite counts", [dict(sh, audits=[0.0, -1.0, 0.0])]),
        ("three per-model lists", [dict(sh, exposure=sh["exposure"][:2])]),
        ("more satisfied audits", [dict(sh, audits_satisfied=[1.0, 0.0, 0.0])]),
        ("must be a share", [sh, 3]),
        ("more exposure", [dict(sh, exposure=[[sh["requests"]] * 3] * 3)]),
        ("more complaints", [dict(sh, complaints=[sh["requests"], 1.0, 0.0])]),
        ("lacks", [{k: v for k, v in sh.items() if k != "rho_sensitivity"}]),
        (">= 0", [dict(sh, rho_sensitivity=-1.0)]),
        ("finite", [dict(sh, audited_unsatisfied=float("inf"))]),
        ("complained than audited", [dict(sh, audited_unsatisfied=1.0, audited_unsatisfied_complained=2.0)]),
        ("audited-unsatisfied requests .* than audits", [dict(sh, audited_unsatisfied=sum(sh["audits"]) + 5.0)]),
        ("audited-unsatisfied requests .* than audits", [dict(sh, audited_unsatisfied=sum(sh["audits"]) + 5e-7)]),
        ("requests'.* must be finite, got an integer of 401 digits", [dict(sh, requests=10 ** 400)]),
        ("models 'smallmidlarge'", [dict(sh, models="".join(m for m, _ in MODELS))]),
        ("models", [dict(sh, models={m: c for m, c in MODELS})]),
        ("features 8; this one has 'text'", [dict(sh, features=8)]),
        ("hash_bits 12", [dict(sh, hash_bits=12)]),
        ("instance'.* must be the string", [dict(sh, instance=[1])]),
        (r"shares\[1\] and shares\[0\] come from the same router", [sh, dict(sh)]),
    ]


def test_bad_shares_are_refused_and_change_nothing():
    peer = _router(seed=1)
    _drive(peer, 300)
    sh = peer.share()
    r = _router(seed=2)
    _drive(r, 100)
    r.set_peers([sh])
    before = r.to_bytes()
    for what, shares in _bad_shares(sh):
        with pytest.raises((ValueError, TypeError), match=what):
            r.set_peers(shares)
        assert r.to_bytes() == before, what
    with pytest.raises(TypeError, match="iterable of share"):
        r.set_peers(sh)  # one dict, not a list of them
    assert r.to_bytes() == before
    with pytest.raises(ValueError, match="this router's own share"):
        r.set_peers([sh, r.share()])
    assert r.to_bytes() == before
    # A share from before the features, hash_bits and instance fields is taken as it is.
    r.set_peers([{k: v for k, v in sh.items() if k not in ("features", "hash_bits", "instance")}])
    assert r.to_bytes() == before


def test_a_dense_routers_share_does_not_enter_a_text_routers_memory():
    """The failure memory's keys are computed from the features, so a share from a router that
    sees requests differently is refused before its failures join the memory."""
    r = _router(seed=2)
    _drive(r, 300)
    dense = Router(MODELS, 0.8, report_rate=0.3, features=4)
    for i in range(300):
        d = dense.route(np.full(4, i % 50, np.float32))
        if d.index == 0:
            dense.complain(d.request_id)
    assert dense.share()["failures"]
    before = r.to_bytes()
    with pytest.raises(ValueError, match="features 4; this one has 'text'"):
        r.set_peers([dense.share()])
    assert r.to_bytes() == before
    twin = Router(MODELS, 0.8, report_rate=0.3, features=4, hash_bits=10)  # hash_bits: text only
    twin.set_peers([dense.share()])
    assert twin.stats()["failures_remembered"] > 0


def test_replicas_that_estimate_the_report_rate_share_too():
    # With the report rate withheld, the replicas audit a fifth of their requests. The peer has
    # seen far more; after set_peers this router's accuracies move to the peer's, and the whole
    # stream adds up.
    rng = np.random.default_rng(7)
    truth = {"small": 0.45, "mid": 0.8, "large": 0.95}

    def serve(router, n, tag):
        for i in range(n):
            d = router.route(f"{tag} question {i}")
            ok = rng.random() < truth[d.model]
            if not ok and rng.random() < 0.3:
                router.complain(d.request_id)
            if rng.random() < 0.2:
                router.audit(d.request_id, ok)

    peer, r = Router(MODELS, 0.8, seed=1), Router(MODELS, 0.8, seed=2)
    serve(peer, 3000, "peer")
    serve(r, 150, "own")
    sh = peer.share()
    assert sh["report_rate"] is None and sum(sh["audits"]) > 400
    alone = r.stats()["models"]
    r.set_peers([sh])
    shared = r.stats()
    mine = peer.stats()["models"]
    assert shared["whole_stream"]["requests"] == 3150
    for m in truth:
        if mine[m]["requests"] >= 200:
            assert abs(shared["models"][m]["accuracy"] - mine[m]["accuracy"]) < abs(alone[m]["accuracy"] - mine[m]["accuracy"]) + 1e-9
    b = Router.from_bytes(r.to_bytes())
    assert _drive(b, 300, start=300) == _drive(r, 300, start=300)


def _audited_router(seed, n, rho, rng, audit_rate, tag):
    truth = {"small": 0.45, "mid": 0.8, "large": 0.95}
    router = Router(MODELS, 0.8, seed=seed)  # report rate withheld
    for i in range(n):
        d = router.route(f"{tag} question {i}")
        ok = rng.random() < truth[d.model]
        if not ok and rng.random() < rho:
            router.complain(d.request_id)
        if rng.random() < audit_rate:
            router.audit(d.request_id, ok)
    for i in range(n, n + 1100):  # close every window: the audited requests are full observations
        router.route(f"{tag} question {i}")
    return router


def test_replicas_pool_their_report_rate_evidence():
    # A replica without audits of its own assumes min_report_rate; its peers' closed
    # audited-unsatisfied requests give it their estimate of the true rate (0.3).
    rng = np.random.default_rng(11)
    peers = [_audited_router(s, 3000, 0.3, rng, 0.2, f"p{s}") for s in (1, 2)]
    shares = [p.share() for p in peers]
    st = peers[0].stats()
    assert shares[0]["audited_unsatisfied"] == st["audited_unsatisfied"] > 50
    assert shares[0]["audited_unsatisfied_complained"] == st["audited_unsatisfied_complained"]
    assert shares[0]["rho_sensitivity"] > 0
    r = _audited_router(3, 200, 0.3, rng, 0.0, "own")
    assert r.stats()["report_rate"] == pytest.approx(0.05)
    r.set_peers(shares)
    pooled = sum(sh["audited_unsatisfied_complained"] for sh in shares) / sum(sh["audited_unsatisfied"] for sh in shares)
    assert abs(r.stats()["report_rate"] - pooled) < 0.05
    assert abs(r.stats()["report_rate"] - 0.3) < 0.08
    # A replica's share counts its own audits only, whatever it pooled.
    peers[0].set_peers([shares[1]])
    assert peers[0].share()["audited_unsatisfied"] == shares[0]["audited_unsatisfied"]


def test_pooled_report_rate_errors_add_up_across_replicas():
    # One pooled estimate errs the same way for every replica, so the whole stream's variance
    # carries (s_own + s_peers)^2 var(rho), not s_own^2 var(rho) + s_peers^2 var(rho) (each
    # replica's shared variance holds its own s^2 var(rho)): 2 s_own s_peer var(rho) more.
    rng = np.random.default_rng(12)
    a, b = (_audited_router(s, 2000, 0.3, rng, 0.05, f"r{s}") for s in (1, 2))
    sb = b.share()
    assert a.share()["rho_sensitivity"] > 0 and sb["rho_sensitivity"] > 0

    def variance(sensitivity):
        a.set_peers([dict(sb, rho_sensitivity=sensitivity)])
        return a._core.estimates()["variance"]

    base = variance(0.0)
    one, two = variance(sb["rho_sensitivity"]) - base, variance(2 * sb["rho_sensitivity"]) - base
    assert one > 0
    assert two == pytest.approx(2 * one, rel=1e-9)


@pytest.mark.parametrize("batch", [0, 100])
def test_a_router_saved_right_after_set_peers_loads(batch):
    """set_peers() recomputes the estimates between the scheduled refreshes (after a batch the
    next one is already past due): the state it leaves is a valid one."""
    peer = _router(seed=1)
    _drive(peer, 50)
    r = _router(seed=2)
    if batch:
        r.route_batch([f"question {i}" for i in range(batch)])
    else:
        _drive(r, 16)
    for shares in ([], [peer.share()]):
        r.set_peers(shares)
        loaded = Router.from_bytes(r.to_bytes())
        assert loaded.to_bytes() == r.to_bytes()
        assert _drive(loaded, 40, start=200) == _drive(Router.from_bytes(r.to_bytes()), 40, start=200)


def test_peers_survive_save_and_load(tmp_path):
    peer = _router(seed=1)
    _drive(peer, 700)
    r = _router(seed=2)
    _drive(r, 300)
    r.set_peers([peer.share()])
    r.save(tmp_path / "r.slr")
    loaded = Router.load(tmp_path / "r.slr")
    assert _drive(loaded, 500, start=300) == _drive(r, 500, start=300)
    assert loaded.to_bytes() == r.to_bytes()


def _memory_record(router):
    # Bytes of the failure memory at the end of the payload (format version 5): two vectors,
    # empty or of 65,536 entries (a key and, with three models, one word of failure bits each);
    # and of the ring of the router's own recent failures after it (version 6; version-5 files
    # have it or not): a count and two vectors, empty or of 1,024 keys (8 bytes) and models (4).
    memory = 2 * 8 * 65536 if router.stats()["failures_remembered"] else 0
    ring = 1024 * (8 + 4) if router.share()["failures"] else 0
    return 16 + memory, 8 + 16 + ring


def _older_version(data, version, strip):
    # The same router in an older format: its payload less the last ``strip`` bytes.
    head = struct.Struct("<8sII")
    magic, current, clen = head.unpack_from(data, 0)
    assert current == 6
    payload = data[head.size + clen: len(data) - 12][:-strip] if strip else data[head.size + clen: len(data) - 12]
    old = head.pack(magic, version, clen) + data[head.size: head.size + clen] + payload
    return old + struct.pack("<QI", len(payload), zlib.crc32(old) & 0xFFFFFFFF)


@pytest.mark.parametrize("version, strip", [
    (5, None),                       # with the ring (written before version 6 was named)
    (5, 0),                          # without the ring
    (4, 0),                          # without the failure memory
    (3, 4 * 8),                      # ... and the peers' report-rate evidence (four doubles)
    (2, 4 * 8 + 3 * 8 + 6 * 8),      # ... and the peers' record (three doubles, six empty vectors)
])
def test_older_state_files_still_load(version, strip):
    # Every prompt is new, so the memory, which an older file lacks, never changes a decision.
    r = _router(seed=4)
    _drive(r, 300)
    memory, ring = _memory_record(r)
    cut = 0 if strip is None else ring + (memory if version < 5 else 0) + strip
    old = _older_version(r.to_bytes(), version, cut)
    loaded = Router.from_bytes(old)
    remembered = r.stats()["failures_remembered"]
    assert loaded.stats()["failures_remembered"] == (remembered if version == 5 else 0) and remembered > 0
    assert (loaded.share()["failures"] == r.share()["failures"]) == (strip is None) and r.share()["failures"]
    assert _drive(loaded, 200, start=300) == _drive(r, 200, start=300)
    # A file's version says which records it has: the same bytes under a later version are refused.
    if strip is not None:
        with pytest.raises(slarouter.StateFileError, match="truncated"):
            Router.from_bytes(_older_version(r.to_bytes(), 6, cut))


def test_load_state_takes_an_older_file_of_the_same_configuration(tmp_path):
    """A version-4 file's configuration has no "memory" tuning key (the memory came with version
    5): load_state into a router of that configuration, which has the key at its default, works,
    and a real difference is named down to the key."""
    r = _router(seed=4)
    _drive(r, 300)
    memory, ring = _memory_record(r)
    old = _older_version(r.to_bytes(), 4, memory + ring)
    head = struct.Struct("<8sII")
    magic, version, clen = head.unpack_from(old, 0)
    config = json.loads(old[head.size: head.size + clen])
    del config["tuning"]["memory"]
    payload = old[head.size + clen: len(old) - 12]
    cfg = json.dumps(config).encode()
    body = head.pack(magic, version, len(cfg)) + cfg + payload
    (tmp_path / "v4.slr").write_bytes(body + struct.pack("<QI", len(payload), zlib.crc32(body) & 0xFFFFFFFF))
    same = _router(seed=4)
    same.load_state(tmp_path / "v4.slr")
    assert same.stats()["requests"] == 300
    assert _drive(same, 200, start=300) == _drive(r, 200, start=300)
    other = Router(MODELS, 0.8, report_rate=0.3, seed=4, tuning={"tilt": 2.0})
    with pytest.raises(slarouter.StateFileError, match=r"another configuration \(tuning.tilt: 1.0 in the file, 2.0 here\)"):
        other.load_state(tmp_path / "v4.slr")


def test_a_corrupt_peers_record_is_refused():
    peer = _router(seed=1)
    _drive(peer, 100)
    r = _router(seed=2)
    r.set_peers([peer.share()])
    data = bytearray(r.to_bytes())
    head = struct.Struct("<8sII")
    _, _, clen = head.unpack_from(data, 0)
    end = len(data) - 12
    # The peers' record: three doubles, six per-model vectors of 3 doubles (8 + 24 bytes each),
    # four doubles; make the request count negative (its first double).
    start = end - sum(_memory_record(r)) - (3 * 8 + 6 * (8 + 24) + 4 * 8)
    data[start:start + 8] = struct.pack("<d", -5.0)
    body = bytes(data[:end])
    fixed = body[: len(body)] + struct.pack("<QI", len(body) - head.size - clen, zlib.crc32(body) & 0xFFFFFFFF)
    with pytest.raises(slarouter.StateFileError, match="peers"):
        Router.from_bytes(fixed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sharing_replicas_pay_one_margin_not_four(replicas, routellm, seed):
    # Four independent replicas each certify a quarter of the stream and over-deliver; sharing
    # every 100 requests certifies the whole stream once: cheaper, and the SLA still met.
    ds, feats = routellm
    alone = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, seed, 4, 0)
    shared = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, seed, 4, 100)
    assert shared[0] >= 0.769
    assert shared[1] < 0.9 * alone[1]
    assert shared[0] < alone[0]


@pytest.mark.parametrize("backend", ["cpu", "numba"])
def test_batches_use_the_peers_evidence_as_route_does(backend):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 8)).astype(np.float32)
    peer = Router(MODELS, 0.8, report_rate=0.3, features=8, seed=1)
    for i in range(800):
        d = peer.route(rng.standard_normal(8).astype(np.float32))
        if i % 3 == 0:
            peer.complain(d.request_id)
    a = Router(MODELS, 0.8, report_rate=0.3, features=8, seed=2)
    b = Router(MODELS, 0.8, report_rate=0.3, features=8, seed=2)
    for r in (a, b):
        r.set_peers([peer.share()])
    one = [a.route(x).index for x in X]
    batched = [int(b.route_batch(X[i:i + 1], backend=backend)[1][0]) for i in range(len(X))]
    assert one == batched


def test_cli_refuses_a_negative_share(replicas, data_dir, capsys):
    with pytest.raises(SystemExit):
        replicas.main([str(data_dir / "routellm-mmlu-gsm8k"), "--share", "-1"])
    assert "--share must be >= 0" in capsys.readouterr().err
