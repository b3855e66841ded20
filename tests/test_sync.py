"""slarouter.sync: replicas that share one SLA kept in step through a store."""

import json
import logging
import multiprocessing
import os
import time

import pytest

from slarouter import Router
from slarouter.sync import DirectoryStore, PeerEntryError, PeerSync, RedisStore

MODELS = [("small", 1.0), ("mid", 4.0), ("large", 20.0)]


def _router(seed=0, sla=0.8, report_rate=0.3):
    return Router(MODELS, sla, report_rate=report_rate, seed=seed)


def _drive(router, n, start=0, complain_every=4):
    for i in range(start, start + n):
        d = router.route(f"question {i} about topic {i % 7}")
        if i % complain_every == 0:
            router.complain(d.request_id)


class FakeRedis:
    """The two hash commands RedisStore uses, with redis-py's bytes replies."""

    def __init__(self):
        self.hashes = {}

    def hset(self, key, field, value):
        self.hashes.setdefault(key, {})[field.encode()] = bytes(value)

    def hgetall(self, key):
        return dict(self.hashes.get(key, {}))


@pytest.fixture(params=["directory", "redis"])
def store_factory(request, tmp_path):
    if request.param == "directory":
        return lambda: DirectoryStore(tmp_path / "sla")
    client = FakeRedis()
    return lambda: RedisStore(client, key="sla")


def test_sync_sets_the_other_replicas_shares_as_peers(store_factory):
    a, b, c = _router(1), _router(2), _router(3)
    _drive(a, 300)
    _drive(b, 500, complain_every=3)
    _drive(c, 200)
    syncs = [PeerSync(r, store_factory(), name) for r, name in ((a, "a"), (b, "b"), (c, "c"))]
    for s in syncs:
        s.sync()
    # The last to sync sees both others' current shares; the first saw only its own (none yet).
    assert syncs[2].sync() == 2 and syncs[0].sync() == 2
    ref = _router(3)
    _drive(ref, 200)
    ref.set_peers([a.share(), b.share()])
    assert c.stats() == ref.stats()
    assert c.stats()["whole_stream"]["requests"] == 1000
    assert a.stats()["whole_stream"]["requests"] == 1000


def test_a_later_sync_replaces_the_peers_evidence(store_factory):
    a, b = _router(1), _router(2)
    sa, sb = PeerSync(a, store_factory(), "a"), PeerSync(b, store_factory(), "b")
    _drive(b, 100)
    sb.sync()
    sa.sync()
    assert a.stats()["whole_stream"]["requests"] == 100
    _drive(b, 100, start=100)
    sb.sync()
    sa.sync()
    sa.sync()  # repeated: nothing counted twice
    assert a.stats()["whole_stream"]["requests"] == 200


def test_a_corrupt_entry_is_refused_and_the_router_keeps_its_peers(tmp_path):
    a, b = _router(1), _router(2)
    _drive(b, 100)
    store = DirectoryStore(tmp_path)
    PeerSync(b, store, "b").sync()
    sa = PeerSync(a, store, "a")
    sa.sync()
    before = a.to_bytes()
    (tmp_path / "c.json").write_bytes(b'{"replica": "c", "share": {"requests": 1')
    with pytest.raises(ValueError, match="entry of replica 'c'.*not a PeerSync entry"):
        sa.sync()
    assert a.to_bytes() == before


def test_a_share_from_another_sla_is_refused_and_the_router_keeps_its_peers(store_factory):
    a, b, other = _router(1), _router(2), _router(3, sla=0.9)
    _drive(b, 100)
    sa = PeerSync(a, store_factory(), "a")
    PeerSync(b, store_factory(), "b").sync()
    sa.sync()
    before = a.to_bytes()
    with pytest.raises(ValueError, match="the share of replica 'a' comes from a router with sla 0.8"):
        PeerSync(other, store_factory(), "other").sync()  # publishes its share all the same
    with pytest.raises(ValueError, match="the share of replica 'other' comes from a router with sla 0.9"):
        sa.sync()
    assert a.to_bytes() == before


