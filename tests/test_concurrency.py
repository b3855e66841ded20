"""Many threads routing and complaining at once lose and double-count nothing."""

import os
import threading
import time

import numpy as np
import pytest

import slarouter
from slarouter import Router

THREADS = 8
CYCLES = 100_000


def test_eight_threads_route_and_complain():
    # The window is wide enough that no complaint arrives after its request's window closed,
    # however the threads are scheduled, so every complaint sent must be counted.
    r = Router([("a", 1.0), ("b", 3.0), ("c", 9.0)], 0.8, report_rate=0.5, features=16, feedback_window=1 << 17)
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    sent = [0] * THREADS
    errors = []

    def worker(w):
        try:
            n = 0
            for i in range(CYCLES):
                d = r.route(x)
                if (i + w) % 3 == 0:
                    assert r.complain(d.request_id) is True
                    n += 1
            sent[w] = n
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    s = r.stats()
    assert s["requests"] == THREADS * CYCLES
    assert s["complaints"] == sum(sent)
    assert s["late_complaints"] == 0
    assert sum(m["requests"] for m in s["models"].values()) == THREADS * CYCLES
    assert sum(m["complaints"] for m in s["models"].values()) == sum(sent)


def test_batches_of_routers_in_many_threads_match_one_thread():
    """Routers batching at once in several threads share the engine's worker pool (or start their
    own threads when it is busy); each must end exactly where it ends when batching alone."""
    X = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)

    def make(seed):
        return Router([("a", 1.0), ("b", 3.0), ("c", 9.0)], 0.8, report_rate=0.5, features=64, seed=seed,
                      feedback_window=256)

    def run(r):
        for b in range(6):
            ids, models = r.route_batch(X)
            r.complain_batch(ids[(models == 0) & (np.arange(len(ids)) % 5 == b)][-100:])

    alone = []
    for seed in range(4):
        r = make(seed)
        run(r)
        alone.append(r.to_bytes())
    routers = [make(seed) for seed in range(4)]
    threads = [threading.Thread(target=run, args=(r,)) for r in routers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.to_bytes() for r in routers] == alone


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_batches_with_its_own_workers():
    """The worker pool's threads do not survive fork(): a child process (multiprocessing's default
    on Linux) must start its own and finish its batches, as the parent still must."""
    r = Router([("a", 1.0), ("b", 3.0)], 0.8, report_rate=0.5, features=64)
    X = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)
    r.route_batch(X)  # the parent's pool exists from here on
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            r.route_batch(X)
            r.route_batch(X)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung in route_batch")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    ids, _ = r.route_batch(X)
    assert ids[0] == 20000  # the child's batches are its own


def test_peers_set_while_threads_route_lose_nothing():
    """A replica syncing its peers (share / set_peers) while its threads route and complain:
    every request and complaint is counted once, and the last peers set are the ones in use."""
    models = [("a", 1.0), ("b", 3.0), ("c", 9.0)]
    r = Router(models, 0.8, report_rate=0.5, features=16, feedback_window=1 << 15)
    peers = [Router(models, 0.8, report_rate=0.5, features=16, seed=s) for s in (1, 2)]
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    for p in peers:
        for i in range(500):
            d = p.route(x)
            if i % 4 == 0:
                p.complain(d.request_id)
    cycles, workers = 20000, 4
    sent = [0] * workers
    errors = []
    stop = threading.Event()

    def worker(w):
        try:
            for i in range(cycles):
                d = r.route(x)
                if (i + w) % 3 == 0:
                    assert r.complain(d.request_id) is True
                    sent[w] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def syncer():
        try:
            while not stop.is_set():
                r.share()
                r.set_peers(p.share() for p in peers)
                time.sleep(0.001)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    sync = threading.Thread(target=syncer)
    sync.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sync.join()
    assert not errors, errors[:3]
    s = r.stats()
    assert s["requests"] == workers * cycles
    assert s["complaints"] == sum(sent)
    assert s["whole_stream"]["requests"] == workers * cycles + 1000