def test_two_processes_under_one_name_are_caught(store_factory):
    a, b = _router(1), _router(2)
    _drive(b, 10)
    first, second = PeerSync(a, store_factory(), "r1"), PeerSync(b, store_factory(), "r1")
    first.sync()
    second.sync()  # its first sync: the entry there could be its own earlier run
    with pytest.raises(ValueError, match="another process publishes as replica 'r1'"):
        first.sync()
    # the other process's entry is left in place
    assert json.loads(first.store.items()["r1"])["share"]["requests"] == 10


def test_a_corrupted_own_entry_is_rewritten_not_taken_for_another_process(tmp_path):
    """An entry emptied or garbled in the store (a disk error, a tool) is not another process's:
    its replica publishes over it, and the other replicas can read the store again."""
    a, b = _router(1), _router(2)
    _drive(a, 50)
    store = DirectoryStore(tmp_path)
    sa, sb = PeerSync(a, store, "a"), PeerSync(b, store, "b")
    sa.sync()
    sb.sync()
    for garbage in (b"", b"{not json", b'{"replica": "a"}'):
        (tmp_path / "a.json").write_bytes(garbage)
        with pytest.raises(ValueError, match="entry of replica 'a'.*not a PeerSync entry"):
            sb.sync()
        assert sa.sync() == 1
        assert sb.sync() == 1 and b.stats()["whole_stream"]["requests"] == 50


def test_a_restarted_replica_keeps_its_name_and_its_evidence(tmp_path):
    a, b = _router(1), _router(2)
    _drive(a, 300)
    _drive(b, 100)
    store = DirectoryStore(tmp_path)
    PeerSync(a, store, "a").sync()
    PeerSync(b, store, "b").sync()
    a.save(tmp_path / "a.state")
    restarted = Router.load(tmp_path / "a.state")  # a new process, same name, same state
    PeerSync(restarted, store, "a").sync()
    PeerSync(b, store, "b").sync()
    assert b.stats()["whole_stream"]["requests"] == 400


def test_a_bad_peer_entry_does_not_keep_a_replica_from_starting(tmp_path, caplog):
    """start() raises what is wrong with this replica's own setup, not another replica's garbage:
    that is logged, kept in last_error, and the replica catches up once the entry is good."""
    a, b = _router(1), _router(2)
    _drive(b, 40)
    store = DirectoryStore(tmp_path)
    (tmp_path / "b.json").write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR, logger="slarouter.sync"):
        with PeerSync(a, store, "a", interval=0.01) as sa:
            assert isinstance(sa.last_error, PeerEntryError) and isinstance(sa.last_error, ValueError)
            assert "entry of replica 'b'" in caplog.text
            PeerSync(b, store, "b").sync()
            _wait(lambda: a.stats()["whole_stream"]["requests"] == 40)
        assert sa.last_error is None  # a sync that succeeds clears it
    (tmp_path / "b.json").write_bytes(b"garbage")
    by_hand = PeerSync(a, store, "a")
    with pytest.raises(PeerEntryError):
        by_hand.sync()
    by_hand.last_error = ValueError("stale")
    PeerSync(b, store, "b").sync()
    assert by_hand.sync() == 1 and by_hand.last_error is None
    other = DirectoryStore(tmp_path / "other")
    first, second = PeerSync(_router(3), other, "a2"), PeerSync(_router(4), other, "a2")
    first.sync()
    second.sync()
    with pytest.raises(ValueError, match="another process publishes as replica 'a2'") as err:
        first.start()  # its own setup: raised, no thread
    assert not isinstance(err.value, PeerEntryError) and first._thread is None