def _run_child(code: str, timeout: float = 240) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("reader", ["stats()", "to_bytes()", "share()", "repr(r)", "r._core.estimates()"])
def test_readers_do_not_deadlock_against_a_numba_batch(reader):
    """A Numba batch holds the router's lock from batch_begin to its commit while running Python;
    a reader in another thread must wait for that lock without holding the GIL, or neither
    thread can go on (a child process, so that a deadlock fails the test instead of hanging it)."""
    code = f"""
import faulthandler, threading
import numpy as np
import slarouter
from slarouter import Router
faulthandler.dump_traceback_later(120, exit=True)
r = Router([("a", 1.0), ("b", 2.0), ("c", 5.0)], 0.9, features=4, report_rate=0.5, feedback_window=256)
X = np.random.default_rng(0).standard_normal((2048, 4)).astype(np.float32)
r.route_batch(X, backend="numba")  # compiles the kernels first
done = threading.Event()
def batches():
    for _ in range(30):
        r.route_batch(X, backend="numba")
    done.set()
def read():
    n = 0
    while not done.is_set():
        {"r." + reader if not reader.startswith(("repr", "r.")) else reader}
        n += 1
    print("reads", n)
t = threading.Thread(target=read)
t.start()
batches()
t.join()
print("requests", r.stats()["requests"])
"""
    res = _run_child(code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "requests 63488" in res.stdout
    reads = int(res.stdout.split("reads ")[1].split()[0])
    assert reads > 0  # the reader ran while the batches did


def test_a_daemon_thread_routing_at_exit_does_not_abort_the_process():
    """A daemon thread inside route() when the interpreter exits is ended by CPython as it asks
    for the GIL back; the process must exit normally, not abort in the C++ runtime."""
    code = """
import threading, time
import slarouter
from slarouter import Router
r = Router([("a", 1.0), ("b", 2.0)], 0.9, report_rate=0.5)
def serve():
    while True:
        r.route("some prompt text here")
        r.stats()
threading.Thread(target=serve, daemon=True).start()
time.sleep(0.3)
"""
    for _ in range(3):
        res = _run_child(code, timeout=60)
        assert res.returncode == 0, res.stderr


def test_stats_is_one_moment_while_other_threads_route():
    """stats() reads its counters, estimates and peers under one hold of the lock: with every
    request complained about, a satisfaction computed from a request count and an unsatisfied
    count of different moments falls outside [0, 1] or outside its own interval."""
    r = Router([("a", 1.0), ("b", 2.0)], 0.9, report_rate=1.0, features=4, feedback_window=32)
    x = np.ones(4, dtype=np.float32)
    for _ in range(50):
        r.complain(r.route(x).request_id)
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            r.complain(r.route(x).request_id)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    bad, n, t0 = [], 0, time.time()
    try:
        while time.time() - t0 < 3:
            s = r.stats()
            n += 1
            if not (0.0 <= s["satisfaction_low"] <= s["satisfaction"] <= s["satisfaction_high"] <= 1.0):
                bad.append(s)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert n > 1000 and not bad, bad[:1]


def test_set_peers_sets_the_evidence_and_the_failures_at_once():
    """No other call sees a router with its new peers but without their remembered failures."""
    M = [("a", 1.0), ("b", 2.0)]
    kw = dict(report_rate=1.0, features=4, feedback_window=32)
    peer = Router(M, 0.9, seed=1, **kw)
    rng = np.random.default_rng(0)
    for _ in range(1000):
        peer.complain(peer.route(rng.standard_normal(4).astype(np.float32)).request_id)
    share = peer.share()
    torn = seen = 0
    for _ in range(150):
        r = Router(M, 0.9, **kw)
        t = threading.Thread(target=r.set_peers, args=([share],))
        t.start()
        while True:
            s = Router.from_bytes(r.to_bytes()).stats()
            if s["whole_stream"]["requests"] > s["requests"]:
                seen += 1
                torn += s["failures_remembered"] == 0
                break
            if not t.is_alive():
                break
        t.join()
    assert seen > 0 and torn == 0


def test_share_reads_its_failures_and_counts_at_one_moment():
    """share() reads the recent remembered failures and the complaint counts under one hold of
    the lock: with every request complained about (fewer than the 1,024 failures a share lists,
    each request's features distinct), the share lists exactly one failure per complaint."""
    r = Router([("a", 1.0), ("b", 2.0)], 0.9, report_rate=1.0, features=1, feedback_window=2048)
    ids = iter(range(1000))
    lock = threading.Lock()

    def hammer():
        while True:
            with lock:
                i = next(ids, None)
            if i is None:
                return
            r.complain(r.route(np.array([float(i)], np.float32)).request_id)
            time.sleep(0.0005)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    torn, n = [], 0
    try:
        while any(t.is_alive() for t in threads):
            sh = r.share()
            keys, _ = slarouter._router._decode_failures(sh["failures"], "failures", 2)
            n += 1
            if len(keys) != sum(sh["complaints"]):
                torn.append((len(keys), sum(sh["complaints"])))
    finally:
        for t in threads:
            t.join()
    assert sum(r.share()["complaints"]) == 1000
    assert n > 100 and not torn, torn[:3]


def test_numba_batches_from_two_threads_under_the_workqueue_layer():
    """Numba's "workqueue" threading layer (its fallback where neither TBB nor OpenMP loads)
    aborts the process when two threads launch parallel kernels at once; the Numba backend then
    runs its batches one at a time."""
    code = """
import threading
import numpy as np
import slarouter
from slarouter import Router
import numba
routers = [Router([("a", 1.0), ("b", 3.0)], 0.8, report_rate=0.5, features=16, feedback_window=256, seed=s)
           for s in range(2)]
X = np.random.default_rng(0).standard_normal((4000, 16)).astype(np.float32)
def run(r):
    for _ in range(60):
        r.route_batch(X, backend="numba")
threads = [threading.Thread(target=run, args=(routers[i % 2],)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("layer", numba.threading_layer(), "requests", sum(r.stats()["requests"] for r in routers))
"""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, NUMBA_THREADING_LAYER="workqueue"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "layer workqueue requests 720000" in res.stdout