def test_background_thread_keeps_peers_current_and_reports_errors(tmp_path, caplog):
    a, b = _router(1), _router(2)
    store = DirectoryStore(tmp_path)
    sb = PeerSync(b, store, "b")
    sb.sync()
    with PeerSync(a, store, "a", interval=0.01) as sa:
        _drive(b, 50)
        sb.sync()
        _wait(lambda: a.stats()["whole_stream"]["requests"] == 50)
        (tmp_path / "junk.json").write_bytes(b"not json")
        with caplog.at_level(logging.ERROR, logger="slarouter.sync"):
            _wait(lambda: sa.last_error is not None)
        assert "junk" in str(sa.last_error)
        assert "sync of replica 'a' failed" in caplog.text
        os.unlink(tmp_path / "junk.json")
        _drive(b, 50, start=50)
        sb.sync()
        _wait(lambda: a.stats()["whole_stream"]["requests"] == 100)
        assert sa._thread.is_alive()
        _drive(a, 30)
    # stop() published a's latest share
    sb.sync()
    assert b.stats()["whole_stream"]["requests"] == 130
    assert sa._thread is None


def test_an_error_in_the_block_is_the_one_raised(tmp_path, caplog):
    a = _router(1)
    store = DirectoryStore(tmp_path)
    with pytest.raises(KeyError, match="the block's"):
        with PeerSync(a, store, "a", interval=60):
            (tmp_path / "junk.json").write_bytes(b"not json")  # the last sync will fail too
            raise KeyError("the block's")
    assert "last sync of replica 'a' failed" in caplog.text


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def _replica_process(path, name, seed, n, barrier):
    r = _router(seed)
    s = PeerSync(r, DirectoryStore(path), name)
    for i in range(0, n, 50):
        _drive(r, 50, start=i)
        s.sync()
    barrier.wait(60)  # every replica has published its last share
    s.sync()
    with open(os.path.join(path, f"{name}.result"), "w") as f:
        json.dump(r.stats()["whole_stream"], f)


def _run_all(procs):
    """Start the processes and wait for each to exit cleanly (any left running is terminated)."""
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()


def test_replica_processes_on_one_host_share_the_whole_stream(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    counts = {"p0": 200, "p1": 300, "p2": 150}
    procs = [ctx.Process(target=_replica_process, args=(str(tmp_path), name, i, n, barrier))
             for i, (name, n) in enumerate(counts.items())]
    _run_all(procs)
    for name in counts:
        ws = json.loads((tmp_path / f"{name}.result").read_text())
        assert ws["requests"] == sum(counts.values())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


_PRELOADED = None  # a router built in the parent, before the workers are forked


def _forked_worker(path, name, n, barrier):
    _drive(_PRELOADED, n, start=1000 * len(name))
    s = PeerSync(_PRELOADED, DirectoryStore(path), name)
    s.sync()
    barrier.wait(60)
    s.sync()
    with open(os.path.join(path, f"{name}.result"), "w") as f:
        json.dump(_PRELOADED.stats()["whole_stream"], f)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_workers_forked_from_a_preloaded_router_are_replicas(tmp_path):
    """A server that builds the router and then forks its workers (a preloaded app): the copies
    are different replicas, not the same router's own share seen twice."""
    global _PRELOADED
    _PRELOADED = _router(7)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    counts = {"w0": 120, "w1": 80}
    procs = [ctx.Process(target=_forked_worker, args=(str(tmp_path), name, n, barrier)) for name, n in counts.items()]
    _run_all(procs)
    for name in counts:
        assert json.loads((tmp_path / f"{name}.result").read_text())["requests"] == sum(counts.values())


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "x.tmp", "a b", 7, None, "x" * 129])
def test_bad_replica_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="replica name"):
        PeerSync(_router(), DirectoryStore(tmp_path), name)


def test_bad_arguments_are_refused(tmp_path):
    store = DirectoryStore(tmp_path)
    with pytest.raises(TypeError, match="slarouter.Router"):
        PeerSync(object(), store, "a")
    with pytest.raises(TypeError, match="put"):
        PeerSync(_router(), object(), "a")
    for interval in (0, -1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="interval"):
            PeerSync(_router(), store, "a", interval=interval)
    with pytest.raises(TypeError, match="hset"):
        RedisStore(object())
    with pytest.raises(ValueError, match="key"):
        RedisStore(FakeRedis(), key="")
    s = PeerSync(_router(), store, "a", interval=60).start()
    with pytest.raises(RuntimeError, match="already running"):
        s.start()
    s.stop()
